"""The planner: measure the network once, price every (method, rank) option of every layer, pick
one option per layer under the budgets, and write it down as an editable JSON plan."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from rankfold.analyze import COMPRESSIBLE, run_checked, run_hooked, set_submodule, untouchable_layers
from rankfold.apply import compress_with_report
from rankfold.config import MethodConfig, SkipConfig
from rankfold.errors import RankfoldError
from rankfold.io import write_json_atomic
from rankfold.layers import layer_spec
from rankfold.methods import method_named, method_names
from rankfold.planner.candidates import FACTORIZED_POINTS, candidate_ranks, factorized_losses, input_weighting
from rankfold.planner.costs import (
    ChainProfile,
    LatencyCache,
    chain_profile,
    modelled_latency_ms,
    time_onnx_ms,
    time_onnx_pair_ms,
)
from rankfold.planner.memory import activation_profile
from rankfold.planner.sensitivity import layer_statistics, model_outputs
from rankfold.planner.solver import solve
from rankfold.selfcheck import split_holdout
from rankfold.settings import DEFAULT_MIN_RANK, calibration_batch
from rankfold.target import RUNTIMES, Budget, Target, load_target, parse_budget

PLAN_FORMAT = "rankfold-plan/1"
# Measured latency varies by a few percent from run to run: plans aim this much under a latency
# limit so that a later measurement of the result still meets it.
LATENCY_MARGIN = 0.95  # params, macs, weight_bytes, ram_bytes, latency_ms
Progress = Callable[[str], None]


@dataclass
class LayerPlan:
    name: str
    layer: str  # e.g. "Conv 3x3 64->128"
    method: str  # "none" when left alone
    ranks: list[int] = field(default_factory=list)
    est_loss: float = 0.0  # estimated KL divergence (nats) this layer's approximation adds
    params: int = 0
    weight_bytes: int = 0
    macs: int = 0
    latency_ms: float = 0.0
    ram_bytes: int = 0  # activation memory in use while this layer runs
    note: str = ""
    bits: int = 32  # weight bit-width: 32 (float), 8 or 4


@dataclass
class Plan:
    """One choice per compressible layer, with estimated costs before and after."""

    target: str
    weight_bits: int
    activation_bits: int
    data_aware: bool
    latency_source: str  # "onnxruntime (measured)" or "model (cycles per MAC)"
    limits: dict[str, float]  # absolute limits the plan was solved for
    before: dict[str, float]
    after: dict[str, float]
    est_loss: float
    feasible: bool
    layers: list[LayerPlan]
    messages: list[str] = field(default_factory=list)
    reduce_range: bool = False  # int8 weights on 7 bits (the target's onnxruntime needs it)
    runtime: str = "onnxruntime"  # what runs the result: "onnxruntime" or "c"
    # Calibration samples (the last ones) the plan was made without, for the self-check: applying
    # it holds back as many, so plan -> apply gives the same weights through the CLI and the API.
    # None: a plan file from before this was recorded.
    held_back: int | None = None

    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, **asdict(self)}

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_dict())

    def layer_bits(self) -> dict[str, int]:
        return {layer.name: layer.bits for layer in self.layers}

    @property
    def quantized(self) -> bool:
        return any(layer.bits < 32 for layer in self.layers)

    def layer_configs(self) -> dict[str, MethodConfig]:
        configs: dict[str, MethodConfig] = {}
        for layer in self.layers:
            if layer.method == "none":
                configs[layer.name] = SkipConfig(layer.note or "left alone by the plan")
            else:
                configs[layer.name] = method_named(layer.method).config(layer.ranks)
        return configs


def load_plan(path: str | os.PathLike) -> Plan:
    """Read a plan file written by rankfold (and perhaps edited by hand), checking every field."""
    path = os.fspath(path)
    try:
        with open(path) as handle:
            raw = json.load(handle)
    except OSError as exc:
        raise RankfoldError(f"{path}: cannot read the plan: {exc.strerror}") from None
    except ValueError as exc:
        raise RankfoldError(f"{path}: not a JSON plan: {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") != PLAN_FORMAT:
        raise RankfoldError(f"{path}: not a rankfold plan (expected \"format\": \"{PLAN_FORMAT}\")")
    try:
        if not isinstance(raw["layers"], list) or not all(isinstance(e, dict) for e in raw["layers"]):
            raise TypeError("layers must be a list of objects")
        layers = [LayerPlan(**entry) for entry in raw["layers"]]
        fields = {k: raw[k] for k in Plan.__dataclass_fields__ if k != "layers" and k in raw}
        plan = Plan(**fields, layers=layers)
    except (KeyError, TypeError) as exc:
        raise RankfoldError(f"{path}: malformed plan: {exc}") from None
    problem = plan_problem(plan)
    if problem:
        raise RankfoldError(f"{path}: {problem}")
    return plan


# The type each field of a plan file must have (JSON numbers: int, or int and float).
_NUMBER = (int, float)
_PLAN_TYPES = {"target": str, "weight_bits": int, "activation_bits": int, "data_aware": bool,
               "latency_source": str, "limits": dict, "before": dict, "after": dict, "est_loss": _NUMBER,
               "feasible": bool, "messages": list, "reduce_range": bool, "runtime": str}
_LAYER_TYPES = {"name": str, "layer": str, "method": str, "ranks": list, "est_loss": _NUMBER, "params": int,
                "weight_bytes": int, "macs": int, "latency_ms": _NUMBER, "ram_bytes": int, "note": str, "bits": int}


_TYPE_WORDS = {str: "a string", int: "an integer", bool: "true or false", dict: "an object", list: "a list",
               _NUMBER: "a number"}


def _type_problem(where: str, obj, types: Mapping[str, type | tuple]) -> str | None:
    for name, expected in types.items():
        value = getattr(obj, name)
        # JSON true/false are Python bools, which are ints too: a count or a number is never a bool.
        wrong = not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool)
        if wrong:
            return f"{where}{name} must be {_TYPE_WORDS[expected]}, got {value!r}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"{where}{name} must be finite, got {value!r}"
    return None


def plan_problem(plan: Plan) -> str | None:
    """What is wrong with a plan's fields (a hand-edited file), in one line; None when nothing is."""
    problem = _type_problem("", plan, _PLAN_TYPES)
    if problem:
        return problem
    if plan.runtime not in RUNTIMES:
        return f"runtime must be one of {', '.join(RUNTIMES)}, got {plan.runtime!r}"
    if plan.held_back is not None and (isinstance(plan.held_back, bool) or not isinstance(plan.held_back, int)
                                       or plan.held_back < 0):
        return f"held_back must be a count of samples (an integer >= 0), got {plan.held_back!r}"
    for key, value in plan.limits.items():
        if isinstance(value, bool) or not isinstance(value, _NUMBER) or not math.isfinite(value) or value <= 0:
            return f"limit {key!r} must be a positive number, got {value!r}"
    seen: set[str] = set()
    for layer in plan.layers:
        where = f"layer {getattr(layer, 'name', '?')!r}: "
        problem = _type_problem(where, layer, _LAYER_TYPES)
        if problem:
            return problem
        if layer.name in seen:
            return f"{where}listed twice (each layer once)"
        seen.add(layer.name)
        if layer.bits not in (32, 8, 4):
            return f"{where}bits must be 32, 8 or 4, got {layer.bits!r}"
        if layer.method == "none":
            if layer.ranks:
                return f"{where}method none takes no ranks, got {layer.ranks!r}"
            continue
        if layer.method not in method_names():
            return f"{where}unknown method {layer.method!r} (choose from none, {', '.join(method_names())})"
        count = method_named(layer.method).rank_count
        if len(layer.ranks) != count or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1
                                                for r in layer.ranks):
            return (f"{where}{layer.method} takes {count} positive integer rank{'s' if count > 1 else ''}, "
                    f"got {layer.ranks!r}")
    return None


# -- planning ------------------------------------------------------------------------------
@dataclass
class _Option:
    method: str
    ranks: tuple[int, ...]
    loss: float
    profile: ChainProfile
    latency_ms: float
    ram_elements: int
    bits: int = 32
    weight_bytes: float = 0.0
    quant_loss: float = 0.0  # the share of `loss` that weight rounding adds

    @property
    def key(self) -> tuple[str, tuple[int, ...]]:
        return self.method, self.ranks


def _stored_bytes(profile: ChainProfile, bits: int) -> float:
    """Weight bytes of a chain at `bits`, as the QDQ export stores them: packed integers and a
    float32 scale per output channel, int32 biases with a float32 scale each; float32 at 32 bits."""
    if bits >= 32:
        return 4.0 * profile.params
    total = 0.0
    for s in profile.sub_layers:
        elements = s.out_ch * (s.in_ch // s.groups) * int(np.prod(s.kernel or (1,)))
        total += -(-elements * bits // 8) + 4 * s.out_ch + (8 * s.out_ch if s.bias else 0)
    return total


def _with_bits(options: list[_Option], bits_choices: tuple[int, ...], noise_unit: float,
               reduce_range: bool = False) -> list[_Option]:
    """Every structural option at every allowed bit-width. Quantizing adds rounding noise to each
    factor: its estimated loss is noise_unit (the layer's loss at int8) x factors x (127/qmax)^2,
    qmax 63 for int8 on a target that needs 7-bit weights (four times the int8 noise, same bytes)."""
    from rankfold.quantize.core import weight_qmax

    expanded = []
    for opt in options:
        for bits in bits_choices:
            extra = 0.0 if bits >= 32 else \
                noise_unit * len(opt.profile.sub_layers) * (127 / weight_qmax(bits, reduce_range)) ** 2
            expanded.append(dataclasses.replace(opt, loss=opt.loss + extra, bits=bits, quant_loss=extra,
                                                weight_bytes=_stored_bytes(opt.profile, bits)))
    return expanded


def _int8_noise_loss(module: nn.Module, stats) -> float:
    """1/2 sum_c G_c E[dy_c^2] for int8 rounding noise on the layer's weights (independent noise of
    variance (max|w_c| / 127)^2 / 12 per weight; E[x^2] summed over the taps = taps * tr(Sigma))."""
    from rankfold.quantize.weights import weight_quant_noise

    noise = torch.from_numpy(weight_quant_noise(module.weight, 8))
    spec = layer_spec(module)
    trace = float(torch.trace(stats.input_moment)) if stats.input_moment is not None else float(spec.in_ch)
    per_group = spec.in_ch // spec.groups
    return 0.5 * float(stats.sensitivity @ noise) * spec.spatial * trace * per_group / spec.in_ch


def _options_for_layer(
    name, module, stats, target, min_rank, base_elements, keep_input, latency_of
) -> tuple[list[_Option], str]:
    spec = layer_spec(module)
    input_shape = stats.input_shape
    original = chain_profile([module], input_shape)
    options = [_Option("none", (), 0.0, original, latency_of(original, input_shape),
                       base_elements + original.working_elements(keep_input))]
    if spec.groups > 1:
        return options, f"grouped convolution (groups={spec.groups}): not factorized"
    weighting = input_weighting(stats.input_moment, spec.in_ch)
    notes = []
    for method_name in target.methods:
        method = method_named(method_name)
        if method.unsupported(spec, module) is not None:
            continue
        # Without a closed form each candidate is factorized to price it: fewer candidates.
        points = 16 if method.estimate_losses is not None else FACTORIZED_POINTS
        ranks = candidate_ranks(method, spec, multiple=target.rank_multiple, min_rank=min_rank, points=points)
        if not ranks:
            continue
        if method.estimate_losses is not None:
            losses = method.estimate_losses(module.weight, weighting, stats.sensitivity, ranks)
        else:
            losses = factorized_losses(method, module, weighting, stats.sensitivity, ranks)
        for rank, loss in zip(ranks, losses):
            profile = chain_profile(list(method.skeleton(module, rank)), input_shape)
            options.append(_Option(method_name, tuple(rank), loss, profile, latency_of(profile, input_shape),
                                   base_elements + profile.working_elements(keep_input)))
    if len(options) == 1:
        notes.append(f"no rank of {', '.join(target.methods)} at or above min_rank={min_rank} saves parameters")
    return options, "; ".join(notes)


def _data_free_stats(model: nn.Module, names: list[str], example: Tensor):
    """Shapes from one forward pass; identity input weighting; each layer's error relative to its
    own weight norm (no data: no sensitivity)."""
    from rankfold.planner.sensitivity import LayerStats

    modules = dict(model.named_modules())
    shapes: dict[str, tuple] = {}
    def record(name: str, inputs, output) -> None:  # a forward hook that returned a value would replace the output
        shapes.setdefault(name, (tuple(inputs[0].shape[1:]), tuple(output.shape[1:])))

    run_hooked(model, example, [modules[n].register_forward_hook(lambda m, i, o, n=n: record(n, i, o))
                                for n in names])
    stats = {}
    for n in names:
        if n in shapes:
            w = modules[n].weight.detach().to(torch.float64)
            sens = torch.full((w.shape[0],), 1.0 / float((w * w).sum().clamp_min(1e-30)), dtype=torch.float64)
            stats[n] = LayerStats(n, None, sens, *shapes[n])
    return stats


def _onnx_of(model: nn.Module, example: Tensor, onnx_path: str | None = None):
    """The model as an ONNX proto: its own file when given, else exported (for timing only)."""
    import onnx

    from rankfold.export.onnx import export_onnx

    if onnx_path is not None:
        return onnx.load(onnx_path)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        export_onnx(model, path, example_input=example, verify=False)
        return onnx.load(path)


def _variant(model: nn.Module, modules: dict, choice: Mapping[str, _Option]) -> nn.Module:
    """`model` with each layer replaced as `choice` says (random weights: for timing only)."""
    variant = copy.deepcopy(model)
    for name, option in choice.items():
        if option.method != "none":
            method = method_named(option.method)
            set_submodule(variant, name, method.skeleton(modules[name], option.ranks))
    return variant


def make_plan(
    model: nn.Module,
    *,
    calib: Tensor | None = None,
    example_input: Tensor | None = None,
    target: str | Target = "host",
    budgets: Mapping[str, str | float | Budget] | None = None,
    min_rank: int = DEFAULT_MIN_RANK,
    onnx_path: str | None = None,
    bits: str | int = "auto",
    progress: Progress | None = None,
) -> Plan:
    """Plan the compression of `model` for `target` under `budgets` ({quantity: "10%" | "2MB" | ...},
    quantities: params, weight_bytes, macs, latency_ms, ram_bytes). `onnx_path`: the model's own
    ONNX file, timed for the host's whole-network latency (else the model is exported to time it)."""
    pricing = price_model(model, calib=calib, example_input=example_input, target=target, min_rank=min_rank,
                          onnx_path=onnx_path, bits=bits, progress=progress)
    return pricing.solve(budgets or {}, progress=progress)


def bit_choices(target: Target, bits: str | int) -> tuple[int, ...]:
    """The weight bit-widths the planner may pick from: the target's set ("auto"), or one of them."""
    if bits == "auto":
        return tuple(target.weight_bits)
    try:
        value = int(bits)
    except (TypeError, ValueError):
        raise RankfoldError(f"bits must be auto, 32, 8 or 4, got {bits!r}") from None
    if value not in target.weight_bits:
        raise RankfoldError(f"target {target.name} runs weights at {', '.join(map(str, target.weight_bits))} "
                            f"bits, not {value}")
    return (value,)


def edge_bits(target: Target, bits: str | int) -> tuple[int, ...]:
    """Bit-widths for the first and last layer, the most sensitive to rounding and the cheapest in
    bytes: never int4 where the target runs float. With "auto" the planner weighs float against
    int8 (int8 saves bytes a tight budget needs); a fixed --bits keeps them float."""
    choices = bit_choices(target, bits)
    if 32 not in target.weight_bits:
        return choices
    return (32, 8) if bits == "auto" and 8 in choices else (32,)


def price_model(
    model: nn.Module,
    *,
    calib: Tensor | None = None,
    example_input: Tensor | None = None,
    target: str | Target = "host",
    min_rank: int = DEFAULT_MIN_RANK,
    onnx_path: str | None = None,
    bits: str | int = "auto",
    progress: Progress | None = None,
) -> Pricing:
    """The expensive half of planning: statistics, every layer's options with loss and costs."""
    say = progress or (lambda _m: None)
    target = load_target(target) if isinstance(target, str) else target
    if calib is None and example_input is None:
        raise RankfoldError("planning needs calibration data (calib) or an example_input")
    example = (calib if calib is not None else example_input)[:1].to(torch.float32)
    was_training = model.training
    model.eval()
    try:
        untouchable = untouchable_layers(model)
        names = [n for n, m in model.named_modules() if isinstance(m, COMPRESSIBLE) and n not in untouchable]
        for name, reason in untouchable.items():
            say(f"left alone: {name} ({reason})")
        if not names:
            raise RankfoldError("the model has no Linear / Conv1d / Conv2d layer to compress")
        if calib is not None:
            stats = layer_statistics(model, names, calib.to(torch.float32), progress=say)
        else:
            stats = _data_free_stats(model, names, example)
        activations = activation_profile(model, example)
        cache = LatencyCache() if target.latency == "measured" else None

        def latency_of(profile: ChainProfile, input_shape) -> float:
            return cache.latency_ms(profile, input_shape) if cache else modelled_latency_ms(profile, target)

        modules = dict(model.named_modules())
        layer_names = [n for n in names if n in stats]
        options, notes = {}, {}
        choices = bit_choices(target, bits)
        for i, name in enumerate(layer_names, 1):
            say(f"pricing [{i}/{len(layer_names)}] {name}")
            structural, notes[name] = _options_for_layer(
                name, modules[name], stats[name], target, min_rank, activations.base.get(name, 0),
                activations.input_kept.get(name, False), latency_of)
            edge = i in (1, len(layer_names))
            options[name] = _with_bits(structural, edge_bits(target, bits) if edge else choices,
                                       _int8_noise_loss(modules[name], stats[name]), target.reduce_range)
        if cache:
            say(f"latency: {cache.measured} new shape(s) timed in onnxruntime, cache {cache.path}")
            cache.save()
    finally:
        model.train(was_training)
    probe = None
    if calib is not None and LossProbe.applies(model, example):
        probe = LossProbe(model, calib[:PROBE_SAMPLES], stats)
    return Pricing(model, example, target, options, notes, activations, calib is not None, names, layer_names,
                   onnx_path, say, probe)


PROBE_SAMPLES = 128  # calibration samples the measured losses are taken on
REFINE_ROUNDS = 6
OUTLIER = 25.0  # measured/estimated ratio, over the network's median, that replaces the estimate (set on bench/)


class LossProbe:
    """Measured losses of single factorizations: the layer's weight replaced by its data-aware
    approximation, everything else original, KL of the predictions to the original's on a probe
    batch. Measured this way (no compensation by later layers), losses run a fairly even multiple
    of the estimates; a rank where the measured/estimated ratio is OUTLIER times the network's
    median is one where the second-order estimate broke down, and its loss is raised."""

    def __init__(self, model: nn.Module, probe: Tensor, stats: Mapping) -> None:
        self.model, self.probe, self.stats = model, probe.to(torch.float32), stats
        self.modules = dict(model.named_modules())
        self.reference = self._log_probs()
        self.values: dict[str, dict[tuple[str, tuple[int, ...]], tuple[float, float]]] = {}
        self.typical: float | None = None  # median measured/estimated ratio so far

    @staticmethod
    def applies(model: nn.Module, example: Tensor) -> bool:
        """Measured as KL between class predictions: for classifiers (every output 2-D logits) only."""
        with torch.no_grad():
            return all(out.ndim == 2 for out in model_outputs(run_checked(model, example)))

    def _log_probs(self) -> list[Tensor]:
        was_training = self.model.training
        try:
            step = calibration_batch()
            with torch.no_grad():
                batches = [model_outputs(run_checked(self.model.eval(), self.probe[start : start + step]))
                           for start in range(0, self.probe.shape[0], step)]
        finally:
            self.model.train(was_training)
        return [torch.log_softmax(torch.cat(heads).double(), 1) for heads in zip(*batches)]

    def measured(self, name: str, key) -> bool:
        return key in self.values.get(name, {})

    def measure(self, name: str, key: tuple[str, tuple[int, ...]], estimate: float) -> float:
        method_name, ranks = key
        layer = self.modules[name]
        method = method_named(method_name)
        weighting = input_weighting(self.stats[name].input_moment, layer_spec(layer).in_ch)
        approx = method.factorize(layer, ranks, weighting, method.config(list(ranks))).approx_weight
        original = layer.weight.detach().clone()
        try:
            with torch.no_grad():
                layer.weight.copy_(approx.reshape(original.shape).to(original.dtype))
            log_q = self._log_probs()
        finally:
            with torch.no_grad():
                layer.weight.copy_(original)
        kl = sum(float((p.exp() * (p - q)).sum(1).mean().clamp_min(0)) for p, q in zip(self.reference, log_q))
        self.record(name, key, kl, estimate)
        return kl

    def record(self, name: str, key: tuple[str, tuple[int, ...]], kl: float, estimate: float) -> None:
        """Keep a measurement and the network's median measured/estimated ratio."""
        self.values.setdefault(name, {})[key] = (kl, estimate)
        ratios = [k / e for layer in self.values.values() for k, e in layer.values() if e > 0]
        self.typical = float(np.median(ratios)) if ratios else None

    def structural_loss(self, name: str, key, estimate: float) -> float:
        """The estimate, or, where this rank or a higher one of the same method measured as an
        outlier, the measurement brought to the estimates' scale (never lowered)."""
        typical = self.typical
        if typical is None:
            return estimate
        method, ranks = key
        bounds = [kl / typical for (m, r), (kl, est) in self.values.get(name, {}).items()
                  if m == method and all(a <= b for a, b in zip(ranks, r)) and kl > OUTLIER * typical * est]
        return max([estimate] + bounds)


class Pricing:
    """Every layer's options, priced; solve() turns budgets into a Plan (cheap, repeatable)."""

    def __init__(self, model, example, target, options, notes, activations, data_aware, names, layer_names,
                 onnx_path, say, probe: LossProbe | None = None) -> None:
        self.model, self.example, self.target, self.probe = model, example, target, probe
        self.options, self.notes, self.activations = options, notes, activations
        self.data_aware, self.names, self.layer_names = data_aware, names, layer_names
        self.modules = dict(model.named_modules())
        self.weight_bytes_per = 4 if 32 in target.weight_bits else 1  # bytes per parameter outside layers
        self.act_bytes = target.activation_bytes
        total_params = sum(p.numel() for p in model.parameters()) + sum(
            b.numel() for b in model.buffers() if b.is_floating_point())
        layer_params = sum(options[n][0].profile.params for n in layer_names)
        self.latency_scale = 1.0
        if target.latency == "measured":
            # Layers timed alone run with their weights in cache; inside the network they do not,
            # and Add/Relu/pooling cost extra. Whole networks timed at both ends of the range (every
            # layer kept, every layer at its cheapest option) calibrate whole = fixed + scale * sum.
            say("timing the whole network in onnxruntime, as it is and at its cheapest options")
            kept_sum = sum(options[n][0].latency_ms for n in layer_names)
            cheapest = {n: min(options[n], key=lambda o: o.latency_ms) for n in layer_names}
            cheap_sum = sum(o.latency_ms for o in cheapest.values())
            self.original_onnx = _onnx_of(model, example, onnx_path)
            whole = time_onnx_ms(self.original_onnx, tuple(example.shape[1:]), repeats=15)
            self.whole_ms = whole
            cheap_whole = self.measured_latency_ms(cheapest)
            if kept_sum - cheap_sum > 1e-3 * kept_sum:
                self.latency_scale = max(0.1, (whole - cheap_whole) / (kept_sum - cheap_sum))
            fixed_latency = whole - self.latency_scale * kept_sum
            self.latency_source = "onnxruntime (measured)"
        else:
            fixed_latency = 1000.0 * activations.other_elements * target.cycles_per_element / target.clock_hz
            self.latency_source = "model (cycles per MAC)"
        # A quantized export adds a float32 scale and an int8 zero point per activation tensor.
        quantizable = any(o.bits < 32 for n in layer_names for o in options[n])
        activation_params_bytes = 5 * (len(getattr(model, "steps", [])) or 3 * len(layer_names)) if quantizable else 0
        self.fixed = {
            "params": total_params - layer_params,
            "weight_bytes": (total_params - layer_params) * self.weight_bytes_per + activation_params_bytes,
            "macs": 0,
            "latency_ms": fixed_latency,
        }
        # "before" is the float original, whatever bit-widths the options use (budgets in % are of it)
        self.before = self.totals({n: dataclasses.replace(options[n][0], bits=32,
                                                          weight_bytes=_stored_bytes(options[n][0].profile, 32))
                                   for n in layer_names})
        self.before["weight_bytes"] -= activation_params_bytes
        if target.latency == "measured":
            self.before["latency_ms"] = whole

    def quantity(self, opt: _Option, q: str) -> float:
        return {"params": opt.profile.params, "weight_bytes": opt.weight_bytes,
                "macs": opt.profile.macs, "latency_ms": self.latency_scale * opt.latency_ms}[q]

    def totals(self, choice: Mapping[str, _Option]) -> dict[str, float]:
        out = {q: self.fixed[q] + sum(self.quantity(choice[n], q) for n in self.layer_names) for q in self.fixed}
        peak = max([self.activations.fixed_peak] + [choice[n].ram_elements for n in self.layer_names])
        out["ram_bytes"] = peak * self.act_bytes
        return out

    def measured_latency_ms(self, choice: Mapping[str, _Option]) -> float:
        """The network built as `choice` says, timed in turn with the original (drift cancels in
        the ratio) and scaled to the original's latency measured at the start."""
        candidate = _onnx_of(_variant(self.model, self.modules, choice), self.example)
        reference_ms, candidate_ms = time_onnx_pair_ms(self.original_onnx, candidate, tuple(self.example.shape[1:]))
        return self.whole_ms * candidate_ms / reference_ms

    def limits(self, budgets: Mapping[str, str | float | Budget]) -> dict[str, float]:
        parsed = {q: b if isinstance(b, Budget) else parse_budget(q, b) for q, b in budgets.items()}
        limits = {q: b.limit(self.before[q]) for q, b in parsed.items()}
        if self.target.flash_bytes is not None:
            limits["weight_bytes"] = min(limits.get("weight_bytes", float("inf")), float(self.target.flash_bytes))
        if self.target.ram_bytes is not None:
            limits["ram_bytes"] = min(limits.get("ram_bytes", float("inf")), float(self.target.ram_bytes))
        return limits

    def solve(self, budgets: Mapping[str, str | float | Budget], *, progress: Progress | None = None,
              measure: bool = True) -> Plan:
        """The least-loss plan within `budgets` and the target's limits. `measure`: on a measured
        target, time the chosen network itself (and re-solve while it misses a latency limit)."""
        say = progress or (lambda _m: None)
        limits = self.limits(budgets)
        ram_limit = limits.get("ram_bytes")
        losses, costs = [], {q: [] for q in self.fixed}
        feasible_ram = ram_limit is None or self.activations.fixed_peak * self.act_bytes <= ram_limit
        for n in self.layer_names:
            loss = np.array([o.loss for o in self.options[n]], dtype=float)
            if ram_limit is not None:
                too_big = np.array([o.ram_elements * self.act_bytes > ram_limit for o in self.options[n]])
                if too_big.all():
                    feasible_ram = False
                else:
                    loss[too_big] = np.inf
            losses.append(loss)
            for q in self.fixed:
                costs[q].append(np.array([self.quantity(o, q) for o in self.options[n]], dtype=float))
        layer_limits = {q: limits[q] - self.fixed[q] for q in limits if q in self.fixed}
        if "latency_ms" in layer_limits and self.target.latency == "measured":
            layer_limits["latency_ms"] -= (1 - LATENCY_MARGIN) * limits["latency_ms"]
        solution = self._solve_measured(losses, costs, layer_limits, say)
        chosen = {n: self.options[n][j] for n, j in zip(self.layer_names, solution.choice)}
        after = self.totals(chosen)
        if self.target.latency == "measured" and measure:
            # Closed loop: time the chosen network itself; while it misses a latency limit that
            # the estimate said it meets, tighten the limit by the miss and solve again.
            for attempt in range(4):
                measured = self.measured_latency_ms(chosen)
                say(f"plan timed in onnxruntime: {measured:.3f} ms (estimated {after['latency_ms']:.3f} ms)")
                after["latency_ms_estimated"], after["latency_ms"] = after["latency_ms"], measured
                limit = limits.get("latency_ms")
                if limit is None or measured <= LATENCY_MARGIN * limit or not solution.feasible or attempt == 3:
                    break
                layer_limits["latency_ms"] -= measured - LATENCY_MARGIN * limit
                solution = self._solve_measured(losses, costs, layer_limits, say)
                chosen = {n: self.options[n][j] for n, j in zip(self.layer_names, solution.choice)}
                after = self.totals(chosen)
        feasible = solution.feasible and feasible_ram
        messages = self._messages(limits, after, solution)
        return Plan(self.target.name, self.target.default_weight_bits, self.target.activation_bits, self.data_aware,
                    self.latency_source, limits, dict(self.before), after,
                    float(sum(self._loss(n, o) for n, o in chosen.items())), feasible, self._layer_plans(chosen),
                    messages, self.target.reduce_range, self.target.runtime)

    def _loss(self, name: str, option: _Option) -> float:
        if self.probe is None or option.method == "none":
            return option.loss
        return self.probe.structural_loss(name, option.key, option.loss - option.quant_loss) + option.quant_loss

    def _solve_measured(self, losses, costs, layer_limits, say):
        """Solve on the estimated losses; then measure the factorizations the solution picked (one
        layer at a time, in the real network) and solve again, until it picks none unmeasured.
        The closed-form estimate is second order: right for small errors, far too low where a
        rank is too small for the layer (measured: up to 100x on MobileNetV2's projections)."""
        for _round in range(REFINE_ROUNDS):
            refined = [np.where(np.isfinite(loss), [self._loss(n, o) for o in self.options[n]], np.inf)
                       for n, loss in zip(self.layer_names, losses)]
            solution = solve(refined, costs, layer_limits)
            if self.probe is None:
                return solution
            picked = [(n, self.options[n][j]) for n, j in zip(self.layer_names, solution.choice)]
            todo = [(n, o) for n, o in picked if o.method != "none" and not self.probe.measured(n, o.key)]
            if not todo:
                return solution
            say(f"measuring {len(todo)} factorization(s) in the network (round {_round + 1})")
            for n, o in todo:
                self.probe.measure(n, o.key, o.loss - o.quant_loss)
        return solution

    def _messages(self, limits, after, solution) -> list[str]:
        messages = []
        for q, limit in limits.items():
            if after[q] > limit * (1 + 1e-9):
                if q == "ram_bytes":
                    best = max([self.activations.fixed_peak] + [min(o.ram_elements for o in self.options[n])
                                                                for n in self.layer_names]) * self.act_bytes
                else:
                    best = solution.best_reachable.get(q, 0.0) + self.fixed.get(q, 0.0)
                messages.append(f"{q} cannot be met: limit {limit:,.6g}, the plan reaches {after[q]:,.6g} "
                                f"(over by {after[q] - limit:,.6g}); the smallest reachable is {best:,.6g}")
        if not self.activations.graph_wide:
            messages.append("activation memory counts layer inputs and outputs only (residual branches are not "
                            "tracked outside ONNX-loaded models)")
        if any(o.bits < 32 for n in self.layer_names for o in self.options[n]) and \
                self.target.latency == "measured":
            messages.append("latency is measured on float layers; quantized layers run onnxruntime's int8 kernels "
                            "(int4 weights are dequantized at run time)")
        return messages

    def _layer_plans(self, chosen: Mapping[str, _Option]) -> list[LayerPlan]:
        layers = []
        for n in self.names:
            described = layer_spec(self.modules[n]).describe()
            if n not in chosen:
                layers.append(LayerPlan(n, described, "none", note="not reached by the forward pass"))
                continue
            opt = chosen[n]
            note = self.notes[n] if opt.method == "none" else ""
            if opt.method == "none" and not note:
                note = "kept: no option's saving was worth its loss under the budgets"
            layers.append(LayerPlan(
                n, described, opt.method, list(opt.ranks), float(self._loss(n, opt)), int(opt.profile.params),
                int(round(opt.weight_bytes)), int(opt.profile.macs),
                round(float(self.latency_scale * opt.latency_ms), 5), int(round(opt.ram_elements * self.act_bytes)),
                note, opt.bits))
        return layers


def escape_pattern(name: str) -> str:
    """An fnmatch pattern that matches exactly `name`."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def check_plan_matches(plan: Plan, model: nn.Module) -> None:
    """Every planned layer must exist in `model` with the shape the plan was made for."""
    modules = dict(model.named_modules())
    for layer in plan.layers:
        module = modules.get(layer.name)
        if module is None or not isinstance(module, COMPRESSIBLE):
            raise RankfoldError(f"the plan does not match the model: no layer {layer.name!r} to compress")
        found = layer_spec(module).describe()
        if found != layer.layer:
            raise RankfoldError(f"the plan does not match the model: layer {layer.name!r} is {found}, "
                                f"the plan was made for {layer.layer}")


def apply_plan(model: nn.Module, plan: Plan, *, calib: Tensor | None = None, progress: Progress | None = None):
    """The compressed copy of `model` that `plan` describes, and its CompressionReport.
    Deterministic: the same model, plan and calibration data give the same weights."""
    check_plan_matches(plan, model)
    if plan.data_aware and calib is None:
        raise RankfoldError("this plan was made with calibration data: give the same calibration data to apply it")
    layers = {escape_pattern(n): cfg for n, cfg in plan.layer_configs().items()}
    layers["*"] = SkipConfig("not in the plan")
    return compress_with_report(model, calib=fitting_samples(plan, calib), layers=layers, min_rank=1,
                                progress=progress)


def fitting_samples(plan: Plan, calib: Tensor | None) -> Tensor | None:
    """The calibration samples a plan is applied with: all but the `held_back` last ones, which
    its planning never saw (checked: the same data must hold back as many)."""
    if calib is None or not plan.held_back:
        return calib
    _fit, held = split_holdout(calib)
    if held is None or len(held) != plan.held_back:
        raise RankfoldError(f"this plan was made holding back the last {plan.held_back} calibration samples for "
                            f"its self-check; {len(calib)} samples here would hold back "
                            f"{0 if held is None else len(held)}: give the calibration data it was made with")
    return calib[: len(calib) - plan.held_back]
