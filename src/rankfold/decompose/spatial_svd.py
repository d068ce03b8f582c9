"""Spatial SVD of a KhxKw convolution: a Kh x 1 convolution (I -> r), then 1 x Kw (r -> O)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from rankfold.decompose._weighting import low_rank_rows
from rankfold.decompose.svd import _check_rank


class SpatialSVDFactors(NamedTuple):
    """W[o,i,h,w] ~= sum_k second[o,k,0,w] * first[k,i,h,0]."""

    first: Tensor  # (r, I, Kh, 1)
    second: Tensor  # (O, r, 1, Kw)

    @property
    def rank(self) -> int:
        return self.first.shape[0]

    def rebuild(self) -> Tensor:
        return torch.einsum("okw,kih->oihw", self.second[:, :, 0, :], self.first[..., 0])


def max_spatial_rank(weight_shape: tuple[int, ...]) -> int:
    out_ch, in_ch, kh, kw = weight_shape
    return min(in_ch * kh, out_ch * kw)


def spatial_svd_decompose(
    weight: Tensor, *, rank: int, input_sqrt: Tensor | None = None
) -> SpatialSVDFactors:
    """Rank-`rank` spatial SVD of a 2-D convolution weight (O, I, Kh, Kw).

    The weight is read as a matrix with rows (o, w) and columns (i, h); `input_sqrt` weights the
    input-channel mode of the columns (data-aware variant).
    """
    if weight.ndim != 4:
        raise ValueError(f"spatial SVD needs a 2-D convolution weight, got shape {tuple(weight.shape)}")
    _check_rank(rank, max_spatial_rank(tuple(weight.shape)), "spatial-svd")
    out_ch, in_ch, kh, kw = weight.shape
    rows = weight.detach().to(torch.float64).permute(0, 3, 1, 2).reshape(out_ch * kw, in_ch, kh)
    factors = low_rank_rows(rows, rank, input_sqrt)
    first = factors.first.reshape(rank, in_ch, kh, 1)
    second = factors.last.reshape(out_ch, kw, rank).permute(0, 2, 1).reshape(out_ch, rank, 1, kw)
    return SpatialSVDFactors(first=first.to(weight.dtype), second=second.contiguous().to(weight.dtype))
