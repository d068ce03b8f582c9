"""The classic, data-free contenders, built with TensorLy as the reference implementation.

- uniform-rank Tucker-2 by plain HOSVD (Kim et al. 2016 without its rank selection): every
  layer keeps the same fraction of its channels, the fraction chosen to meet a parameter budget;
- Tucker-2 with EVBMF-chosen ranks, the recipe of the popular PyTorch decomposition scripts
  (HOOI from an SVD start, as TensorLy's `partial_tucker` does by default).

Convolutions with a spatial kernel get Tucker-2; Linear and 1x1 layers get a truncated SVD (the
matrix case of the same decomposition). Depthwise layers and single-input-channel stems, which
Tucker-2 cannot shrink, stay as they are. The replacement modules are rankfold's own skeletons,
so the exported graphs have the same shape as rankfold's and time alike.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorly as tl
import torch
from tensorly.decomposition import partial_tucker
from torch import nn

from rankfold.analyze import set_submodule
from rankfold.decompose.vbmf import evbmf_rank
from rankfold.layers import layer_spec
from rankfold.methods.svd import SVDMethod
from rankfold.methods.tucker2 import Tucker2Method

RankFn = Callable[[nn.Module], tuple[int, ...]]


def _factorizable(layer: nn.Module) -> bool:
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        return False
    spec = layer_spec(layer)
    return spec.groups == 1 and spec.in_ch > 1 and min(spec.out_ch, spec.in_ch) > 1


def _is_tucker(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d) and layer_spec(layer).has_spatial_kernel


def _factor_params(layer: nn.Module, rank: tuple[int, ...]) -> int:
    spec = layer_spec(layer)
    method = Tucker2Method() if _is_tucker(layer) else SVDMethod()
    return method.factor_params(spec, rank) + (spec.out_ch if spec.bias else 0)


def _tucker2_module(layer: nn.Conv2d, rank: tuple[int, int], hooi_iters: int) -> nn.Module:
    weight = layer.weight.detach().double().numpy()
    r_in, r_out = rank
    (core, (last, first)), _ = partial_tucker(weight, rank=[r_out, r_in], modes=[0, 1], init="svd",
                                              n_iter_max=hooi_iters)
    built = Tucker2Method().skeleton(layer, rank)
    f, c, lst = built
    f.weight.data.copy_(torch.from_numpy(np.ascontiguousarray(first.T)).reshape(f.weight.shape))
    c.weight.data.copy_(torch.from_numpy(np.ascontiguousarray(core)))
    lst.weight.data.copy_(torch.from_numpy(np.ascontiguousarray(last)).reshape(lst.weight.shape))
    if layer.bias is not None:
        lst.bias.data.copy_(layer.bias.data)
    return built


def _svd_module(layer: nn.Module, rank: tuple[int]) -> nn.Module:
    weight = layer.weight.detach().double().numpy()
    matrix = weight.reshape(weight.shape[0], -1)
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    r = rank[0]
    built = SVDMethod().skeleton(layer, rank)
    first, last = built
    first.weight.data.copy_(torch.from_numpy(np.ascontiguousarray(vt[:r] * s[:r, None])).reshape(first.weight.shape))
    last.weight.data.copy_(torch.from_numpy(np.ascontiguousarray(u[:, :r])).reshape(last.weight.shape))
    if layer.bias is not None:
        last.bias.data.copy_(layer.bias.data)
    return built


def factorize_all(model: nn.Module, rank_of: RankFn, *, hooi_iters: int) -> list[str]:
    """Replace every factorizable layer by its decomposition at `rank_of(layer)`, in place,
    where that saves parameters; returns the replaced layer names."""
    tl.set_backend("numpy")
    replaced = []
    for name, layer in list(model.named_modules()):
        if not _factorizable(layer):
            continue
        rank = rank_of(layer)
        if _factor_params(layer, rank) >= layer_spec(layer).params:
            continue
        new = _tucker2_module(layer, rank, hooi_iters) if _is_tucker(layer) else _svd_module(layer, rank)
        set_submodule(model, name, new)
        replaced.append(name)
    return replaced


def uniform_rank(fraction: float) -> RankFn:
    """Every layer keeps `fraction` of its channels (Tucker-2: input and output; SVD: the rank)."""

    def rank_of(layer: nn.Module) -> tuple[int, ...]:
        spec = layer_spec(layer)
        if _is_tucker(layer):
            return (max(1, round(fraction * spec.in_ch)), max(1, round(fraction * spec.out_ch)))
        return (max(1, round(fraction * min(spec.out_ch, spec.in_ch * spec.spatial))),)

    return rank_of


def vbmf_rank(layer: nn.Module) -> tuple[int, ...]:
    """EVBMF's rank of each unfolding (input mode, output mode) as the decomposition scripts do."""
    weight = layer.weight.detach().double().numpy()
    if _is_tucker(layer):
        input_mode = np.moveaxis(weight, 1, 0).reshape(weight.shape[1], -1)
        return (max(1, evbmf_rank(input_mode)), max(1, evbmf_rank(weight.reshape(weight.shape[0], -1))))
    return (max(1, evbmf_rank(weight.reshape(weight.shape[0], -1))),)


def params_at(model: nn.Module, rank_of: RankFn) -> int:
    """Parameters of `model` once factorized at `rank_of`, without building it."""
    total = 0
    for layer in model.modules():
        if list(layer.children()):
            continue
        own = sum(p.numel() for p in layer.parameters(recurse=False))
        if _factorizable(layer):
            own = min(own, _factor_params(layer, rank_of(layer)))
        total += own
    return total


def fraction_for_budget(model: nn.Module, max_params: int) -> float:
    """The largest uniform channel fraction whose factorized model has at most `max_params`."""
    low, high = 0.0, 1.0
    for _ in range(30):
        mid = (low + high) / 2
        if params_at(model, uniform_rank(mid)) <= max_params:
            low = mid
        else:
            high = mid
    return low
