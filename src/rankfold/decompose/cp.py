"""CP (canonical polyadic) of a convolution: 1x1 (I -> R), one depthwise 1-D convolution per
spatial axis, 1x1 (R -> O)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from rankfold.decompose._weighting import mode_product


class CPFactors(NamedTuple):
    """W[o,i,h,w] ~= sum_r last[o,r] first[r,i] spatial[0][r,h] spatial[1][r,w]."""

    first: Tensor  # (R, I)
    spatial: tuple[Tensor, ...]  # one (R, k_d) per spatial axis
    last: Tensor  # (O, R)

    @property
    def rank(self) -> int:
        return self.first.shape[0]

    def rebuild(self) -> Tensor:
        factors = [self.last, self.first.T, *[f.T for f in self.spatial]]
        return _cp_to_tensor(factors)


def cp_decompose(
    weight: Tensor,
    *,
    rank: int,
    input_sqrt: Tensor | None = None,
    max_iters: int = 100,
    tol: float = 1e-7,
    seed: int = 0,
) -> CPFactors:
    """Rank-`rank` CP of `weight` (O, I, *k) by ALS, at most `max_iters` sweeps.

    Initialisation: the leading singular vectors of each unfolding (deterministic), completed by
    seeded random columns where a mode is smaller than the rank. A small ridge keeps each
    least-squares step well posed. With `input_sqrt` the ALS fits W x_1 S (data-aware) and the
    input factor is finally re-solved against W itself: for fixed other factors its weighted and
    plain optima coincide, so S never needs inverting.
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"cp: rank must be a positive int, got {rank!r}")
    if max_iters < 1:
        raise ValueError(f"cp: max_iters must be >= 1, got {max_iters}")
    w = weight.detach().to(torch.float64)
    target = w if input_sqrt is None else mode_product(w, input_sqrt, 1)
    gen = torch.Generator().manual_seed(seed)
    factors = [_init_factor(target, mode, rank, gen) for mode in range(w.ndim)]
    norm = float(target.norm())
    prev_err = float("inf")
    for _ in range(max_iters):
        for mode in range(w.ndim):
            factors[mode] = _als_step(target, factors, mode)
        err = float((target - _cp_to_tensor(factors)).norm()) / max(norm, 1e-30)
        if abs(prev_err - err) < tol:
            break
        prev_err = err
    if input_sqrt is not None:
        factors[1] = _als_step(w, factors, 1)
    last, first_t, *spatial = factors
    dtype = weight.dtype
    return CPFactors(
        first=first_t.T.contiguous().to(dtype),
        spatial=tuple(f.T.contiguous().to(dtype) for f in spatial),
        last=last.to(dtype),
    )


def _cp_to_tensor(factors: list[Tensor]) -> Tensor:
    letters = "abcdefgh"[: len(factors)]
    spec = ",".join(f"{c}r" for c in letters) + "->" + letters
    return torch.einsum(spec, *factors)


def _init_factor(tensor: Tensor, mode: int, rank: int, gen: torch.Generator) -> Tensor:
    unfolded = tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)
    u, s, _ = torch.linalg.svd(unfolded, full_matrices=False)
    cols = min(rank, u.shape[1])
    init = u[:, :cols] * s[:cols].sqrt().clamp_min(1e-12)
    if cols < rank:
        scale = float(init.abs().mean()) if init.numel() else 1.0
        extra = torch.randn(tensor.shape[mode], rank - cols, generator=gen, dtype=tensor.dtype) * scale
        init = torch.cat([init, extra], dim=1)
    return init


def _als_step(tensor: Tensor, factors: list[Tensor], mode: int) -> Tensor:
    others = [f for m, f in enumerate(factors) if m != mode]
    gram = torch.ones(factors[0].shape[1], factors[0].shape[1], dtype=tensor.dtype)
    for f in others:
        gram = gram * (f.T @ f)
    letters = "bcdefgh"[: len(others)]
    spec = "a" + letters + "," + ",".join(f"{c}r" for c in letters) + "->ar"
    mttkrp = torch.einsum(spec, tensor.movedim(mode, 0), *others)
    ridge = 1e-10 * float(gram.diagonal().mean().clamp_min(1e-30))
    eye = torch.eye(gram.shape[0], dtype=tensor.dtype)
    return torch.linalg.solve(gram + ridge * eye, mttkrp.T).T
