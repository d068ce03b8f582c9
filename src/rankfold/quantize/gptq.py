"""Data-aware rounding of weights (the optimal-brain-quantization update, as in GPTQ).

Rounding each weight to its nearest grid point ignores that the layer's inputs are correlated.
Given H = E[x x^T] over the layer's input rows (im2col rows for a convolution), the columns of W
are rounded one at a time and each rounding error is pushed onto the columns not yet rounded,
weighted by the inverse of H, so that the *output* error ||(W - Q) x|| stays small. The grid
(one scale per output channel) is the plain quantizer's, so the result is exported unchanged.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rankfold.analyze import PerInput, rows_of_each_sample, run_checked
from rankfold.layers import numeric_padding
from rankfold.quantize.core import weight_qmax
from rankfold.settings import calibration_batch

DAMPING = 0.01  # of the mean diagonal of H, added to it: keeps the inverse stable
BLOCK = 128  # columns rounded together before the lazy update of the rest
ROWS_PER_SAMPLE = 2048  # input rows a sample adds to H, at most (a fixed random subset beyond)


def supports(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Linear):
        return True
    return isinstance(layer, nn.Conv2d) and layer.groups == 1 and numeric_padding(layer) is not None


def _input_rows(layer: nn.Module, x: Tensor, first: int, limit: int = ROWS_PER_SAMPLE) -> Tensor:
    """The rows the layer multiplies by its flattened weight: (rows, in_features or C*kh*kw), at
    most `limit` of each sample's (analyze.rows_of_each_sample: which ones is fixed by the sample's
    index, `first` the batch's first, not by the batching): H of a 3x3 convolution over 640x640
    text pages would otherwise unfold GBs a batch (PP-OCRv4's detector) for a matrix that a few
    hundred thousand rows estimate as well."""
    if isinstance(layer, nn.Linear):
        return rows_of_each_sample(x.reshape(-1, x.shape[-1]), x.shape[0], first, limit)
    parts = []
    for index, sample in enumerate(x.split(1)):  # unfolded one at a time: (C*kh*kw, L), the weight's order
        cols = F.unfold(sample, layer.kernel_size, dilation=layer.dilation, padding=numeric_padding(layer),
                        stride=layer.stride)[0]
        parts.append(rows_of_each_sample(cols.T, 1, first + index, limit))
    return torch.cat(parts)


def _row_geometry(layer: nn.Module) -> tuple:
    """What decides a layer's input rows besides its input: layers reading one tensor share their
    product only when they unfold it alike (a 1x1 and a 3x3 convolution on one tensor do not:
    ddddocr's detector failed with 96 against 288 columns)."""
    if isinstance(layer, nn.Linear):
        return ("linear",)
    return ("conv", layer.kernel_size, layer.dilation, numeric_padding(layer), layer.stride)


def input_second_moments(model: nn.Module, names: list[str], calib: Tensor,
                         batch_size: int | None = None) -> dict[str, Tensor]:
    """E[x x^T] of each named layer's input rows over `calib` (float64 sums of float32 products;
    layers that read one tensor, a transformer's q, k and v, share its product)."""
    batch_size = batch_size or min(32, calibration_batch())
    modules = dict(model.named_modules())
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    shared = PerInput()  # this batch's product of each input tensor
    first = 0  # the running batch's first sample

    def hook(module, inputs, name):
        def compute():
            rows = _input_rows(module, inputs[0].detach(), first).float()
            return (rows.T @ rows).double(), rows.shape[0]

        product, count = shared.get(inputs[0], _row_geometry(module), compute)
        if name in sums:  # in place: a language model's sums are a gigabyte (SmolLM2-135M: 1.0 GB)
            sums[name].add_(product)
        else:
            sums[name] = product.clone()  # the product may be shared with the layers reading that input
        counts[name] = counts.get(name, 0) + count

    handles = [modules[n].register_forward_pre_hook(lambda m, i, n=n: hook(m, i, n)) for n in names]
    try:
        with torch.no_grad():
            for first in range(0, len(calib), batch_size):
                shared.clear()
                run_checked(model, calib[first : first + batch_size])
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n].div_(counts[n]) for n in sums}


def round_with_error_feedback(weight: Tensor, scale: Tensor, qmax: int, moments: Tensor) -> Tensor:
    """Integer codes (same shape as `weight`, flattened to (out, in)) on the grid q * scale, scale
    (out, 1) per channel or (out, in) per element (groups repeated), chosen column by column with
    the rounding error spread onto later columns through H^-1."""
    w = weight.double().clone()
    h = moments.double().clone()
    dead = torch.diag(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += DAMPING * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    # Upper Cholesky factor of H^-1: row i holds the update weights for column i's error.
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    s = scale.double().expand(w.shape[0], w.shape[1])
    codes = torch.zeros_like(w)
    for start in range(0, w.shape[1], BLOCK):
        end = min(start + BLOCK, w.shape[1])
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        for i in range(end - start):
            col, step = block[:, i : i + 1], s[:, start + i : start + i + 1]
            q = torch.clamp(torch.round(col / step), -qmax, qmax)
            codes[:, start + i] = q[:, 0]
            err = (col - q * step) / u[start + i, start + i]
            block[:, i:] -= err @ u[start + i : start + i + 1, start:end][:, i:]
            errors[:, i : i + 1] = err
        w[:, end:] -= errors @ u[start:end, end:]
    return codes


def quantize_layer(layer: nn.Module, bits: int, moments: Tensor, *, reduce_range: bool = False,
                   per_tensor: bool = False, group_size: int | None = None) -> None:
    """Replace the layer's weight, in place, by its data-aware rounding (dequantized). Channels
    (groups, with `group_size`) whose largest code falls short of qmax keep plain rounding, so the
    exporter, which derives each scale from its largest weight, finds exactly the same grid; with
    one scale for the tensor (`per_tensor`), all keep plain rounding unless some code still
    reaches qmax."""
    qmax = weight_qmax(bits, reduce_range)
    flat = layer.weight.detach().reshape(layer.weight.shape[0], -1).double()
    size = group_size or flat.shape[1]
    groups = -(-flat.shape[1] // size)
    padded = F.pad(flat, (0, groups * size - flat.shape[1])).reshape(flat.shape[0], groups, size)
    scale = padded.abs().amax(2) / qmax  # (out, groups)
    if per_tensor:
        scale = torch.full_like(scale, float(scale.max()))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    per_element = scale.repeat_interleave(size, dim=1)[:, : flat.shape[1]]
    codes = round_with_error_feedback(flat, per_element, qmax, moments)
    plain = torch.clamp(torch.round(flat / per_element), -qmax, qmax)
    # Per group: does some code reach qmax (the exporter's scale then is this one)?
    reaches = F.pad(codes.abs(), (0, groups * size - flat.shape[1])).reshape(flat.shape[0], groups, size).amax(2) \
        >= qmax
    keep_plain = ~reaches
    if per_tensor:
        keep_plain[:] = bool(keep_plain.all())
    keep = keep_plain.repeat_interleave(size, dim=1)[:, : flat.shape[1]]
    codes = torch.where(keep, plain, codes)
    with torch.no_grad():
        layer.weight.copy_((codes * per_element).reshape(layer.weight.shape).to(layer.weight.dtype))


def quantize_all(model: nn.Module, leaf_bits: Mapping[str, int], calib: Tensor, *,
                 reduce_range: bool = False, per_tensor: Collection[str] = (),
                 groups: Mapping[str, int] | None = None) -> list[str]:
    """Data-aware rounding of every supported leaf in `leaf_bits`; returns the names done. The
    input moments come from one pass over `calib` with the weights as they are now (float).
    `groups`: leaves with one scale per that many input elements of each channel."""
    modules = dict(model.named_modules())
    names = [n for n, b in leaf_bits.items() if b < 32 and supports(modules[n])]
    moments = input_second_moments(model, names, calib)
    groups = groups or {}
    for name in names:
        if name in moments:
            quantize_layer(modules[name], leaf_bits[name], moments[name], reduce_range=reduce_range,
                           per_tensor=name in per_tensor, group_size=groups.get(name))
    return [n for n in names if n in moments]
