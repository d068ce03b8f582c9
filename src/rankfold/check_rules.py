"""The self-check's rules (`--check [OUTPUT=]METRIC[@LEVEL]:THRESHOLD`), kept free of torch so
that the command line parses them without importing it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rankfold.errors import RankfoldError

# What the self-check measures on each output, and which way is better. Every metric is computed on
# every output; the check compares one per output (its kind's default, or a --check rule).
HIGHER_IS_BETTER = {"top1": True, "sequence": True, "cosine": True, "iou": True, "relerr": False,
                    "perplexity": False, "kl": False}
METRICS = tuple(HIGHER_IS_BETTER)
DEFAULT_IOU_AT = 0.5


@dataclass(frozen=True)
class CheckRule:
    """`--check [OUTPUT=]METRIC[@AT]:THRESHOLD`: output (name or index; None for every output),
    metric, its binarization level (iou only) and the threshold."""

    metric: str
    threshold: float
    output: str | None = None
    at: float | None = None

    @property
    def key(self) -> str:
        return f"iou@{self.at:g}" if self.metric == "iou" else self.metric

    def describe(self) -> str:
        sign = ">=" if HIGHER_IS_BETTER[self.metric] else "<="
        return f"{self.key} {sign} {self.threshold:g}"


def parse_check_rule(text: str) -> CheckRule:
    """'relerr:0.1', 'iou@0.3:0.95', 'softmax_0=top1:0.9' -> CheckRule; RankfoldError otherwise."""
    output, _, body = text.rpartition("=")
    metric, sep, threshold = body.partition(":")
    metric, _, at = metric.partition("@")
    expected = (f"expected [OUTPUT=]METRIC:THRESHOLD with METRIC one of {', '.join(METRICS)} (iou may take a "
                "level: iou@0.3:0.95)")
    if not sep or metric not in HIGHER_IS_BETTER or (at and metric != "iou"):
        raise RankfoldError(f"--check {text!r}: {expected}")
    try:
        value, level = float(threshold), float(at) if at else (DEFAULT_IOU_AT if metric == "iou" else None)
    except ValueError:
        raise RankfoldError(f"--check {text!r}: {expected}") from None
    if not math.isfinite(value) or value < 0 or (HIGHER_IS_BETTER[metric] and value > 1):
        raise RankfoldError(f"--check {text!r}: the threshold must be a finite number"
                            f"{' in [0, 1]' if HIGHER_IS_BETTER[metric] else ' >= 0'}")
    if level is not None and not math.isfinite(level):
        raise RankfoldError(f"--check {text!r}: the iou level must be a finite number")
    return CheckRule(metric, value, output or None, level)
