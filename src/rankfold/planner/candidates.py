"""Candidate ranks per layer and the price of their loss.

Loss of a candidate = 1/2 sum_c G_c ||E_c||^2, where E = (W - W~) S is the data-weighted error
of the approximation (S = Sigma^(1/2) over input channels, as the data-aware decompositions
use) and G the layer's output sensitivity (see sensitivity.py). A method with a closed form
(its estimate_losses) gets every rank from one SVD; any other is factorized per candidate.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from rankfold.decompose import sqrt_psd
from rankfold.layers import LayerSpec
from rankfold.methods import Method, Rank
from rankfold.methods.base import weighted_weight

# Candidates priced by factorizing them (a method without a closed-form estimate): fewer of them.
FACTORIZED_POINTS = 8


def factorized_losses(method: Method, layer: nn.Module, input_sqrt: Tensor, sensitivity: Tensor,
                      ranks: list[Rank]) -> list[float]:
    """The same loss, 1/2 sum_c G_c ||((W - W~) S)_c||^2, for a method with no closed form: each
    rank is factorized (data-aware, as it would be applied) and its error measured."""
    weight = layer.weight.detach().to(torch.float64)
    losses = []
    for rank in ranks:
        approx = method.factorize(layer, rank, input_sqrt, method.config(list(rank))).approx_weight
        error = weighted_weight(weight - approx.detach().to(torch.float64).reshape(weight.shape), input_sqrt)
        losses.append(0.5 * float(sensitivity @ (error * error).sum((1, 2))))
    return losses


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
