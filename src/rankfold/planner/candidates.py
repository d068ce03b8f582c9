"""Candidate ranks per layer and their estimated loss, in closed form (no factorization run).

Loss of a candidate = 1/2 sum_c G_c ||E_c||^2, where E = (W - W~) S is the data-weighted error
of the approximation (S = Sigma^(1/2) over input channels, as the data-aware decompositions
use) and G the layer's output sensitivity (see sensitivity.py). One SVD per layer and method
gives the loss of every rank at once.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from rankfold.decompose import sqrt_psd
from rankfold.decompose._weighting import mode_product
from rankfold.layers import LayerSpec
from rankfold.methods import Rank

LossFn = Callable[[Tensor, Tensor, Tensor, list[Rank]], list[float]]


def _weighted(weight: Tensor, input_sqrt: Tensor) -> Tensor:
    w = weight.detach().to(torch.float64)
    w3 = w.reshape(w.shape[0], w.shape[1], -1)
    return mode_product(w3, input_sqrt, 1)


def _tail_losses(matrix: Tensor, row_weights: Tensor, ranks: list[int]) -> list[float]:
    """1/2 sum_{j >= r} s_j^2 (row_weights . u_j^2) for each r: the row-weighted error of keeping
    the leading r left singular directions of `matrix`."""
    u, s, _ = torch.linalg.svd(matrix, full_matrices=False)
    per_direction = (s * s) * (row_weights @ (u * u))
    tails = torch.flip(torch.cumsum(torch.flip(per_direction, [0]), 0), [0])
    tails = torch.cat([tails, tails.new_zeros(1)])
    return [0.5 * float(tails[min(r, len(s))]) for r in ranks]


def svd_losses(weight: Tensor, input_sqrt: Tensor, sensitivity: Tensor, ranks: list[Rank]) -> list[float]:
    weighted = _weighted(weight, input_sqrt)
    return _tail_losses(weighted.reshape(weighted.shape[0], -1), sensitivity, [r[0] for r in ranks])


def spatial_svd_losses(weight: Tensor, input_sqrt: Tensor, sensitivity: Tensor, ranks: list[Rank]) -> list[float]:
    out_ch, in_ch, kh, kw = weight.shape
    rows = weight.detach().to(torch.float64).permute(0, 3, 1, 2).reshape(out_ch * kw, in_ch, kh)
    weighted = mode_product(rows, input_sqrt, 1).reshape(out_ch * kw, -1)
    return _tail_losses(weighted, sensitivity.repeat_interleave(kw), [r[0] for r in ranks])


def tucker2_losses(weight: Tensor, input_sqrt: Tensor, sensitivity: Tensor, ranks: list[Rank]) -> list[float]:
    """HOSVD estimate (the HOOI sweeps that follow only lower it): with U the output-mode and V the
    input-mode singular vectors of W S, the error of row c is ||(W S)_c||^2 - ||(U U^T Z)_c||^2,
    Z = W S projected on V; both bases are nested, so every rank pair reuses one SVD each."""
    weighted = _weighted(weight, input_sqrt)  # (O, I, k)
    out_ch, in_ch, taps = weighted.shape
    u_out = torch.linalg.svd(weighted.reshape(out_ch, -1), full_matrices=False)[0]
    v_in = torch.linalg.svd(weighted.permute(1, 0, 2).reshape(in_ch, -1), full_matrices=False)[0]
    coords = mode_product(weighted, v_in, 1)  # (O, I', k): coordinates in the ordered V basis
    row_norms = (weighted * weighted).sum((1, 2))
    losses = []
    for r_in, r_out in ranks:
        z = coords[:, :r_in].reshape(out_ch, -1)
        basis = u_out[:, :r_out]
        kept = basis @ (basis.T @ z)
        err = (row_norms - (kept * kept).sum(1)).clamp_min(0)
        losses.append(0.5 * float(sensitivity @ err))
    return losses


LOSS_ESTIMATORS: dict[str, LossFn] = {
    "svd": svd_losses,
    "tucker2": tucker2_losses,
    "spatial-svd": spatial_svd_losses,
}


def input_weighting(moment: Tensor | None, in_ch: int) -> Tensor:
    """S = Sigma^(1/2); the identity when no calibration data is given."""
    if moment is None:
        return torch.eye(in_ch, dtype=torch.float64)
    return sqrt_psd(moment)


def _aligned(value: float, multiple: int, top: int) -> int:
    aligned = max(multiple, int(round(value / multiple)) * multiple)
    return min(aligned, top) if aligned > top else aligned


def candidate_ranks(method, spec: LayerSpec, *, multiple: int, min_rank: int, points: int = 16) -> list[Rank]:
    """Up to `points` ranks of `method` for this layer, rounded to `multiple`, at least `min_rank`
    (or the full rank where that is smaller), each saving parameters; spread geometrically in size."""
    full = method.rank_ladder(spec)
    top = full[-1]
    floor = tuple(min(min_rank, t) for t in top)
    valid: dict[Rank, int] = {}
    for rank in full:
        lead = rank[-1]  # Tucker-2 ladders are indexed by r_out; the others by their single rank
        if lead % multiple and lead != top[-1]:
            continue
        if len(rank) == 2:  # (r_in, r_out): align r_in too, keep it within the layer
            rank = (min(_aligned(rank[0], multiple, top[0]), top[0]), rank[1])
        if any(r < f for r, f in zip(rank, floor)):
            continue
        cost = method.factor_params(spec, rank)
        if cost < spec.weight_params:
            valid[rank] = cost
    if len(valid) <= points:
        return sorted(valid, key=valid.get)
    ordered = sorted(valid, key=valid.get)
    costs = np.array([valid[r] for r in ordered], dtype=float)
    targets = np.geomspace(costs[0], costs[-1], points)
    picked = sorted({int(np.abs(costs - t).argmin()) for t in targets})
    return [ordered[i] for i in picked]
