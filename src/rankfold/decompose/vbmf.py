"""Data-free rank estimate: empirical variational Bayesian matrix factorization (EVBMF).

For a matrix Y = U V^T + noise, the global analytic VB solution (Nakajima, Sugiyama, Babacan and
Tomioka, JMLR 2013) keeps exactly the singular values above a threshold that depends on the
noise variance sigma^2; sigma^2 itself is chosen by minimising the free energy, a 1-D problem
solved here by golden-section search between the paper's bounds. The number of kept singular
values is the rank estimate.
"""

from __future__ import annotations

import math

import numpy as np

TAU_BAR_FACTOR = 2.5129  # tau_bar = 2.5129 sqrt(alpha): where the VB solution starts to be non-zero


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    shifted = x - (1 + alpha)
    return 0.5 * (shifted + np.sqrt(np.maximum(shifted * shifted - 4 * alpha, 0.0)))


def _free_energy(sigma2: float, rows: int, cols: int, s: np.ndarray, residual: float, x_bar: float) -> float:
    alpha = rows / cols
    x = s * s / (cols * sigma2)
    big, small = x[x > x_bar], x[(x <= x_bar) & (x > 0)]
    tau_big = _tau(big, alpha)
    energy = np.sum(small - np.log(small)) + np.sum(big - tau_big) + np.sum(np.log((tau_big + 1) / big))
    energy += alpha * np.sum(np.log(tau_big / alpha + 1))
    energy += residual / (cols * sigma2) + (rows - len(s)) * math.log(sigma2)
    return float(energy)


def _golden_min(f, low: float, high: float, iters: int = 80) -> float:
    ratio = (math.sqrt(5) - 1) / 2
    a, b = low, high
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    return 0.5 * (a + b)


def evbmf_rank(matrix: np.ndarray) -> int:
    """The EVBMF rank of a 2-D matrix (at least 1)."""
    y = np.asarray(matrix, dtype=np.float64)
    if y.ndim != 2 or min(y.shape) == 0:
        raise ValueError(f"evbmf_rank needs a non-empty 2-D matrix, got shape {y.shape}")
    if y.shape[0] > y.shape[1]:
        y = y.T
    rows, cols = y.shape
    if rows == 1:
        return 1
    s = np.linalg.svd(y, compute_uv=False)
    total = float(np.sum(y * y))
    if total <= 0:
        return 1
    alpha = rows / cols
    tau_bar = TAU_BAR_FACTOR * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    residual = max(total - float(np.sum(s * s)), 0.0)
    edge = int(min(math.ceil(rows / (1 + alpha)) - 1, rows)) - 1
    edge = max(0, min(edge, len(s) - 2))
    upper = (float(np.sum(s * s)) + residual) / (rows * cols)
    lower = max(s[edge + 1] ** 2 / (cols * x_bar), float(np.mean(s[edge + 1 :] ** 2)) / cols, 1e-30 * upper)
    if lower >= upper:
        sigma2 = upper
    else:
        sigma2 = _golden_min(lambda v: _free_energy(v, rows, cols, s, residual, x_bar), lower, upper)
    threshold = math.sqrt(cols * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar))
    return max(1, int(np.sum(s > threshold)))
