"""Truncated SVD: a narrow layer that keeps the kernel, then a 1x1 convolution (or Linear)."""

from __future__ import annotations

from torch import Tensor, nn

from rankfold.config import VBMF, SVDConfig
from rankfold.decompose import max_svd_rank, svd_decompose
from rankfold.decompose.vbmf import evbmf_rank
from rankfold.layers import LayerSpec, LowRank, conv_like, pointwise
from rankfold.methods.base import Factorized, Rank, copy_bias, is_conv, tail_losses, weighted_weight


class SVDMethod:
    name = "svd"
    config_type = SVDConfig
    rank_count = 1
    auto_max_work = None

    def config(self, ranks):
        return SVDConfig(rank=ranks[0])

    def vbmf_config(self) -> SVDConfig:
        return SVDConfig(rank=VBMF)

    def estimate_losses(self, weight: Tensor, input_sqrt: Tensor, sensitivity: Tensor,
                        ranks: list[Rank]) -> list[float]:
        """Every rank's loss from one SVD of W S: the tail of its row-weighted spectrum."""
        weighted = weighted_weight(weight, input_sqrt)
        return tail_losses(weighted.reshape(weighted.shape[0], -1), sensitivity, [r[0] for r in ranks])

    def unsupported(self, spec: LayerSpec, layer: nn.Module) -> str | None:
        return None

    def rank_ladder(self, spec: LayerSpec) -> list[Rank]:
        return [(r,) for r in range(1, max_svd_rank((spec.out_ch, spec.in_ch, *spec.kernel)) + 1)]

    def factor_params(self, spec: LayerSpec, rank: Rank) -> int:
        return rank[0] * (spec.in_ch * spec.spatial + spec.out_ch)

    def config_rank(self, config: SVDConfig) -> Rank | str | None:
        return config.rank if config.rank in (None, VBMF) else (config.rank,)

    def vbmf_rank(self, layer: nn.Module) -> Rank:
        w = layer.weight.detach().double().numpy()
        return (evbmf_rank(w.reshape(w.shape[0], -1)),)

    def skeleton(self, layer, rank) -> LowRank:
        if is_conv(layer):
            ndim = len(layer.kernel_size)
            first = conv_like(layer, layer.in_channels, rank[0], kernel=tuple(layer.kernel_size))
            last = pointwise(layer, rank[0], layer.out_channels, bias=layer.bias is not None, ndim=ndim)
        else:
            first = nn.Linear(layer.in_features, rank[0], bias=False)
            last = nn.Linear(rank[0], layer.out_features, bias=layer.bias is not None)
        return LowRank(first, last, method=self.name, ranks=rank)

    def factorize(self, layer, rank, input_sqrt, config) -> Factorized:
        factors = svd_decompose(layer.weight, rank=rank[0], input_sqrt=input_sqrt)
        built = self.skeleton(layer, rank)
        first, last = built
        last.weight.data.copy_(factors.last.reshape(last.weight.shape))
        first.weight.data.copy_(factors.first)
        copy_bias(last, layer)
        return Factorized(built, factors.rebuild())
