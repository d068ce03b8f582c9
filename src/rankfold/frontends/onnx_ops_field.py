"""More ONNX operators, as field graphs use them beyond the CNN core of onnx_ops.py: variadic and
comparison ops, further activations and reductions, LRN and the other normalizations, and index ops
(GatherElements, GatherND, ScatterND, TopK, ...). Registered into the same OPS table, with the same
value conventions (torch tensors; Python ints and lists for shape arithmetic). Every op is written
with torch functions the TorchScript exporter translates, since results are written through it.
"""

from __future__ import annotations

import math
from functools import reduce

import torch
import torch.nn.functional as F
from torch import Tensor

from rankfold.frontends.activations import FUSED_MISH
from rankfold.frontends.onnx_ops import (
    DTYPES,
    OPS,
    _axis,
    _binary,
    _unary,
    ints,
    is_shape,
    op,
    padded_sizes,
    tensor,
)

# ---- variadic, comparison and logic ------------------------------------------------------------

OPS["Greater"] = _binary(torch.gt, lambda a, b: int(a > b))
OPS["Less"] = _binary(torch.lt, lambda a, b: int(a < b))
OPS["GreaterOrEqual"] = _binary(torch.ge, lambda a, b: int(a >= b))
OPS["LessOrEqual"] = _binary(torch.le, lambda a, b: int(a <= b))
OPS["And"] = _binary(torch.logical_and, lambda a, b: int(bool(a) and bool(b)))
OPS["Or"] = _binary(torch.logical_or, lambda a, b: int(bool(a) or bool(b)))
OPS["Xor"] = _binary(torch.logical_xor, lambda a, b: int(bool(a) != bool(b)))
_PAIRWISE = {"Sum": _binary(torch.add, lambda a, b: a + b), "Max": _binary(torch.maximum, max),
             "Min": _binary(torch.minimum, min)}


@op("Sum", "Max", "Min", "Mean")
def _variadic(vals, attrs):
    """Elementwise over any number of inputs, with broadcasting (Mean: their sum over the count)."""
    pairwise = _PAIRWISE["Sum" if attrs["_op"] == "Mean" else attrs["_op"]]
    out = reduce(lambda a, b: pairwise([a, b], attrs)[0], vals)
    return [out / len(vals) if attrs["_op"] == "Mean" else out]


@op("Mod")
def _mod(vals, attrs):
    a, b = vals
    if is_shape(a) and is_shape(b) and not isinstance(a, list) and not isinstance(b, list):
        return [int(math.fmod(a, b)) if attrs.get("fmod", 0) else a % b]
    like = a if isinstance(a, Tensor) else b
    fn = torch.fmod if attrs.get("fmod", 0) else torch.remainder  # ONNX's default takes the divisor's sign
    return [fn(tensor(a, like), tensor(b, like))]


# ---- activations and elementwise math ----------------------------------------------------------

for _name, _fn in {
    "Sin": torch.sin, "Cos": torch.cos, "Tan": torch.tan, "Asin": torch.asin, "Acos": torch.acos,
    "Atan": torch.atan, "Sign": torch.sign,
    # written out: torch's TorchScript exporter has no Sinh / Cosh
    "Sinh": lambda x: (torch.exp(x) - torch.exp(-x)) / 2, "Cosh": lambda x: (torch.exp(x) + torch.exp(-x)) / 2,
    "Round": torch.round,  # both round half to even
    "Softsign": F.softsign, "IsNaN": torch.isnan,
}.items():
    OPS[_name] = _unary(_fn)


@op("Softplus")
def _softplus(vals, attrs):
    x = vals[0]
    return [torch.log1p(torch.exp(-x.abs())) + torch.relu(x)]  # ln(1 + e^x) without overflow


@op("Mish")
def _mish(vals, attrs):
    x = vals[0]
    return [x * torch.tanh(torch.log1p(torch.exp(-x.abs())) + torch.relu(x))]


@op(FUSED_MISH)
def _fused_mish(vals, attrs):
    """Mul(x, Tanh(Softplus(x))) as written, in torch's one kernel (frontends/activations.py)."""
    return [F.mish(vals[0])]


@op("Swish")
def _swish(vals, attrs):
    """x * sigmoid(alpha * x) (opset 24; SiLU at alpha 1)."""
    x = vals[0]
    return [x * torch.sigmoid(attrs.get("alpha", 1.0) * x)]


@op("Selu")
def _selu(vals, attrs):
    x = vals[0]
    alpha = attrs.get("alpha", 1.67326319217681884765625)
    gamma = attrs.get("gamma", 1.05070102214813232421875)
    return [gamma * torch.where(x > 0, x, alpha * (torch.exp(torch.clamp(x, max=0.0)) - 1.0))]


@op("Celu")
def _celu(vals, attrs):
    return [F.celu(vals[0], attrs.get("alpha", 1.0))]


@op("ThresholdedRelu")
def _thresholded_relu(vals, attrs):
    x = vals[0]
    return [torch.where(x > attrs.get("alpha", 1.0), x, torch.zeros_like(x))]


@op("Shrink")
def _shrink(vals, attrs):
    x = vals[0]
    bias, lambd = attrs.get("bias", 0.0), attrs.get("lambd", 0.5)
    return [torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, torch.zeros_like(x)))]


@op("IsInf")
def _is_inf(vals, attrs):
    x = vals[0]
    infinite = torch.isinf(x)
    if not attrs.get("detect_positive", 1):
        infinite = infinite & (x < 0)
    if not attrs.get("detect_negative", 1):
        infinite = infinite & (x > 0)
    return [infinite]


@op("CastLike")
def _cast_like(vals, attrs):
    like = vals[1] if isinstance(vals[1], Tensor) else tensor(vals[1])  # a constant integer reads as a shape value
    return [tensor(vals[0]).to(like.dtype)]


# ---- reductions --------------------------------------------------------------------------------

def _reduce_dims(vals, attrs, x: Tensor) -> tuple[int, ...] | None:
    """The axes a Reduce* node reduces (input from opset 18, attribute before); None: none at all."""
    axes = ints(vals[1]) if len(vals) > 1 and vals[1] is not None else attrs.get("axes")
    if not axes:
        return None if attrs.get("noop_with_empty_axes", 0) else tuple(range(x.ndim))
    return tuple(_axis(a, x.ndim) for a in axes)


_REDUCERS = {
    "ReduceMin": lambda x, dims, keep: x.amin(dim=dims, keepdim=keep),
    "ReduceL1": lambda x, dims, keep: x.abs().sum(dim=dims, keepdim=keep),
    "ReduceL2": lambda x, dims, keep: torch.sqrt((x * x).sum(dim=dims, keepdim=keep)),
    "ReduceSumSquare": lambda x, dims, keep: (x * x).sum(dim=dims, keepdim=keep),
    "ReduceLogSum": lambda x, dims, keep: torch.log(x.sum(dim=dims, keepdim=keep)),
    "ReduceLogSumExp": lambda x, dims, keep: torch.logsumexp(x, dim=dims, keepdim=keep),
    "ReduceProd": lambda x, dims, keep: reduce(
        lambda y, d: y.prod(dim=d, keepdim=True), dims, x).reshape(
        [1 if i in dims else s for i, s in enumerate(x.shape)] if keep
        else [s for i, s in enumerate(x.shape) if i not in dims]),
}


@op(*_REDUCERS)
def _reduce_more(vals, attrs):
    x = vals[0]
    dims = _reduce_dims(vals, attrs, x)
    if dims is None:
        return [x]
    return [_REDUCERS[attrs["_op"]](x, dims, bool(attrs.get("keepdims", 1)))]


@op("ArgMax", "ArgMin")
def _arg_extreme(vals, attrs):
    x = vals[0]
    axis = _axis(attrs.get("axis", 0), x.ndim)
    keep = bool(attrs.get("keepdims", 1))
    fn = torch.argmax if attrs["_op"] == "ArgMax" else torch.argmin
    if attrs.get("select_last_index", 0):  # torch returns the first of equal values: look from the end
        return [x.shape[axis] - 1 - fn(torch.flip(x, [axis]), dim=axis, keepdim=keep)]
    return [fn(x, dim=axis, keepdim=keep)]


@op("Hardmax")
def _hardmax(vals, attrs):
    x = vals[0]
    axis = _axis(attrs.get("axis", -1), x.ndim)
    index = torch.argmax(x, dim=axis, keepdim=True)
    return [torch.zeros_like(x).scatter(axis, index, 1.0)]


@op("CumSum")
def _cumsum(vals, attrs):
    x, axis = vals[0], _axis(int(ints(vals[1])[0]), vals[0].ndim)  # a Python int, also while traced
    y = torch.flip(x, [axis]) if attrs.get("reverse", 0) else x
    out = torch.cumsum(y, dim=axis)
    if attrs.get("exclusive", 0):
        out = out - y
    return [torch.flip(out, [axis]) if attrs.get("reverse", 0) else out]


@op("TopK")
def _topk(vals, attrs):
    x, k = vals[0], ints(vals[1])[0]
    axis = _axis(attrs.get("axis", -1), x.ndim)
    # written as TopK again, where onnxruntime puts the lower index first among equal values; torch's
    # own order among them may differ while calibrating (a stable sort would not export)
    values, indices = torch.topk(x, k, dim=axis, largest=bool(attrs.get("largest", 1)), sorted=True)
    return [values, indices]


# ---- normalizations ----------------------------------------------------------------------------

@op("LRN")
def _lrn(vals, attrs):
    """x / (bias + alpha / size * sum of x^2 over the channel window)^beta; the window is
    [c - floor((size - 1) / 2), c + ceil((size - 1) / 2)] (torch's own pads even sizes the other way)."""
    x = vals[0]
    size = int(attrs["size"])
    alpha, beta, bias = attrs.get("alpha", 1e-4), attrs.get("beta", 0.75), attrs.get("bias", 1.0)
    n, c = x.shape[0], x.shape[1]
    squares = (x * x).reshape(n, 1, c, -1)
    padded = F.pad(squares, (0, 0, (size - 1) // 2, size // 2))
    window_sum = F.avg_pool2d(padded, (size, 1), stride=1) * size
    return [x / (bias + alpha / size * window_sum.reshape(x.shape)) ** beta]


@op("InstanceNormalization")
def _instance_norm(vals, attrs):
    x, scale, bias = vals[:3]
    return [F.instance_norm(x, weight=scale, bias=bias, eps=attrs.get("epsilon", 1e-5))]


@op("GroupNormalization")
def _group_norm(vals, attrs):
    x, scale, bias = vals[:3]  # opset 21: one scale and bias per channel (onnx's checker refuses opset 18's form)
    return [F.group_norm(x, int(attrs["num_groups"]), scale, bias, eps=attrs.get("epsilon", 1e-5))]


@op("LpNormalization")
def _lp_norm(vals, attrs):
    x = vals[0]
    axis, p = attrs.get("axis", -1), attrs.get("p", 2)
    norm = x.abs().sum(dim=axis, keepdim=True) if p == 1 else torch.sqrt((x * x).sum(dim=axis, keepdim=True))
    return [x / norm]


@op("RMSNormalization", "SimplifiedLayerNormalization")
def _rms_norm(vals, attrs):
    """x / sqrt(mean(x^2) + epsilon) * scale over the axes from `axis` on: opset 23's RMSNormalization
    and onnxruntime's SimplifiedLayerNormalization (LLaMA's RMSNorm) compute the same."""
    x, scale = vals[0], vals[1]
    axis = _axis(attrs.get("axis", -1), x.ndim)
    mean_square = (x * x).mean(dim=tuple(range(axis, x.ndim)), keepdim=True)
    return [x * torch.rsqrt(mean_square + attrs.get("epsilon", 1e-5)) * scale]


# ---- layout ------------------------------------------------------------------------------------

@op("EmbedLayerNormalization:positions")
def _positions(vals, attrs):
    """0 .. S-1 for ids of shape (batch, S): BERT's default position ids."""
    return [torch.arange(vals[0].shape[1], device=vals[0].device)]


@op("EmbedLayerNormalization:mask-index")
def _mask_index(vals, attrs):
    return [vals[0].to(torch.int64).sum(dim=1).to(torch.int32)]


@op("Transpose:last-two")
def _transpose_last_two(vals, attrs):
    """The last two axes swapped (onnxruntime's FusedMatMul transA / transB, rewritten)."""
    return [vals[0].transpose(-1, -2)]


@op("DepthToSpace")
def _depth_to_space(vals, attrs):
    x = vals[0]
    b = int(attrs["blocksize"])
    n, c, (h, w) = x.shape[0], int(x.shape[1]), padded_sizes(x)  # traced where the export keeps sizes open
    if attrs.get("mode", "DCR") == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:  # CRD
        y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return [y.reshape(n, c // (b * b), h * b, w * b)]


@op("SpaceToDepth")
def _space_to_depth(vals, attrs):
    x = vals[0]
    b = int(attrs["blocksize"])
    n, c, (h, w) = x.shape[0], int(x.shape[1]), padded_sizes(x)
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return [y.reshape(n, c * b * b, h // b, w // b)]


@op("Trilu")
def _trilu(vals, attrs):
    x = vals[0]
    k = ints(vals[1])[0] if len(vals) > 1 and vals[1] is not None else 0
    return [torch.triu(x, k) if attrs.get("upper", 1) else torch.tril(x, k)]


@op("Einsum")
def _einsum(vals, attrs):
    return [torch.einsum(attrs["equation"].replace(" ", ""), *vals)]


# ---- indexing ----------------------------------------------------------------------------------

def _wrapped(index: Tensor, size: int) -> Tensor:
    """Negative ONNX indices count from the end."""
    return torch.where(index < 0, index + size, index)


@op("GatherElements")
def _gather_elements(vals, attrs):
    x, index = vals
    axis = _axis(attrs.get("axis", 0), x.ndim)
    return [torch.gather(x, axis, _wrapped(tensor(index), x.shape[axis]))]


@op("ScatterElements", "Scatter")
def _scatter_elements(vals, attrs):
    x, index, updates = vals
    axis = _axis(attrs.get("axis", 0), x.ndim)
    index = _wrapped(tensor(index), x.shape[axis])
    how = attrs.get("reduction", "none")
    if how == "none":
        return [torch.scatter(x, axis, index, updates)]
    reduce_name = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}[how]
    return [torch.scatter_reduce(x, axis, index, updates, reduce_name, include_self=True)]


def _nd_rows(data: Tensor, index: Tensor, batch_dims: int) -> tuple[Tensor, Tensor]:
    """(data with its batch and indexed axes flattened to one, flat row numbers of `index`'s
    tuples): GatherND and ScatterND address rows of that flattened tensor. The sizes are read
    from the tensors, not as ints, so that while the exporter traces they stay the file's sizes
    (a mask gathered over the batch and tokens, as torch.onnx writes BERT's)."""
    depth = int(index.shape[-1])
    indexed = list(data.shape[batch_dims:batch_dims + depth])
    rows = torch.zeros_like(index[..., 0], dtype=torch.int64)
    for axis, size in enumerate(indexed):
        rows = rows * size + _wrapped(index[..., axis].to(torch.int64), size)
    flat = data.flatten(0, batch_dims + depth - 1) if batch_dims + depth > 0 else data.unsqueeze(0)
    if batch_dims:
        batches = data.flatten(0, batch_dims - 1).shape[0]
        offsets = torch.arange(batches, dtype=torch.int64, device=data.device) * math.prod(indexed)
        rows = rows + offsets.reshape(*index.shape[:batch_dims], *([1] * (rows.ndim - batch_dims)))
    return flat, rows


@op("GatherND")
def _gather_nd(vals, attrs):
    data, index = vals[0], tensor(vals[1])
    flat, rows = _nd_rows(data, index, int(attrs.get("batch_dims", 0)))
    return [flat[rows.reshape(-1)].reshape(*rows.shape, *flat.shape[1:])]


@op("ScatterND")
def _scatter_nd(vals, attrs):
    data, index, updates = vals[0], tensor(vals[1]), vals[2]
    if attrs.get("reduction", "none") != "none":
        raise ValueError(f"ScatterND reduction {attrs['reduction']!r} is not supported (only 'none')")
    flat, rows = _nd_rows(data, index, 0)
    out = flat.index_put((rows.reshape(-1),), updates.reshape(-1, *flat.shape[1:]))
    return [out.reshape(data.shape)]


@op("OneHot")
def _one_hot(vals, attrs):
    indices, depth, values = tensor(vals[0]), ints(vals[1])[0], vals[2]
    axis = attrs.get("axis", -1)
    positions = torch.arange(depth, device=indices.device)
    wrapped = _wrapped(indices.to(torch.int64), depth)
    rank = indices.ndim + 1
    axis = _axis(axis, rank)
    shape = [1] * rank
    shape[axis] = depth
    hot = wrapped.unsqueeze(axis) == positions.reshape(shape)
    return [torch.where(hot, values[1], values[0])]


@op("EyeLike")
def _eye_like(vals, attrs):
    x = vals[0]
    dtype = DTYPES.get(attrs["dtype"], x.dtype) if "dtype" in attrs else x.dtype
    rows, cols, k = int(x.shape[0]), int(x.shape[1]), int(attrs.get("k", 0))
    return [torch.ones(rows, cols, dtype=dtype).triu(k).tril(k)]


GRID_SAMPLE_MODES = {"bilinear": "bilinear", "linear": "bilinear", "nearest": "nearest", "bicubic": "bicubic",
                     "cubic": "bicubic"}  # opset 16's names, then opset 20's


@op("GridSample")
def _grid_sample(vals, attrs):
    x, grid = vals
    mode = GRID_SAMPLE_MODES.get(attrs.get("mode", "bilinear"))
    padding = attrs.get("padding_mode", "zeros")
    if mode is None or x.ndim != 4 or padding not in ("zeros", "border", "reflection"):
        raise ValueError(f"GridSample mode {attrs.get('mode')!r}, padding {padding!r} on a rank-{x.ndim} tensor is "
                         "not supported (4-D; bilinear, nearest or bicubic; zeros, border or reflection)")
    return [F.grid_sample(x, grid, mode=mode, padding_mode=padding, align_corners=bool(attrs.get("align_corners", 0)))]
