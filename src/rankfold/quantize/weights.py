"""Weight quantization of a torch model before export: seam equalization of factorized chains,
fake-quantized weights (the exported floats lie exactly on the integer grid), bias correction."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from rankfold.analyze import COMPRESSIBLE, run_checked, takes_weight_groups
from rankfold.layers import LowRank
from rankfold.quantize.core import fake_quantize_weight, weight_qmax
from rankfold.settings import calibration_batch


def _dense(module: nn.Module) -> bool:
    return isinstance(module, COMPRESSIBLE) and getattr(module, "groups", 1) == 1


def _out_ranges(weight: Tensor) -> Tensor:
    return weight.detach().abs().reshape(weight.shape[0], -1).amax(1)


def _in_ranges(weight: Tensor) -> Tensor:
    return weight.detach().abs().transpose(0, 1).reshape(weight.shape[1], -1).amax(1)


def equalize_seams(chain: nn.Sequential) -> int:
    """Rescale each pair of consecutive dense factors so that the channels between them have the
    same range in both: A[j] /= s_j, B[:, j] *= s_j with s_j = sqrt(range_A[j] / range_B[j]).
    The chain computes the same function (no nonlinearity between factors); per-channel weight
    quantization of both factors then loses less. Returns the number of seams equalized."""
    layers = list(chain)
    done = 0
    for first, second in zip(layers, layers[1:]):
        if not (_dense(first) and _dense(second)) or first.weight.shape[0] != second.weight.shape[1]:
            continue
        r1, r2 = _out_ranges(first.weight), _in_ranges(second.weight)
        ok = (r1 > 0) & (r2 > 0)
        s = torch.where(ok, torch.sqrt(r1 / r2.clamp_min(1e-30)), torch.ones_like(r1))
        with torch.no_grad():
            shape_first = (-1,) + (1,) * (first.weight.ndim - 1)
            shape_second = (1, -1) + (1,) * (second.weight.ndim - 2)
            first.weight.div_(s.reshape(shape_first))
            if first.bias is not None:
                first.bias.div_(s)
            second.weight.mul_(s.reshape(shape_second))
        done += 1
    return done


def quantized_leaves(model: nn.Module, bits: Mapping[str, int]) -> dict[str, int]:
    """The bit-width of every leaf layer whose weights `bits` quantizes (value < 32), by full name:
    a factorized layer (LowRank) stands for each of its factors."""
    modules = dict(model.named_modules())
    leaves: dict[str, int] = {}
    for name, b in bits.items():
        if b >= 32:
            continue
        if isinstance(modules[name], LowRank):
            leaves.update({f"{name}.{child}": b for child, _m in modules[name].named_children()})
        else:
            leaves[name] = b
    return leaves


def per_tensor_leaves(model: nn.Module, per_tensor: Collection[str]) -> set[str]:
    """The leaf layers of the layers named in `per_tensor` (each factor of a LowRank), by full name."""
    return set(quantized_leaves(model, dict.fromkeys(per_tensor, 8)))


def grouped_leaves(model: nn.Module, groups: Mapping[str, int]) -> dict[str, int]:
    """The group size of every leaf layer of the layers named in `groups` (each factor of a LowRank
    whose weight takes groups: a pointwise convolution's factors are pointwise too)."""
    modules = dict(model.named_modules())
    leaves: dict[str, int] = {}
    for name, size in groups.items():
        children = [f"{name}.{child}" for child, _m in modules[name].named_children()] \
            if isinstance(modules[name], LowRank) else [name]
        leaves.update(dict.fromkeys((c for c in children if takes_weight_groups(modules[c])), size))
    return leaves


def quantize_weights(model: nn.Module, bits: Mapping[str, int], *, equalize: bool = True,
                     calib: Tensor | None = None, reduce_range: bool = False, per_tensor: Collection[str] = (),
                     groups: Mapping[str, int] | None = None) -> dict[str, int]:
    """Fake-quantize, in place, the weights of every layer named in `bits` (value < 32); a
    factorized layer (LowRank) has each factor quantized, after seam equalization. With `calib`,
    weights are rounded data-aware (quantize/gptq.py) instead of to the nearest grid point.
    `reduce_range`: int8 codes within +-63 (see quantize/core.py). `per_tensor`: layers with one
    weight scale for the whole tensor instead of one per output channel; `groups`: int4 layers
    with one scale per that many input elements of each channel. Returns the bit-width of every
    quantized leaf module, by its full name (for the ONNX export)."""
    modules = dict(model.named_modules())
    if equalize:
        for name, b in bits.items():
            if b < 32 and isinstance(modules[name], LowRank):
                equalize_seams(modules[name])
    leaves = quantized_leaves(model, bits)
    whole = per_tensor_leaves(model, per_tensor)
    grouped = grouped_leaves(model, groups or {})
    done: list[str] = []
    if calib is not None:
        from rankfold.quantize.gptq import quantize_all

        done = quantize_all(model, leaves, calib, reduce_range=reduce_range, per_tensor=whole, groups=grouped)
    for leaf, b in leaves.items():
        if leaf in done:
            continue
        layer = modules[leaf]
        with torch.no_grad():
            w = layer.weight.detach().numpy()
            layer.weight.copy_(torch.from_numpy(fake_quantize_weight(w, b, grouped.get(leaf), reduce_range=reduce_range,
                                                                        per_tensor=leaf in whole)))
    return leaves


def correct_bias(float_model: nn.Module, quant_model: nn.Module, names: list[str], calib: Tensor) -> None:
    """Remove the mean output shift that weight quantization adds to each named layer, measured
    on `calib` with the layer's float input: bias -= E[y_quant - y_float] per output channel."""
    float_modules, quant_modules = dict(float_model.named_modules()), dict(quant_model.named_modules())
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    seen: set[str] = set()  # layers already met in this batch (a layer called twice counts once)

    def hook(module, inputs, name):  # the shift on this batch, at the layer's float input
        if name in seen:
            return
        seen.add(name)
        x = inputs[0].detach()
        diff = (quant_modules[name](x) - module(x)).to(torch.float64)
        channel_axis = -1 if diff.ndim == 2 or isinstance(_last(quant_modules[name]), nn.Linear) else 1
        rows = diff.movedim(channel_axis, -1).reshape(-1, diff.shape[channel_axis])
        sums[name] = sums.get(name, 0) + rows.sum(0)
        counts[name] = counts.get(name, 0) + rows.shape[0]

    handles = [float_modules[n].register_forward_pre_hook(lambda m, i, n=n: hook(m, i, n)) for n in names]
    batch_size = calibration_batch()
    try:
        with torch.no_grad():
            for start in range(0, len(calib), batch_size):
                seen.clear()
                run_checked(float_model.eval(), calib[start : start + batch_size])
    finally:
        for h in handles:
            h.remove()
    for name in sums:
        shift = sums[name] / counts[name]
        with torch.no_grad():
            last = _last(quant_modules[name])
            if last.bias is None:
                last.bias = nn.Parameter(torch.zeros(shift.shape[0], dtype=last.weight.dtype))
            last.bias.sub_(shift.to(last.bias.dtype))


def _last(module: nn.Module) -> nn.Module:
    return list(module)[-1] if isinstance(module, nn.Sequential) else module


def weight_quant_noise(weight: Tensor, bits: int, reduce_range: bool = False, per_tensor: bool = False,
                       group_size: int | None = None) -> np.ndarray:
    """Per output channel (row), the variance of rounding noise per weight: (max|w_c| / qmax)^2 / 12;
    with one scale for the tensor (max|w| / qmax)^2 / 12 for every channel; with `group_size`, the
    mean over the channel's groups of (max|w_group| / qmax)^2 / 12."""
    return group_quant_noise(weight, bits, reduce_range, per_tensor, group_size).mean(1).numpy()


def group_quant_noise(weight: Tensor, bits: int, reduce_range: bool = False, per_tensor: bool = False,
                      group_size: int | None = None) -> Tensor:
    """(channels, groups) float64: the variance of rounding noise per weight of each scale's
    weights, (max|w_scale| / qmax)^2 / 12; one group per channel without `group_size`."""
    qmax = weight_qmax(bits, reduce_range)
    if group_size is not None:
        rows = weight.detach().reshape(weight.shape[0], -1).double()
        groups = -(-rows.shape[1] // group_size)
        padded = torch.nn.functional.pad(rows, (0, groups * group_size - rows.shape[1]))
        ranges = padded.abs().reshape(rows.shape[0], groups, group_size).amax(2)
        return (ranges / qmax) ** 2 / 12
    ranges = _out_ranges(weight).double()
    if per_tensor:
        ranges = torch.full_like(ranges, float(ranges.max()))
    return ((ranges / qmax) ** 2 / 12).unsqueeze(1)
