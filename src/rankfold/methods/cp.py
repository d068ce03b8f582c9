"""CP: 1x1 (I -> R), one depthwise convolution per spatial axis, 1x1 (R -> O); fitted by ALS."""

from __future__ import annotations

from torch import nn

from rankfold.config import CPConfig
from rankfold.decompose import cp_decompose
from rankfold.layers import LayerSpec, LowRank, conv_like, numeric_padding, pointwise
from rankfold.methods.base import Factorized, Rank, copy_bias


class CPMethod:
    name = "cp"
    config_type = CPConfig
    rank_count = 1
    auto_max_work = 2e7  # CP's ALS is the slow method: `auto` tries it only on smaller layers
    estimate_losses = None  # no closed form: the planner prices each candidate rank by factorizing it

    def config(self, ranks):
        return CPConfig(rank=ranks[0])

    def unsupported(self, spec: LayerSpec, layer: nn.Module) -> str | None:
        if not spec.has_spatial_kernel:
            return "cp needs a spatial kernel larger than 1"
        if numeric_padding(layer) is None:
            return "padding='same' with an odd total cannot be split across depthwise convolutions"
        return None

    def rank_ladder(self, spec: LayerSpec) -> list[Rank]:
        per_rank = spec.in_ch + sum(spec.kernel) + spec.out_ch
        return [(r,) for r in range(1, max(1, spec.weight_params // per_rank) + 1)]

    def factor_params(self, spec: LayerSpec, rank: Rank) -> int:
        return rank[0] * (spec.in_ch + sum(spec.kernel) + spec.out_ch)

    def config_rank(self, config: CPConfig) -> Rank | None:
        return None if config.rank is None else (config.rank,)

    def skeleton(self, layer, rank) -> LowRank:
        r = rank[0]
        ndim = len(layer.kernel_size)
        first = pointwise(layer, layer.in_channels, r, bias=False, ndim=ndim)
        depthwise = []
        for axis in range(ndim):
            kernel = tuple(layer.kernel_size[a] if a == axis else 1 for a in range(ndim))
            depthwise.append(conv_like(layer, r, r, kernel=kernel, axes=(axis,), groups=r))
        last = pointwise(layer, r, layer.out_channels, bias=layer.bias is not None, ndim=ndim)
        return LowRank(first, *depthwise, last, method=self.name, ranks=rank)

    def factorize(self, layer, rank, input_sqrt, config) -> Factorized:
        max_iters = config.max_iters if isinstance(config, CPConfig) else CPConfig().max_iters
        factors = cp_decompose(layer.weight, rank=rank[0], input_sqrt=input_sqrt, max_iters=max_iters)
        built = self.skeleton(layer, rank)
        first, *depthwise, last = built
        first.weight.data.copy_(factors.first.reshape(first.weight.shape))
        for conv, taps in zip(depthwise, factors.spatial):
            conv.weight.data.copy_(taps.reshape(conv.weight.shape))
        last.weight.data.copy_(factors.last.reshape(last.weight.shape))
        copy_bias(last, layer)
        return Factorized(built, factors.rebuild())
