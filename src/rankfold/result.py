"""What a compression returns: the module, its plan (planned mode), its report and its self-check,
with the one save() that writes it as the CLI does (float ONNX, or QDQ checked again)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn

from rankfold.apply import CompressionReport
from rankfold.errors import RankfoldError
from rankfold.planner.plan import Plan, fitting_samples
from rankfold.quantize.core import ActivationParams
from rankfold.quantize.observers import OBSERVERS
from rankfold.selfcheck import Agreement, CheckRule
from rankfold.settings import DEFAULT_MAX_OUTPUT_ERROR, DEFAULT_MIN_AGREEMENT


@dataclass
class Compressed:
    """A checked compression of `original`. `plan` is None in uniform mode; `check` is None when
    the self-check was turned off (check=False, --no-check)."""

    module: nn.Module
    report: CompressionReport
    check: Agreement | None
    original: nn.Module
    calib: Tensor | None
    plan: Plan | None = None
    example_input: Tensor | None = None
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    max_output_error: float = DEFAULT_MAX_OUTPUT_ERROR
    rules: tuple[CheckRule, ...] = field(default_factory=tuple)
    # Weights already on the export's grid (quantization-aware training): save() quantizes them by
    # the same rule and nothing else, so the file holds the trained weights.
    weights_on_grid: bool = False
    # The held-back samples the self-check judges, when not the tail of `calib` that planning left
    # unfitted (adversarial distillation: only the clean ones).
    check_samples: Tensor | None = None
    # Learned int8 parameters (scale, zero point) of quantized layers' inputs, by layer (leaf) name
    # (quantization-aware training with learned activation steps): save() writes them, not calibrated ones.
    input_steps: Mapping[str, ActivationParams] = field(default_factory=dict)
    # What mlp_keep pruned before planning (rankfold.mlp_neurons), or None: the plan is of that model.
    mlp_pruning: dict | None = None

    @property
    def quantized(self) -> bool:
        return self.plan is not None and self.plan.quantized

    def save(self, path: str | os.PathLike, *, observer: str = "percentile", force: bool = False,
             progress: Callable[[str], None] | None = None) -> Agreement | None:
        """Write the ONNX file: float, or QDQ when the plan quantizes a layer. A QDQ file is checked
        against the original on the held-back samples (and onnxruntime's int8 kernels against its
        reference arithmetic) before it takes `path`; a file already at `path` is refused unless
        `force`. Returns the check of what was written (also kept as `self.check`)."""
        path = os.fspath(path)
        if observer not in OBSERVERS:
            raise RankfoldError(f"observer must be one of {', '.join(OBSERVERS)}, got {observer!r}")
        if os.path.exists(path) and not force:
            raise RankfoldError(f"{path} exists: pass force=True (--force) to replace it")
        example = self.example_input if self.example_input is not None else self._first_samples()
        say = progress or (lambda _m: None)
        grafted = not self.quantized and getattr(self.module, "fixed_inputs", None)
        if grafted and self._saved_grafted(path, example, say):
            return self.check
        if not self.quantized and getattr(self.module, "packing", None) is None:
            from rankfold.export.onnx import export_onnx

            export_onnx(self.module, path, example_input=example)
            return self.check
        if not self.quantized:
            self._save_unpacked(path, example)
            return self.check
        self.check = self._save_quantized(path, example, observer, say)
        return self.check

    def _saved_grafted(self, path: str, example: Tensor, say: Callable[[str], None]) -> bool:
        """A float result of a graph with inputs given once, written into the user's graph so that
        it takes them again (a decoder its caches, a streaming model its state); False, said why,
        where it cannot be (the traced export then makes them constants)."""
        from rankfold.io import replace_atomically

        graph = _Graft(self.original, example, say, int4=False)(self.module)
        if graph is None:
            return False
        replace_atomically(path, graph.SerializeToString())
        return True

    def _save_unpacked(self, path: str, example: Tensor) -> None:
        """A float result read through packed inputs, written taking the original inputs again."""
        from rankfold.export.onnx import export_onnx
        from rankfold.io import replace_atomically

        with tempfile.TemporaryDirectory(prefix="rankfold-") as scratch:
            partial = os.path.join(scratch, "float.onnx")
            export_onnx(self.module, partial, example_input=example)
            replace_atomically(path, self._final_bytes(partial, example))

    def _final_bytes(self, partial: str, example: Tensor) -> bytes:
        """The bytes of the file `partial` as the user's file takes its inputs (unpacked where the
        module reads several packed as one)."""
        packing = getattr(self.module, "packing", None)
        if packing is None:
            with open(partial, "rb") as handle:
                return handle.read()
        from rankfold.frontends.packing import unpacked_bytes

        return unpacked_bytes(partial, packing, example.detach().cpu().numpy())

    def _first_samples(self) -> Tensor:
        if self.calib is None:
            raise RankfoldError("saving needs an example input: give example_input or calibration data")
        return self.calib[:2]

    def _save_quantized(self, path: str, example: Tensor, observer: str, say) -> Agreement | None:
        from rankfold.io import replace_atomically
        from rankfold.quantize.export import GridCopy, export_quantized, weight_only_export
        from rankfold.runtime import int8_kernels
        from rankfold.selfcheck import onnx_agreement, refuse_if_kernels_disagree, refuse_if_poor

        plan = self.plan
        if self.calib is None:
            raise RankfoldError("a quantized plan needs calibration data (activation ranges)")
        fit = fitting_samples(plan, self.calib)
        held = self.calib[len(fit):] if len(fit) < len(self.calib) else None
        if self.check_samples is not None:
            held = self.check_samples
        # A result that onnxruntime runs is checked as users run it (default session); one for the C
        # back-end in onnxruntime's reference arithmetic, which the C computes (within a unit per op).
        in_onnxruntime = plan.runtime == "onnxruntime"
        # A file with full 8-bit weights planned here for another machine (x86-vnni, arm64) is checked
        # in the reference arithmetic, which that machine computes, where this CPU's fused int8
        # kernels saturate (x86 without VNNI): they are not the target's.
        default_session = in_onnxruntime and (plan.reduce_range or int8_kernels().full_range_exact)
        # Built and checked in the system's temporary directory: only a checked model is written
        # beside `path`, under a unique name renamed into place.
        given = getattr(self.module, "fixed_inputs", None)
        # Inputs given once (a streaming model's state) stay inputs only in the user's own graph, which
        # takes weight-only results: int8 activations are calibrated on the traced graph, where those
        # inputs are constants. Where nothing planned on int8 activations, the inputs are kept.
        keeps_inputs = bool(given) and in_onnxruntime and _activations_are_free(plan)
        token_ids = weight_only_export(example, self.module)  # a transformer: weight-only whatever the inputs
        weight_only = token_ids or keeps_inputs
        # int8 activations refused by the check: the same weights with float activations (the same
        # weight bytes) are tried once, where nothing planned on int8 activations (latency, RAM, the C back-end)
        forms = [weight_only] if weight_only or not _activations_are_free(plan) else [False, True]
        with tempfile.TemporaryDirectory(prefix="rankfold-") as scratch:
            partial = os.path.join(scratch, "quantized.onnx")
            trained = {"equalize": False, "data_aware_rounding": False, "bias_correction": False} \
                if self.weights_on_grid else {}
            # Weight-only with inputs given once: the quantized weights go into the user's graph, which
            # then takes those inputs again (a decoder its caches), as a float result does
            int4 = any(bits == 4 for bits in plan.layer_bits().values())
            graft = _Graft(self.original, example, say, int4) if weight_only and in_onnxruntime and given else None
            if given and graft is None:
                from rankfold.data import listed

                why = "its int8 activations, which the plan counted on (a latency or RAM budget), are " \
                    "calibrated on the traced graph" if in_onnxruntime else \
                    "it is made for the C back-end, which takes one input"
                say(f"inputs given once ({listed(given)}) are constants of the written file: {why}")
            elif keeps_inputs and not token_ids:
                say("weight-only (float activations between the layers): int8 activations are calibrated on the "
                    "traced graph, where the inputs given once are constants")
            grid = GridCopy()  # the weights on their grid: made once for every form tried
            for attempt, float_activations in enumerate(forms):
                if os.path.exists(partial):
                    os.remove(partial)
                export_quantized(self.module, plan.layer_bits(), partial, calib=fit, example_input=example,
                                 observer=observer, reduce_range=plan.reduce_range, progress=say,
                                 weight_only=float_activations, per_tensor=plan.per_tensor_layers(),
                                 groups=plan.grouped_layers(), float_graph=graft,
                                 input_steps=self.input_steps, float_outputs=in_onnxruntime, grid=grid,
                                 **trained)
                check = self.check
                if default_session and not float_activations:
                    refuse_if_kernels_disagree(partial, held if held is not None else fit, say)
                if held is None:
                    break
                grafted = graft is not None and graft.done
                check = onnx_agreement(self.original, partial, held, optimized=default_session, rules=self.rules,
                                       takes_inputs_of=self.module if grafted else None)
                path_used = "onnxruntime default session" if default_session else "onnxruntime reference arithmetic"
                if in_onnxruntime and not default_session:
                    path_used += f", as {plan.target} computes it; this CPU's fused int8 kernels saturate"
                form = ", weight-only" if float_activations else ""
                say(f"self-check (quantized{form}, {path_used}): " + check.describe())
                try:
                    refuse_if_poor(check, self.min_agreement, self.max_output_error, self.rules)
                except RankfoldError:
                    if attempt == len(forms) - 1:
                        raise
                    say("  int8 activations lose too much: written again weight-only (float activations between "
                        "the layers, the same weight bytes)")
                    continue
                break
            if graft is not None and graft.done:
                with open(partial, "rb") as handle:
                    replace_atomically(path, handle.read())
            else:
                replace_atomically(path, self._final_bytes(partial, example))
            return check


class _Graft:
    """A result written into the user's graph (rankfold.export.graft), said so, or None (the traced
    export), said why: a float result, or the copy on the integer grid that a weight-only
    quantized one is made from (`int4`: raised to the opset int4 weights need)."""

    def __init__(self, original: nn.Module, example: Tensor, say: Callable[[str], None], int4: bool) -> None:
        self.original, self.example, self.say, self.int4 = original, example, say, int4
        self.done = False

    def __call__(self, quantized: nn.Module):
        from rankfold.data import listed
        from rankfold.export.graft import GraftRefused, checked_graft
        from rankfold.quantize.onnx_qdq import INT4_OPSET, raised_opset

        given = listed(quantized.fixed_inputs)
        try:
            graph = checked_graft(quantized, self.original, self.example)
            if self.int4:  # the user's graph at the opset int4 weights need, or the traced export
                try:
                    graph = raised_opset(graph, INT4_OPSET)
                except RankfoldError as exc:
                    raise GraftRefused(str(exc)) from None
        except GraftRefused as exc:
            self.say(f"inputs given once ({given}) are constants of the written file: it could not be written "
                     f"into the original graph ({exc})")
            return None
        self.done = True
        self.say(f"written into the original graph: the file takes every input again ({given} included)")
        return graph


def _activations_are_free(plan) -> bool:
    """Whether nothing in the plan counted on int8 activations: no latency or RAM limit (float
    activations run slower and take 4x the memory between layers), and onnxruntime runs the file
    (the C back-end computes in int8 throughout)."""
    return plan.runtime == "onnxruntime" and not ({"latency_ms", "ram_bytes"} & set(plan.limits))
