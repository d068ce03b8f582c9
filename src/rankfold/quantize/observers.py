"""Activation range observers: min-max, percentile and MSE, all from one running histogram per
tensor, so calibration streams through batches in bounded memory."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from rankfold.quantize.core import ActivationParams, activation_params

BINS = 2048
# The histogram of one batch of one tensor counts at most about this many of its values (min and
# max see them all): a detector's activations at 32 samples are tens of millions of values, and
# counting them all made activation calibration most of YOLOv8n's compress time (44 %). A million
# values still place the 99.99th percentile on 100 of them.
HISTOGRAM_VALUES = 1 << 20


class RangeObserver:
    """Collects min, max and a histogram of one tensor over calibration batches. The histogram
    range is fixed by the first batch and widened (re-binned) when later batches exceed it."""

    def __init__(self) -> None:
        self.low = np.inf
        self.high = -np.inf
        self.hist: np.ndarray | None = None
        self.edges: np.ndarray | None = None

    def update(self, values: np.ndarray) -> None:
        v = np.asarray(values, dtype=np.float32)
        if v.size == 0:
            return
        lo, hi = float(v.min()), float(v.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):  # -inf padding before a max pool (SAME pads)
            v = v[np.isfinite(v)]
            if v.size == 0:
                return
            lo, hi = float(v.min()), float(v.max())
        self.low, self.high = min(self.low, lo), max(self.high, hi)
        if self.hist is None or lo < self.edges[0] or hi > self.edges[-1]:
            self._rebin(min(self.low, 0.0), max(self.high, 0.0) if self.high > self.low else self.low + 1e-6)
        sample, weight = histogram_sample(v)
        self.hist += weight * uniform_histogram(sample, float(self.edges[0]), float(self.edges[-1]))

    def _rebin(self, lo: float, hi: float) -> None:
        edges = np.linspace(lo, hi, BINS + 1)
        hist = np.zeros(BINS, np.float64)
        if self.hist is not None:  # move old counts to the bins holding their centres
            centres = 0.5 * (self.edges[1:] + self.edges[:-1])
            index = np.clip(np.searchsorted(edges, centres, side="right") - 1, 0, BINS - 1)
            np.add.at(hist, index, self.hist)
        self.hist, self.edges = hist, edges

    # -- the three ways to turn what was seen into (scale, zero point) ------------------------
    def minmax(self) -> ActivationParams:
        return activation_params(self.low, self.high)

    def percentile(self, pct: float = 99.99) -> ActivationParams:
        cdf = np.cumsum(self.hist) / max(self.hist.sum(), 1)
        lo = self.edges[int(np.searchsorted(cdf, (100 - pct) / 100))]
        hi = self.edges[min(int(np.searchsorted(cdf, pct / 100)) + 1, BINS)]
        return activation_params(lo, hi)

    def mse(self, candidates: int = 80) -> ActivationParams:
        """The clipping range, among min-max ranges shrunk by up to 1000x, whose quantize-dequantize
        round trip has the least squared error over the histogram (bin centres stand for their
        values: the 2048 bins are far finer than the 256 quantization steps)."""
        centres = 0.5 * (self.edges[1:] + self.edges[:-1])
        best, best_err = self.minmax(), np.inf
        for fraction in np.geomspace(1.0, 1e-3, candidates):
            params = activation_params(self.low * fraction, self.high * fraction)
            err = float(np.sum(self.hist * (params.dequantize(params.quantize(centres)) - centres) ** 2))
            if err < best_err:
                best, best_err = params, err
        return best


def uniform_histogram(values: np.ndarray, low: float, high: float, bins: int = BINS) -> np.ndarray:
    """Counts of `values` (all within [low, high]) in `bins` equal bins, as np.histogram counts them
    up to values within float32 rounding of an edge. np.histogram sorts the values first; equal
    bins need only a multiplication and one bincount."""
    index = ((values - np.float32(low)) * np.float32(bins / (high - low))).astype(np.int32)
    np.clip(index, 0, bins - 1, out=index)
    return np.bincount(index, minlength=bins).astype(np.float64)


def histogram_sample(values: np.ndarray, limit: int = HISTOGRAM_VALUES) -> tuple[np.ndarray, int]:
    """At most about `limit` of `values` (any shape), every k-th of the flattened array, and k
    (each counts for k values). k is a prime that does not divide the last axis, so every column
    of a map is sampled alike."""
    flat = values.reshape(-1)
    step = -(-flat.size // limit)
    if step <= 1:
        return flat, 1
    width = values.shape[-1] if values.ndim else 1
    while width % step == 0 or any(step % d == 0 for d in range(2, int(step ** 0.5) + 1)):
        step += 1
    return flat[::step], step


OBSERVERS: dict[str, Callable[[RangeObserver], ActivationParams]] = {
    "minmax": RangeObserver.minmax,
    "percentile": RangeObserver.percentile,
    "mse": RangeObserver.mse,
}
