"""Uniform mode: one method and one kept fraction for every layer (with per-layer overrides),
applied and checked against the original on the calibration samples."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from rankfold.apply import Progress, compress_with_report
from rankfold.config import MethodConfig
from rankfold.errors import RankfoldError
from rankfold.result import Compressed
from rankfold.selfcheck import CheckRule, agreement, refuse_if_poor
from rankfold.settings import DEFAULT_MAX_OUTPUT_ERROR, DEFAULT_MIN_AGREEMENT, DEFAULT_MIN_RANK

CHECK_SAMPLES = 16  # uniform mode checks on the calibration samples themselves


def compress_uniform(
    model: nn.Module,
    *,
    method: str = "tucker2",
    keep: float = 0.5,
    calib: Tensor | None = None,
    layers: Mapping[str, MethodConfig] | None = None,
    min_rank: int = DEFAULT_MIN_RANK,
    check: bool = True,
    rules: tuple[CheckRule, ...] = (),
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    max_output_error: float = DEFAULT_MAX_OUTPUT_ERROR,
    example_input: Tensor | None = None,
    progress: Progress | None = None,
) -> Compressed:
    """Every compressible layer factorized by `method` at `keep` of its parameters (see
    compress()). With `check` (the default) the result is compared with the original on every
    output over the calibration samples (fitting saw them too: uniform mode holds none back) and
    refused below `min_agreement`; a check that cannot run (fewer than 16 samples) is an error
    before any work."""
    have = 0 if calib is None else len(calib)
    if check and have < CHECK_SAMPLES:
        raise RankfoldError(f"the self-check needs at least {CHECK_SAMPLES} calibration samples (uniform mode checks "
                            f"on the calibration samples); got {have}. Give more, or pass check=False (--no-check) "
                            "to accept an unchecked result")
    module, report = compress_with_report(model, method=method, keep=keep, calib=calib, layers=layers,
                                          min_rank=min_rank, progress=progress)
    verdict = None
    if check:
        verdict = agreement(model, module, calib, where="calibration samples (fitting used them too)", rules=rules)
        refuse_if_poor(verdict, min_agreement, max_output_error, rules)
    return Compressed(module, report, verdict, model, calib, None, example_input, min_agreement, max_output_error,
                      rules)
