"""One handler per factorization method, found through a registry keyed by config type.

A handler knows which layers it fits, how many parameters a rank costs, and how to turn a layer
into its factorized replacement. Adding a method means adding a handler here, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from rankfold.config import VBMF, CPConfig, SpatialSVDConfig, SVDConfig, Tucker2Config
from rankfold.decompose import (
    cp_decompose,
    max_spatial_rank,
    max_svd_rank,
    max_tucker2_ranks,
    spatial_svd_decompose,
    svd_decompose,
    tucker2_decompose,
)
from rankfold.decompose.vbmf import evbmf_rank
from rankfold.layers import LayerSpec, LowRank, conv_like, numeric_padding, pointwise

Rank = tuple[int, ...]


@dataclass
class Factorized:
    """A built replacement and the weight it approximates (for error measurement)."""

    module: LowRank
    approx_weight: Tensor


class Method(Protocol):
    name: str

    def unsupported(self, spec: LayerSpec, layer: nn.Module) -> str | None: ...
    def rank_ladder(self, spec: LayerSpec) -> list[Rank]: ...
    def factor_params(self, spec: LayerSpec, rank: Rank) -> int: ...
    def config_rank(self, config: object) -> Rank | str | None: ...
    def skeleton(self, layer: nn.Module, rank: Rank) -> LowRank: ...
    def factorize(self, layer: nn.Module, rank: Rank, input_sqrt: Tensor | None, config: object) -> Factorized: ...


def _copy_bias(target: nn.Module, layer: nn.Module) -> None:
    if layer.bias is not None:
        target.bias.data.copy_(layer.bias.detach())


def _is_conv(layer: nn.Module) -> bool:
    return isinstance(layer, (nn.Conv1d, nn.Conv2d))


class SVDMethod:
    name = "svd"

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
        if _is_conv(layer):
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
        _copy_bias(last, layer)
        return Factorized(built, factors.rebuild())


class Tucker2Method:
    name = "tucker2"

    def unsupported(self, spec: LayerSpec, layer: nn.Module) -> str | None:
        if not spec.has_spatial_kernel:
            return "tucker2 needs a spatial kernel larger than 1"
        return None

    def rank_ladder(self, spec: LayerSpec) -> list[Rank]:
        max_in, max_out = max_tucker2_ranks((spec.out_ch, spec.in_ch, *spec.kernel))
        ladder = []
        for r_out in range(1, max_out + 1):  # keep r_in / r_out close to I / O
            r_in = min(max_in, max(1, round(r_out * spec.in_ch / spec.out_ch)))
            ladder.append((r_in, r_out))
        return ladder

    def factor_params(self, spec: LayerSpec, rank: Rank) -> int:
        r_in, r_out = rank
        return spec.in_ch * r_in + r_in * r_out * spec.spatial + r_out * spec.out_ch

    def config_rank(self, config: Tucker2Config) -> Rank | str | None:
        return config.ranks

    def vbmf_rank(self, layer: nn.Module) -> Rank:
        w = layer.weight.detach().double().numpy()
        input_mode = np.moveaxis(w, 1, 0).reshape(w.shape[1], -1)
        return (evbmf_rank(input_mode), evbmf_rank(w.reshape(w.shape[0], -1)))

    def skeleton(self, layer, rank) -> LowRank:
        r_in, r_out = rank
        ndim = len(layer.kernel_size)
        first = pointwise(layer, layer.in_channels, r_in, bias=False, ndim=ndim)
        core = conv_like(layer, r_in, r_out, kernel=tuple(layer.kernel_size))
        last = pointwise(layer, r_out, layer.out_channels, bias=layer.bias is not None, ndim=ndim)
        return LowRank(first, core, last, method=self.name, ranks=rank)

    def factorize(self, layer, rank, input_sqrt, config) -> Factorized:
        als_iters = config.als_iters if isinstance(config, Tucker2Config) else Tucker2Config().als_iters
        factors = tucker2_decompose(layer.weight, ranks=rank, input_sqrt=input_sqrt, als_iters=als_iters)
        built = self.skeleton(layer, rank)
        first, core, last = built
        first.weight.data.copy_(factors.first.reshape(first.weight.shape))
        core.weight.data.copy_(factors.core)
        last.weight.data.copy_(factors.last.reshape(last.weight.shape))
        _copy_bias(last, layer)
        return Factorized(built, factors.rebuild())


class SpatialSVDMethod:
    name = "spatial-svd"

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
        _copy_bias(second, layer)
        return Factorized(built, factors.rebuild())


class CPMethod:
    name = "cp"

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
        _copy_bias(last, layer)
        return Factorized(built, factors.rebuild())


METHODS: dict[type, Method] = {
    SVDConfig: SVDMethod(),
    Tucker2Config: Tucker2Method(),
    CPConfig: CPMethod(),
    SpatialSVDConfig: SpatialSVDMethod(),
}

FALLBACK = SVDConfig  # a method that does not fit a layer's shape falls back to SVD


def rank_for_keep(method: Method, spec: LayerSpec, keep: float) -> Rank | None:
    """The largest rank whose factors hold at most `keep` of the layer's weights and are smaller
    than the layer; None when no rank saves anything."""
    budget = keep * spec.weight_params
    best = None
    for rank in method.rank_ladder(spec):
        cost = method.factor_params(spec, rank)
        if cost <= budget and cost < spec.weight_params:
            best = rank
    return best


def weighted_relative_error(weight: Tensor, approx: Tensor, input_sqrt: Tensor | None) -> float:
    """||(W - W~) x_1 S|| / ||W x_1 S|| (S = identity without calibration data)."""
    w = weight.detach().to(torch.float64)
    diff = w - approx.detach().to(torch.float64)
    if input_sqrt is not None:
        w = torch.movedim(torch.movedim(w, 1, -1) @ input_sqrt, -1, 1)
        diff = torch.movedim(torch.movedim(diff, 1, -1) @ input_sqrt, -1, 1)
    return float(diff.norm() / w.norm().clamp_min(1e-30))
