"""Plan, apply, check: the whole budgeted compression, as the CLI and compress() run it. Both
return a Compressed, whose save() writes the float or QDQ file."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from torch import Tensor, nn

from rankfold.analyze import COMPRESSIBLE, TABLES
from rankfold.apply import CompressionReport
from rankfold.errors import RankfoldError
from rankfold.planner.options import quantized_layer_bytes
from rankfold.planner.plan import Plan, apply_plan, scale_group
from rankfold.planner.pricing import make_plan
from rankfold.result import Compressed
from rankfold.selfcheck import (
    Agreement,
    CheckRule,
    agreement,
    refuse_if_poor,
    split_holdout,
)
from rankfold.settings import DEFAULT_MAX_OUTPUT_ERROR, DEFAULT_MIN_AGREEMENT, DEFAULT_MIN_RANK
from rankfold.target import Target


def compress_to_budget(
    model: nn.Module,
    *,
    calib: Tensor | None,
    target: str | Target = "host",
    budgets: Mapping[str, object] | None = None,
    example_input: Tensor | None = None,
    min_rank: int = DEFAULT_MIN_RANK,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    max_output_error: float = DEFAULT_MAX_OUTPUT_ERROR,
    onnx_path: str | None = None,
    bits: str | int = "auto",
    check: bool = True,
    rules: tuple[CheckRule, ...] = (),
    progress: Callable[[str], None] | None = None,
    mlp_keep: float | None = None,
) -> Compressed:
    """Plan, apply and check. With `check` (the default) a self-check that cannot run (fewer than
    64 calibration samples) is an error before any work; check=False (the CLI's --no-check) runs no
    check: the result is unchecked (samples are still held back from planning, as with a check, so
    the plan applies the same way either way).

    `mlp_keep` (a transformer): first keep that fraction of every feed-forward block's hidden
    neurons (rankfold.mlp_neurons), then plan the rest of the budgets on the pruned model; budgets
    in % stay fractions of the original, and the check compares with the original. The plan is of
    the pruned model: it applies to the result's `planned_on`, not to `model`."""
    say = progress or (lambda _m: None)
    require_check_data(calib, check)
    fit, held = split_holdout(calib) if calib is not None else (None, None)
    planned_on, pruning = model, None
    if mlp_keep is not None:
        budgets = budgets_of_original(model, budgets or {})
        if fit is None:
            raise RankfoldError("mlp_keep (--mlp-keep) chooses neurons on calibration data: give calib")
        from rankfold.mlp_neurons import prune_mlp_neurons

        planned_on, pruning = prune_mlp_neurons(model, mlp_keep, fit, progress=say)
    plan = make_plan(planned_on, calib=fit, example_input=example_input, target=target, budgets=budgets or {},
                     min_rank=min_rank, onnx_path=onnx_path, bits=bits, progress=say)
    plan.held_back = 0 if held is None else len(held)
    if pruning is not None:
        plan.messages.append(f"planned after pruning the feed-forward blocks ({pruning['family']}): "
                             f"{pruning['blocks']} blocks keep {pruning['kept']} of {pruning['width']} hidden neurons; "
                             "the plan applies to that pruned model")
    if not plan.feasible:
        raise RankfoldError("the budgets cannot be met: " + "; ".join(m for m in plan.messages if "cannot" in m))
    module, report = apply_plan(planned_on, plan, calib=calib, progress=say)
    checked = check_result(model, module, held, min_agreement, say, max_output_error, rules) if check else None
    return Compressed(module, report, checked, model, calib, plan, example_input, min_agreement, max_output_error,
                      rules, mlp_pruning=pruning)


ORIGINAL_RELATIVE = ("params", "weight_bytes")  # the quantities whose % budgets mlp_keep resolves on the original


def budgets_of_original(model: nn.Module, budgets: Mapping[str, object]) -> dict[str, object]:
    """`budgets` with every fraction of parameters or float32 weight bytes made absolute on
    `model` (before it is pruned: the plan is of the pruned one). A fraction of another quantity
    is refused: only a plan of the original could resolve it."""
    from rankfold.target import parse_budget

    refuse_unresolvable_fractions(budgets, lambda quantity: f"max_{quantity} (mlp_keep)")
    params = sum(p.numel() for p in model.parameters())
    original = {"params": params, "weight_bytes": 4 * params}
    out: dict[str, object] = {}
    for quantity, text in budgets.items():
        budget = parse_budget(quantity, text)
        out[quantity] = str(int(budget.limit(original[quantity]))) if budget.relative else text
    return out


def refuse_unresolvable_fractions(budgets: Mapping[str, object], named: Callable[[str], str]) -> None:
    """With mlp_keep, a budget in % of anything but parameters or weight bytes is refused (only a
    plan of the unpruned original could resolve it); `named` spells a quantity's option for the error."""
    from rankfold.target import parse_budget

    for quantity, text in budgets.items():
        if parse_budget(quantity, text).relative and quantity not in ORIGINAL_RELATIVE:
            raise RankfoldError(f"{named(quantity)} {text}: with --mlp-keep give it as an absolute value (a "
                                f"fraction resolves only for {', '.join(ORIGINAL_RELATIVE)})")


def apply_and_check(model: nn.Module, plan: Plan, *, calib: Tensor | None, min_agreement: float,
                    max_output_error: float = DEFAULT_MAX_OUTPUT_ERROR, example_input: Tensor | None = None,
                    check: bool = True, rules: tuple[CheckRule, ...] = (),
                    progress: Callable[[str], None] | None = None) -> Compressed:
    """apply_plan with the calibration split exactly as planning split it, then the self-check.
    Layers edited by hand since planning have their sizes recounted on the result."""
    say = progress or (lambda _m: None)
    require_check_data(calib, check)
    held = split_holdout(calib)[1] if calib is not None else None
    if plan.held_back is None:  # a plan file from before held_back was recorded: the CLI always held back
        plan = dataclasses.replace(plan, held_back=0 if held is None else len(held))
    elif plan.held_back == 0 and check:
        raise RankfoldError("this plan was made without held-back samples (planned with --no-check): its self-check "
                            "cannot run on unseen data; apply it with --no-check (check=False), or plan again")
    module, report = apply_plan(model, plan, calib=calib, progress=say)
    held = None if calib is None or not plan.held_back else calib[len(calib) - plan.held_back:]
    example = calib[:1] if calib is not None else example_input
    if example is not None:
        plan = recount_edited(plan, report, module, example)
    checked = check_result(model, module, held, min_agreement, say, max_output_error, rules) if check else None
    return Compressed(module, report, checked, model, calib, plan, example_input, min_agreement, max_output_error,
                      rules)


def recount_edited(plan: Plan, report: CompressionReport, module: nn.Module, example: Tensor) -> Plan:
    """The plan with each layer whose applied size differs from the planned one (edited by hand:
    another rank or method) recounted on `module`: parameters, weight bytes and MACs, and the
    totals after. Its estimated loss, latency and RAM were the planner's for another choice: the
    layer's note says so, and so does a message."""
    from rankfold.stats import model_cost

    applied = {r.name: r.params_after for r in report.layers}
    edited = [layer.name for layer in plan.layers if applied.get(layer.name, layer.params) != layer.params]
    if not edited:
        return plan
    cost = model_cost(module, example[:1])
    after = dict(plan.after)
    layers = []
    for layer in plan.layers:
        if layer.name in edited:
            parts = [c for c in cost.layers if c.name == layer.name or c.name.startswith(layer.name + ".")]
            counted = {"params": sum(c.params for c in parts), "macs": sum(c.macs for c in parts),
                       "weight_bytes": stored_weight_bytes(module.get_submodule(layer.name), layer.bits,
                                                         layer.weight_scales == "tensor",
                                                         scale_group(layer.weight_scales), plan.runtime)}
            for key, value in counted.items():
                if key in after:
                    after[key] += value - getattr(layer, key)
            note = "edited after planning: sizes recounted; est.loss, latency and RAM are for the planned choice"
            layer = dataclasses.replace(layer, **counted, note="; ".join(filter(None, [layer.note, note])))
        layers.append(layer)
    message = (f"{len(edited)} layer(s) edited after planning ({', '.join(edited)}): parameters, weight bytes and "
               "MACs recounted; estimated loss, latency and RAM not re-estimated")
    return dataclasses.replace(plan, layers=layers, after=after, messages=[*plan.messages, message])


def stored_weight_bytes(module: nn.Module, bits: int, per_tensor: bool = False, group_size: int | None = None,
                        runtime: str = "onnxruntime") -> int:
    """Bytes of a layer's (or factor chain's) weights as exported, counted on the module itself."""
    leaves = [leaf for leaf in module.modules() if isinstance(leaf, COMPRESSIBLE + TABLES)]
    if bits >= 32:
        return sum(4 * p.numel() for leaf in leaves for p in leaf.parameters(recurse=False))
    return sum(quantized_layer_bytes(leaf.weight.numel(), leaf.weight.shape[0], getattr(leaf, "bias", None) is not None,
                                     bits, per_tensor, group_size, runtime) for leaf in leaves)


CHECK_SAMPLES = 64  # an eighth of them (16 to 128) is held back for the self-check


def require_check_data(calib: Tensor | None, check: bool) -> None:
    have = 0 if calib is None else int(calib.shape[0])
    if check and have < CHECK_SAMPLES:
        raise RankfoldError(f"the self-check needs at least {CHECK_SAMPLES} calibration samples (an eighth, 16 to "
                            f"128, is held back from planning); got {have}. Give more, or pass check=False "
                            "(--no-check) to accept an unchecked result")


def check_result(model, module, held, min_agreement, say, max_output_error: float = DEFAULT_MAX_OUTPUT_ERROR,
                 rules: tuple[CheckRule, ...] = ()) -> Agreement | None:
    if held is None:
        say("self-check skipped: fewer than 64 calibration samples, none held back")
        return None
    check = agreement(model, module, held, rules=rules)
    say("self-check: " + check.describe())
    refuse_if_poor(check, min_agreement, max_output_error, rules)
    return check
