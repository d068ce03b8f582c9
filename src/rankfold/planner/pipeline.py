"""Plan, apply, check: the whole budgeted compression, as the CLI and compress() run it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from rankfold.compress import CompressionReport
from rankfold.errors import RankfoldError
from rankfold.planner.plan import Plan, apply_plan, make_plan
from rankfold.selfcheck import (
    DEFAULT_MAX_OUTPUT_ERROR,
    DEFAULT_MIN_AGREEMENT,
    Agreement,
    agreement,
    refuse_if_poor,
    split_holdout,
)
from rankfold.target import Target


@dataclass
class Budgeted:
    module: nn.Module
    plan: Plan
    report: CompressionReport
    check: Agreement | None


def compress_to_budget(
    model: nn.Module,
    *,
    calib: Tensor | None,
    target: str | Target = "host",
    budgets: Mapping[str, object] | None = None,
    example_input: Tensor | None = None,
    min_rank: int = 8,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    max_output_error: float = DEFAULT_MAX_OUTPUT_ERROR,
    onnx_path: str | None = None,
    bits: str | int = "auto",
    progress: Callable[[str], None] | None = None,
) -> Budgeted:
    say = progress or (lambda _m: None)
    fit, held = split_holdout(calib) if calib is not None else (None, None)
    plan = make_plan(model, calib=fit, example_input=example_input, target=target, budgets=budgets or {},
                     min_rank=min_rank, onnx_path=onnx_path, bits=bits, progress=say)
    if not plan.feasible:
        raise RankfoldError("the budgets cannot be met: " + "; ".join(m for m in plan.messages if "cannot" in m))
    module, report = apply_plan(model, plan, calib=fit, progress=say)
    return Budgeted(module, plan, report, check_result(model, module, held, min_agreement, say, max_output_error))


def apply_and_check(model: nn.Module, plan: Plan, *, calib: Tensor | None, min_agreement: float,
                    max_output_error: float = DEFAULT_MAX_OUTPUT_ERROR,
                    progress: Callable[[str], None] | None = None) -> Budgeted:
    """apply_plan with the calibration split exactly as planning split it, then the self-check."""
    say = progress or (lambda _m: None)
    fit, held = split_holdout(calib) if calib is not None else (None, None)
    module, report = apply_plan(model, plan, calib=fit, progress=say)
    return Budgeted(module, plan, report, check_result(model, module, held, min_agreement, say, max_output_error))


def check_result(model, module, held, min_agreement, say,
                 max_output_error: float = DEFAULT_MAX_OUTPUT_ERROR) -> Agreement | None:
    if held is None:
        say("self-check skipped: fewer than 64 calibration samples, none held back")
        return None
    check = agreement(model, module, held)
    say("self-check: " + check.describe())
    refuse_if_poor(check, min_agreement, max_output_error)
    return check


def write_result(
    result: Budgeted,
    original: nn.Module,
    path: str,
    *,
    calib: Tensor | None,
    example_input: Tensor,
    observer: str = "percentile",
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    max_output_error: float = DEFAULT_MAX_OUTPUT_ERROR,
    progress: Callable[[str], None] | None = None,
) -> Agreement | None:
    """Write the ONNX file: float, or QDQ when the plan quantizes any layer. A quantized file is
    checked against the original on the held-back samples before it takes `path`."""
    import os
    import tempfile

    from rankfold.export.onnx import export_onnx
    from rankfold.io import replace_atomically
    from rankfold.quantize.export import export_quantized
    from rankfold.selfcheck import onnx_agreement, refuse_if_kernels_disagree

    say = progress or (lambda _m: None)
    if not result.plan.quantized:
        export_onnx(result.module, path, example_input=example_input)
        return result.check
    if calib is None:
        raise RankfoldError("a quantized plan needs calibration data (activation ranges)")
    fit, held = split_holdout(calib)
    # A result that onnxruntime runs is checked as users run it (default session); one for the C
    # back-end in onnxruntime's reference arithmetic, which the C computes (within a unit per op).
    in_onnxruntime = result.plan.runtime == "onnxruntime"
    # Built and checked in the system's temporary directory: only a checked model is written beside
    # `path`, under a unique name renamed into place.
    with tempfile.TemporaryDirectory(prefix="rankfold-") as scratch:
        partial = os.path.join(scratch, "quantized.onnx")
        export_quantized(result.module, result.plan.layer_bits(), partial, calib=fit, example_input=example_input,
                         observer=observer, reduce_range=result.plan.reduce_range, progress=say)
        check = result.check
        if in_onnxruntime:
            refuse_if_kernels_disagree(partial, held if held is not None else fit, say)
        if held is not None:
            check = onnx_agreement(original, partial, held, optimized=in_onnxruntime)
            path_used = "onnxruntime default session" if in_onnxruntime else "onnxruntime reference arithmetic"
            say(f"self-check (quantized, {path_used}): " + check.describe())
            refuse_if_poor(check, min_agreement, max_output_error)
        with open(partial, "rb") as handle:
            replace_atomically(path, handle.read())
        return check
