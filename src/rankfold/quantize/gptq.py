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

from rankfold.analyze import (
    PerInput,
    channels_last_rows,
    kept_positions,
    positions_of_sample,
    rows_of_each_sample,
    run_checked,
)
from rankfold.layers import numeric_padding
from rankfold.quantize.core import weight_qmax
from rankfold.settings import calibration_batch

MAX_DAMPING_TRIES = 4  # damping x1, x10, x100, x1000 before a moment is given up on
DAMPING = 0.01  # of the mean diagonal of H, added to it: keeps the inverse stable
BLOCK = 128  # columns rounded together before the lazy update of the rest
ROWS_PER_SAMPLE = 2048  # input rows a sample adds to H, at most (a fixed random subset beyond)
# ... and fewer where the samples are many: H of at most C*kh*kw <= a few thousand columns is
# estimated as well from this many rows spread over every sample, and PP-OCRv4's detector (224
# pages, 2,048 rows each from most layers) spent 23 s of its 195 s on products of the rest
MOMENT_ROWS = 1 << 17


def rows_per_sample(samples: int) -> int:
    """How many input rows each of `samples` calibration samples adds to a layer's H, at most."""
    return max(1, min(ROWS_PER_SAMPLE, -(-MOMENT_ROWS // max(samples, 1))))


def supports(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Linear):
        return True
    return isinstance(layer, nn.Conv2d) and layer.groups == 1 and numeric_padding(layer) is not None


def _input_rows(layer: nn.Module, x: Tensor, first: int, limit: int = ROWS_PER_SAMPLE,
                positions: Tensor | None = None) -> Tensor:
    """The rows the layer multiplies by its flattened weight: (rows, in_features or C*kh*kw), at
    most `limit` of each sample's (analyze.rows_of_each_sample: which ones is fixed by the sample's
    index, `first` the batch's first, not by the batching): H of a 3x3 convolution over 640x640
    text pages would otherwise unfold GBs a batch (PP-OCRv4's detector) for a matrix that a few
    hundred thousand rows estimate as well. `positions`: the tokens a padding mask keeps
    (analyze.channels_last_rows)."""
    if isinstance(layer, nn.Linear):
        return rows_of_each_sample(channels_last_rows(layer, x, positions), x.shape[0], first, limit)
    out_h, out_w = _output_size(layer, x.shape[-2:])
    return torch.cat([_patches_at(sample[0], layer, positions_of_sample(out_h * out_w, first + index, limit), out_w)
                      for index, sample in enumerate(x.split(1))])


def _output_size(layer: nn.Conv2d, size) -> tuple[int, int]:
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                 zip(size, numeric_padding(layer), layer.dilation, layer.kernel_size, layer.stride))


def _patches_at(image: Tensor, layer: nn.Conv2d, positions: Tensor | None, out_w: int) -> Tensor:
    """The rows of F.unfold's columns (C*kh*kw: channel, then kernel row, then column) of one
    (C, H, W) input at the flattened output `positions` (None: all), gathered tap by tap: a 3x3
    convolution over a 640x640 page unfolds 9 x 409,600 columns of which 2,048 are kept."""
    pad_h, pad_w = numeric_padding(layer)
    padded = F.pad(image, (pad_w, pad_w, pad_h, pad_h))
    if positions is None:
        out_h, _ = _output_size(layer, image.shape[-2:])
        positions = torch.arange(out_h * out_w)
    (kh, kw), (dh, dw) = layer.kernel_size, layer.dilation
    width = padded.shape[-1]
    corners = positions // out_w * layer.stride[0] * width + positions % out_w * layer.stride[1]
    taps = (torch.arange(kh)[:, None] * dh * width + torch.arange(kw) * dw).reshape(-1, 1)  # (kh*kw, 1)
    gathered = padded.reshape(padded.shape[0], -1).index_select(1, (taps + corners).reshape(-1))
    return gathered.reshape(-1, positions.numel()).T  # (C, kh*kw, n) as (C*kh*kw, n), transposed


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
    kept = None  # its positions that a padding mask keeps (analyze.kept_positions)
    limit = rows_per_sample(len(calib))

    def hook(module, inputs, name):
        def compute():
            rows = _input_rows(module, inputs[0].detach(), first, limit, positions=kept).float()
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
                kept = kept_positions(model, calib[first : first + batch_size])
                run_checked(model, calib[first : first + batch_size])
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n].div_(counts[n]) for n in sums}


def _feedback_factor(moments: Tensor) -> tuple[Tensor, Tensor]:
    """The columns no input reaches (dead), and the upper Cholesky factor U of the damped H^-1:
    row i of U holds the update weights for column i's error."""
    h = moments.double().clone()
    dead = torch.diag(h) <= 0
    h[dead, dead] = 1.0
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    damping = DAMPING * torch.diag(h).mean()
    # A moment that is not positive semi-definite to rounding (statistics gathered over crops, a
    # moment of a few samples) takes more damping, tenfold at a time; one that still fails (not
    # finite) gets no feedback at all: U = diag(h)^-1/2, plain rounding and its price.
    for _ in range(MAX_DAMPING_TRIES):
        lower, info = torch.linalg.cholesky_ex(h + damping * eye)
        if info == 0:
            u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info == 0:
                return dead, u
        damping = damping * 10
    return dead, torch.diag(torch.diag(h).clamp(min=1e-30).rsqrt().nan_to_num(1.0))


def error_feedback_weights(moments: Tensor) -> Tensor:
    """What a unit of rounding error on a weight of input column i costs the output after the
    later columns compensate it: 1 / U_ii^2 (the conditional variance of x_i given the columns
    after it), where plain rounding costs E[x_i^2]. The expected output error of data-aware
    rounding is then sum_i var_i / U_ii^2 (MiniLM's Linear layers at int4: predicted 0.36 of plain
    rounding's, measured 0.35, correlation 0.98 to 0.995 layer by layer). Dead columns cost 0."""
    dead, u = _feedback_factor(moments)
    return torch.where(dead, torch.zeros(()), 1.0 / torch.diag(u) ** 2)


def round_with_error_feedback(weight: Tensor, scale: Tensor, qmax: int, moments: Tensor,
                              pinned: Tensor | None = None) -> Tensor:
    """Integer codes (same shape as `weight`, flattened to (out, in)) on the grid q * scale, scale
    (out, 1) per channel or (out, in) per element (groups repeated), chosen column by column with
    the rounding error spread onto later columns through H^-1. `pinned` (out, in; -1, 0 or +1):
    where non-zero, the code is that sign times qmax whatever the updates made of the weight (its
    error is spread like any other)."""
    w = weight.double().clone()
    dead, u = _feedback_factor(moments)
    w[:, dead] = 0.0
    s = scale.double().expand(w.shape[0], w.shape[1])
    codes = torch.zeros_like(w)
    for start in range(0, w.shape[1], BLOCK):
        end = min(start + BLOCK, w.shape[1])
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        for i in range(end - start):
            col, step = block[:, i : i + 1], s[:, start + i : start + i + 1]
            q = torch.clamp(torch.round(col / step), -qmax, qmax)
            if pinned is not None:
                pin = pinned[:, start + i : start + i + 1]
                q = torch.where(pin != 0, pin * qmax, q)
            codes[:, start + i] = q[:, 0]
            err = (col - q * step) / u[start + i, start + i]
            block[:, i:] -= err @ u[start + i : start + i + 1, start:end][:, i:]
            errors[:, i : i + 1] = err
        w[:, end:] -= errors @ u[start:end, end:]
    return codes


def _largest_of_each_scale(flat: Tensor, groups: int, size: int, per_tensor: bool) -> Tensor:
    """(out, in) signs (-1, 0, +1) marking, for each scale (group, channel or the tensor), the one
    weight of largest magnitude: the weight the exporter derives that scale from."""
    padded = F.pad(flat, (0, groups * size - flat.shape[1]))
    if per_tensor:
        marks = torch.zeros(padded.numel(), dtype=flat.dtype)
        index = int(padded.abs().argmax())
        marks[index] = torch.sign(padded.reshape(-1)[index])
        return marks.reshape(padded.shape)[:, : flat.shape[1]]
    blocks = padded.reshape(flat.shape[0], groups, size)
    index = blocks.abs().argmax(2, keepdim=True)
    marks = torch.zeros_like(blocks).scatter_(2, index, torch.sign(blocks.gather(2, index)))
    return marks.reshape(flat.shape[0], groups * size)[:, : flat.shape[1]]


def _codes_on_the_exporters_grid(codes: Tensor, plain: Tensor, groups: int, size: int, qmax: int,
                                 per_tensor: bool) -> Tensor:
    """`codes` where each scale's codes reach qmax (the exporter then derives that scale again),
    plain rounding where they fall short."""
    width = codes.shape[1]
    reaches = F.pad(codes.abs(), (0, groups * size - width)).reshape(codes.shape[0], groups, size).amax(2) >= qmax
    keep_plain = ~reaches
    if per_tensor:
        keep_plain[:] = bool(keep_plain.all())
    return torch.where(keep_plain.repeat_interleave(size, dim=1)[:, :width], plain, codes)


def quantize_layer(layer: nn.Module, bits: int, moments: Tensor, *, reduce_range: bool = False,
                   per_tensor: bool = False, group_size: int | None = None) -> None:
    """Replace the layer's weight, in place, by its data-aware rounding (dequantized), on the grid
    the exporter derives from each scale's largest weight (group with `group_size`, channel, or the
    tensor with `per_tensor`). Two roundings, each channel keeping the one whose output error
    (dw H dw^T; channels are rounded independently; with one scale, the tensor's) is smaller: one
    with the largest weight of each scale pinned at +-qmax, as plain rounding puts it; one free,
    whose scales that fall short of qmax revert to plain rounding. Reverting alone left the later
    columns compensating errors that were no longer there: MiniLM's Linear layers at int4 in groups
    of 32, output error 0.45 of plain rounding's that way, 0.35 pinned."""
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
    plain = torch.clamp(torch.round(flat / per_element), -qmax, qmax)
    pinned = _largest_of_each_scale(flat, groups, size, per_tensor)
    candidates = [_codes_on_the_exporters_grid(round_with_error_feedback(flat, per_element, qmax, moments, pin),
                                               plain, groups, size, qmax, per_tensor) for pin in (pinned, None)]
    h = moments.double()
    errors = torch.stack([(((c * per_element - flat) @ h) * (c * per_element - flat)).sum(1) for c in candidates])
    if per_tensor:  # one scale: the channel holding the tensor's largest code decides for all
        errors = errors.sum(1, keepdim=True)
    codes = torch.where((errors[0] <= errors[1]).unsqueeze(1), candidates[0], candidates[1])
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
