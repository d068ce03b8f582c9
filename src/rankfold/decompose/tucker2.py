"""Tucker-2 of a convolution: 1x1 (I -> r_in), K core (r_in -> r_out), 1x1 (r_out -> O)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from rankfold.decompose._weighting import input_subspace, mode_product, top_left_vectors


class Tucker2Factors(NamedTuple):
    """W ~= core x_0 last x_1 first^T, i.e. W[o,i,..] = sum last[o,l] core[l,k,..] first[k,i]."""

    first: Tensor  # (r_in, I)
    core: Tensor  # (r_out, r_in, *k)
    last: Tensor  # (O, r_out)

    @property
    def ranks(self) -> tuple[int, int]:
        return self.core.shape[1], self.core.shape[0]

    def rebuild(self) -> Tensor:
        inner = mode_product(self.core, self.first, 1)
        return mode_product(inner, self.last.T, 0)


def max_tucker2_ranks(weight_shape: tuple[int, ...]) -> tuple[int, int]:
    """(max r_in, max r_out) for a weight of this shape."""
    out_ch, in_ch, *kernel = weight_shape
    spatial = int(torch.Size(kernel).numel())
    return min(in_ch, out_ch * spatial), min(out_ch, in_ch * spatial)


def tucker2_decompose(
    weight: Tensor,
    *,
    ranks: tuple[int, int],
    input_sqrt: Tensor | None = None,
    als_iters: int = 0,
) -> Tucker2Factors:
    """Tucker-2 of `weight` (O, I, *k) with ranks (r_in, r_out): HOSVD, then `als_iters` HOOI sweeps.

    `input_sqrt` (S = Sigma^(1/2), I x I) selects the data-aware variant, which minimises
    ||(W - W~) x_1 S||_F; the input factor is then an oblique projection computed without S^-1.
    """
    r_in, r_out = ranks
    max_in, max_out = max_tucker2_ranks(tuple(weight.shape))
    if not (isinstance(r_in, int) and isinstance(r_out, int) and 1 <= r_in <= max_in and 1 <= r_out <= max_out):
        raise ValueError(f"tucker2: ranks (r_in, r_out) must lie in [1, {max_in}] x [1, {max_out}], got {ranks!r}")
    if als_iters < 0:
        raise ValueError(f"tucker2: als_iters must be >= 0, got {als_iters}")
    w = weight.detach().to(torch.float64)
    out_ch, in_ch = w.shape[:2]
    weighted = w if input_sqrt is None else mode_product(w, input_sqrt, 1)
    last, _ = top_left_vectors(weighted.reshape(out_ch, -1), r_out)
    sub = _input_side(w, last, r_in, input_sqrt)
    for _ in range(als_iters):
        reduced = mode_product(w, sub.lift, 1)  # (O, r_in, *k)
        last, _ = top_left_vectors(reduced.reshape(out_ch, -1), r_out)
        sub = _input_side(w, last, r_in, input_sqrt)
    core = mode_product(mode_product(w, last, 0), sub.lift, 1)
    dtype = weight.dtype
    return Tucker2Factors(first=sub.project.to(dtype), core=core.to(dtype), last=last.to(dtype))


def _input_side(w: Tensor, last: Tensor, r_in: int, input_sqrt: Tensor | None):
    # Rows: (r_out, *k) of the weight with its output mode already projected; columns: I.
    projected = mode_product(w, last, 0).movedim(1, -1)
    matrix = projected.reshape(-1, w.shape[1])
    rank = min(r_in, matrix.shape[0])
    sub = input_subspace(matrix, rank, input_sqrt)
    if rank < r_in:  # fewer rows than the asked rank: pad with inert channels
        pad = r_in - rank
        sub = sub._replace(
            project=torch.cat([sub.project, sub.project.new_zeros(pad, w.shape[1])]),
            lift=torch.cat([sub.lift, sub.lift.new_zeros(w.shape[1], pad)], dim=1),
        )
    return sub
