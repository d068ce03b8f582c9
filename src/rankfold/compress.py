"""compress(): the front door. Uniform mode goes to the apply stage (rankfold.apply), planned mode
to the planner's pipeline; the calibration passes of both run under one memory budget."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping

from torch import Tensor, nn

from rankfold.apply import Progress
from rankfold.config import MethodConfig
from rankfold.errors import RankfoldError
from rankfold.host_memory import memory_scope
from rankfold.planner.pipeline import compress_to_budget
from rankfold.robustness import AttackConfig, adversarial_calibration
from rankfold.settings import DEFAULT_MIN_AGREEMENT, DEFAULT_MIN_RANK
from rankfold.uniform import compress_uniform


def compress(
    model: nn.Module,
    *,
    method: str | None = None,
    keep: float | None = None,
    calib: Tensor | None = None,
    layers: Mapping[str, MethodConfig] | None = None,
    min_rank: int = DEFAULT_MIN_RANK,
    progress: Progress | None = None,
    target: str | None = None,
    max_params: str | float | None = None,
    max_weight_bytes: str | float | None = None,
    max_macs: str | float | None = None,
    max_latency: str | float | None = None,
    max_ram: str | float | None = None,
    bits: str | int | None = None,
    min_agreement: float | None = None,
    max_memory: int | None = None,
    check: bool | None = None,
    preserve_robustness: AttackConfig | None = None,
) -> nn.Module:
    """A compressed copy of `model`; the input model is not modified.

    Planned mode (any of target / max_*): the planner chooses each layer's method and rank under
    the budgets (values like "10%", "300k", "2MB", "1.5ms"; max_latency in ms) and the target's
    limits, applies the plan, and checks the result on held-back calibration samples, raising
    RankfoldError when top-1 agreement falls below `min_agreement`. The plan is attached as
    `result.rankfold_plan`, the self-check as `result.rankfold_check`. `method`, `keep` and `layers`
    set a uniform compression: given with a target or budget they are refused, as on the CLI.
    The check needs 64 calibration samples; with fewer it is an error unless check=False.
    `bits` ("auto", 32, 8, 4) lets the plan quantize weights; the module returned is float.
    rankfold.compress_to_budget (planned) and rankfold.compress_uniform (checked uniform mode) run
    the same path and return a Compressed (module, plan, report, check) whose save(path) writes the
    float or QDQ file exactly as the CLI does, the QDQ file checked again on the held-back samples.

    Uniform mode (otherwise): float weights (`bits` is refused); check=True compares the result
    with the original on the calibration samples (16 at least) and refuses it below
    `min_agreement`, as the CLI does; by default (check=None) planned mode checks and uniform
    mode does not.

    Parameters
    ----------
    method: "svd", "tucker2" (default), "cp", "spatial-svd" or "auto" (the lowest-error method per layer).
    keep: fraction of each compressible layer's parameters kept, in (0, 1] (default 0.5).
    calib: example inputs (N, ...); when given the data-aware decompositions are used.
    layers: per-layer overrides, {fnmatch pattern on the module name: config}; first match wins.
        Configs: SVDConfig, Tucker2Config, CPConfig, SpatialSVDConfig, AutoConfig, SkipConfig.
    min_rank: a layer whose rank at `keep` would fall below this (or below its full rank, when
        that is smaller) is left alone and reported; explicit ranks in `layers` are exempt.

    The per-layer record is attached as `result.rankfold_report` (a CompressionReport).

    max_memory: bytes of peak memory to stay under (default half the memory available): passes
    over `calib` run in batches small enough for it; RankfoldError before any work when even one
    sample would not fit.

    preserve_robustness: calibrate on PGD inputs crafted on the original (at the config's largest
    eps, against its own top-1) as well as on `calib` (rankfold.robustness.adversarial_calibration).
    """
    if preserve_robustness is not None:
        if calib is None:
            raise RankfoldError("preserve_robustness crafts PGD inputs from the calibration samples: give calib")
        calib = adversarial_calibration(model, calib, preserve_robustness)
    with _memory_scope(model, calib, max_memory):
        budgets = {q: v for q, v in (("params", max_params), ("weight_bytes", max_weight_bytes), ("macs", max_macs),
                                     ("latency_ms", max_latency), ("ram_bytes", max_ram)) if v is not None}
        if target is not None or budgets:
            mixed = [name for name, value in (("method", method), ("keep", keep), ("layers", layers))
                     if value is not None]
            if mixed:
                raise RankfoldError(f"{', '.join(mixed)} set a uniform compression; target and max_* let the planner "
                                    "choose per layer: use one or the other")
            if not isinstance(model, nn.Module):
                raise RankfoldError(f"model must be a torch.nn.Module, got {type(model).__name__}")
            # Planning runs the network many times; a copy in eval mode keeps the caller's module, its
            # mode and its buffers (BatchNorm running statistics) exactly as they were.
            model = copy.deepcopy(model).eval()
            result = compress_to_budget(model, calib=calib, target=target or "host", budgets=budgets,
                                        min_rank=min_rank, bits="auto" if bits is None else bits,
                                        min_agreement=DEFAULT_MIN_AGREEMENT if min_agreement is None else min_agreement,
                                        check=True if check is None else check, progress=progress)
            compressed = result.module
            compressed.rankfold_plan, compressed.rankfold_check = result.plan, result.check
            compressed.rankfold_report = result.report
            return compressed
        if bits is not None:
            raise RankfoldError("bits is the planner's (give a target or a max_* budget); uniform mode keeps float "
                                "weights")
        if min_agreement is not None and not check:
            raise RankfoldError("min_agreement is the self-check's: uniform mode checks only with check=True")
        result = compress_uniform(model, method=method or "tucker2", keep=0.5 if keep is None else keep,
                                  calib=calib, layers=layers, min_rank=min_rank, check=bool(check),
                                  min_agreement=DEFAULT_MIN_AGREEMENT if min_agreement is None else min_agreement,
                                  progress=progress)
        result.module.rankfold_report = result.report
        return result.module



def _memory_scope(model, calib, max_memory: int | None):
    """Calibration passes in the batches, and with the graph-state headroom, that keep the run under
    `max_memory`, chosen as the CLI chooses them (data-free: nothing to do)."""
    if not isinstance(calib, Tensor) or not isinstance(model, nn.Module):
        return contextlib.nullcontext()  # compress_uniform / compress_to_budget say what is wrong
    return memory_scope(model, calib[:2], calib, max_memory)
