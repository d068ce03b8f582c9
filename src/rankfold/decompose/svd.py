"""Truncated SVD of a Linear or convolution weight: one narrow layer, then a 1x1 / Linear."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from rankfold.decompose._weighting import low_rank_rows


class SVDFactors(NamedTuple):
    """W (O, I, *k) ~= last @ first: `first` (r, I, *k) keeps the kernel, `last` (O, r) is 1x1."""

    first: Tensor
    last: Tensor

    @property
    def rank(self) -> int:
        return self.first.shape[0]

    def rebuild(self) -> Tensor:
        """The approximated weight, shape (O, I, *k)."""
        flat = self.last @ self.first.reshape(self.rank, -1)
        return flat.reshape(self.last.shape[0], *self.first.shape[1:])


def max_svd_rank(weight_shape: tuple[int, ...]) -> int:
    """Largest meaningful rank for a weight of this shape."""
    out_ch, in_ch, *kernel = weight_shape
    return min(out_ch, in_ch * int(torch.Size(kernel).numel()))


def svd_decompose(weight: Tensor, *, rank: int, input_sqrt: Tensor | None = None) -> SVDFactors:
    """Rank-`rank` SVD of `weight` (O, I) or (O, I, *k).

    Parameters
    ----------
    weight: the layer's weight; a convolution keeps its kernel in the first factor.
    rank: number of intermediate channels, 1 <= rank <= min(O, I * prod(k)).
    input_sqrt: S = Sigma^(1/2) over the input channels (I x I) for the data-aware variant,
        which minimises ||(W - W~) S||_F; None for the plain weight error.
    """
    _check_rank(rank, max_svd_rank(tuple(weight.shape)), "svd")
    w64 = weight.detach().to(torch.float64)
    w3 = w64.reshape(w64.shape[0], w64.shape[1], -1)
    factors = low_rank_rows(w3, rank, input_sqrt)
    first = factors.first.reshape(rank, *weight.shape[1:])
    return SVDFactors(first=first.to(weight.dtype), last=factors.last.to(weight.dtype))


def _check_rank(rank: int, max_rank: int, method: str) -> None:
    if not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise ValueError(f"{method}: rank must be an int in [1, {max_rank}], got {rank!r}")
