"""Spatial SVD: a Kx1 convolution (I -> r), then a 1xK one (r -> O)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rankfold.config import VBMF, SpatialSVDConfig
from rankfold.decompose import max_spatial_rank, spatial_svd_decompose
from rankfold.decompose._weighting import mode_product
from rankfold.decompose.vbmf import evbmf_rank
from rankfold.layers import LayerSpec, LowRank, conv_like, numeric_padding
from rankfold.methods.base import Factorized, Rank, copy_bias, tail_losses


class SpatialSVDMethod:
    name = "spatial-svd"
    config_type = SpatialSVDConfig
    rank_count = 1
    auto_max_work = None

    def config(self, ranks):
        return SpatialSVDConfig(rank=ranks[0])

    def vbmf_config(self) -> SpatialSVDConfig:
        return SpatialSVDConfig(rank=VBMF)

    def estimate_losses(self, weight: Tensor, input_sqrt: Tensor, sensitivity: Tensor,
                        ranks: list[Rank]) -> list[float]:
        """The tail of the spectrum of W S unfolded as (O kw, I kh), each row weighted by its output."""
        out_ch, in_ch, kh, kw = weight.shape
        rows = weight.detach().to(torch.float64).permute(0, 3, 1, 2).reshape(out_ch * kw, in_ch, kh)
        weighted = mode_product(rows, input_sqrt, 1).reshape(out_ch * kw, -1)
        return tail_losses(weighted, sensitivity.repeat_interleave(kw), [r[0] for r in ranks])

    def unsupported(self, spec: LayerSpec, layer: nn.Module) -> str | None:
        if spec.kind != "conv2d" or min(spec.kernel) < 2:
            return "spatial-svd needs a 2-D kernel of at least 2x2"
        if numeric_padding(layer) is None:
            return "padding='same' with an odd total cannot be split across two convolutions"
        return None

    def rank_ladder(self, spec: LayerSpec) -> list[Rank]:
        return [(r,) for r in range(1, max_spatial_rank((spec.out_ch, spec.in_ch, *spec.kernel)) + 1)]

    def factor_params(self, spec: LayerSpec, rank: Rank) -> int:
        kh, kw = spec.kernel
        return rank[0] * (spec.in_ch * kh + spec.out_ch * kw)

    def config_rank(self, config: SpatialSVDConfig) -> Rank | str | None:
        return config.rank if config.rank in (None, VBMF) else (config.rank,)

    def vbmf_rank(self, layer: nn.Module) -> Rank:
        w = layer.weight.detach().double().numpy()
        out_ch, in_ch, kh, kw = w.shape
        return (evbmf_rank(w.transpose(0, 3, 1, 2).reshape(out_ch * kw, in_ch * kh)),)

    def skeleton(self, layer, rank) -> LowRank:
        kh, kw = layer.kernel_size
        first = conv_like(layer, layer.in_channels, rank[0], kernel=(kh, 1), axes=(0,))
        second = conv_like(layer, rank[0], layer.out_channels, kernel=(1, kw), axes=(1,), bias=layer.bias is not None)
        return LowRank(first, second, method=self.name, ranks=rank)

    def factorize(self, layer, rank, input_sqrt, config) -> Factorized:
        factors = spatial_svd_decompose(layer.weight, rank=rank[0], input_sqrt=input_sqrt)
        built = self.skeleton(layer, rank)
        first, second = built
        first.weight.data.copy_(factors.first)
        second.weight.data.copy_(factors.second)
        copy_bias(second, layer)
        return Factorized(built, factors.rebuild())
