"""Torch implementations of the ONNX operators that rankfold's ONNX front-end understands.

Each op takes the list of input values and the node's attributes (a dict) and returns the list of
outputs. A value is a torch.Tensor, or a Python int / list of ints for shape arithmetic (the
batch size stays symbolic that way through both of PyTorch's exporters), or None for an omitted
optional input.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rankfold.frontends.activations import FUSED_SCALE_SHIFT, FUSED_SILU

Value = Any
OpFn = Callable[[list[Value], dict[str, Any]], list[Value]]
OPS: dict[str, OpFn] = {}

# ONNX TensorProto data types -> torch dtypes
DTYPES = {
    1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
    9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16,
}


def op(*names: str) -> Callable[[OpFn], OpFn]:
    def register(fn: OpFn) -> OpFn:
        for name in names:
            OPS[name] = fn
        return fn

    return register


_SIZES_TRACED = contextvars.ContextVar("rankfold_sizes_traced", default=False)


@contextlib.contextmanager
def sizes_traced() -> Iterator[None]:
    """While the exporter traces a graph whose sizes after the batch stay open: Shape hands out
    every size as the tracer's symbolic value, so sizes computed from it follow the input."""
    token = _SIZES_TRACED.set(True)
    try:
        yield
    finally:
        _SIZES_TRACED.reset(token)


def is_shape(v: Value) -> bool:
    """Shape arithmetic values: Python ints and lists, and (while the TorchScript exporter traces)
    the 0-d integer tensors it hands out for sizes, which must stay symbolic, not become lists."""
    if isinstance(v, (int, list)):
        return True
    return isinstance(v, Tensor) and v.ndim == 0 and not v.dtype.is_floating_point and torch.jit.is_tracing()


def tensor(v: Value, like: Tensor | None = None) -> Tensor:
    """A Python shape value as a tensor (int64, or `like`'s dtype when given)."""
    if isinstance(v, Tensor):
        return v
    if isinstance(v, list) and any(isinstance(i, Tensor) for i in v):  # traced sizes: stacked, not read
        dtype = torch.int64 if like is None else like.dtype
        return torch.stack([torch.as_tensor(i).to(dtype).reshape(()) for i in v])
    if like is None:
        return torch.tensor(v, dtype=torch.int64)
    return torch.tensor(v, dtype=like.dtype, device=like.device)


def ints(v: Value) -> list[int]:
    """A shape-like value as a list of Python ints."""
    if isinstance(v, Tensor):
        if is_shape(v):  # a traced size: keep it symbolic
            return [v]
        if _SIZES_TRACED.get() and torch.jit.is_tracing() and not v.dtype.is_floating_point and v.ndim == 1:
            return list(v.unbind())  # sizes computed as a tensor (Where, Concat of traced sizes) stay symbolic
        return [int(i) for i in v.reshape(-1).tolist()]
    if isinstance(v, int):
        return [v]
    return list(v)


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# ---- elementwise -------------------------------------------------------------------------

def _binary(tensor_fn: Callable[[Tensor, Tensor], Tensor], int_fn: Callable[[int, int], int]) -> OpFn:
    def run(vals, attrs):
        a, b = vals
        if is_shape(a) and is_shape(b):
            if not isinstance(a, list) and not isinstance(b, list):  # two sizes (a traced one too): a size
                return [int_fn(a, b)]
            la, lb = ints(a), ints(b)
            if len(la) == 1:
                la = la * len(lb)
            if len(lb) == 1:
                lb = lb * len(la)
            return [[int_fn(x, y) for x, y in zip(la, lb)]]
        like = a if isinstance(a, Tensor) else b
        return [tensor_fn(tensor(a, like), tensor(b, like))]

    return run


def _size_div(a, b):
    """Two sizes divided as ONNX divides integers (truncated); a traced size stays traced."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return torch.div(tensor(a), tensor(b), rounding_mode="trunc")
    return int(a / b)


def _int_div(a: Tensor, b: Tensor) -> Tensor:
    if a.dtype.is_floating_point:
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


OPS["Add"] = _binary(torch.add, lambda a, b: a + b)
OPS["Sub"] = _binary(torch.sub, lambda a, b: a - b)
OPS["Mul"] = _binary(torch.mul, lambda a, b: a * b)
OPS["Div"] = _binary(_int_div, _size_div)
OPS["Pow"] = _binary(torch.pow, lambda a, b: a**b)
OPS["Equal"] = _binary(torch.eq, lambda a, b: int(a == b))


def _unary(fn: Callable[[Tensor], Tensor]) -> OpFn:
    return lambda vals, attrs: [fn(vals[0] if isinstance(vals[0], Tensor) else tensor(vals[0]))]


for _name, _fn in {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf,
    "Sqrt": torch.sqrt, "Exp": torch.exp, "Log": torch.log, "Neg": torch.neg, "Abs": torch.abs,
    "Reciprocal": torch.reciprocal, "Floor": torch.floor, "Ceil": torch.ceil,
}.items():
    OPS[_name] = _unary(_fn)


@op("Identity", "Dropout")
def _identity(vals, attrs):
    return [vals[0]]


@op("LeakyRelu")
def _leaky_relu(vals, attrs):
    return [F.leaky_relu(vals[0], attrs.get("alpha", 0.01))]


@op("Elu")
def _elu(vals, attrs):
    return [F.elu(vals[0], attrs.get("alpha", 1.0))]


@op("HardSigmoid")
def _hard_sigmoid(vals, attrs):
    alpha, beta = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)
    return [torch.clamp(vals[0] * alpha + beta, 0.0, 1.0)]


@op("HardSwish")
def _hard_swish(vals, attrs):
    return [F.hardswish(vals[0])]


@op(FUSED_SCALE_SHIFT)
def _scale_shift(vals, attrs):
    x, scale, shift = vals
    if not isinstance(x, Tensor):  # shape arithmetic in float (a Resize's sizes): as the two nodes
        return OPS["Add"]([OPS["Mul"]([x, scale], attrs)[0], shift], attrs)
    return [torch.addcmul(shift, x, scale)]


@op(FUSED_SILU)
def _silu(vals, attrs):
    return [F.silu(vals[0])]


@op("Gelu")
def _gelu(vals, attrs):
    return [F.gelu(vals[0], approximate=attrs.get("approximate", "none"))]


@op("Clip")
def _clip(vals, attrs):
    x = vals[0]
    low = vals[1] if len(vals) > 1 and vals[1] is not None else attrs.get("min")
    high = vals[2] if len(vals) > 2 and vals[2] is not None else attrs.get("max")
    # Bounds the graph computes stay tensors: a spectrogram's floor of its own maximum minus 80 dB
    # as a Python float cut the gradient, warned, and was baked as one constant into a traced export.
    return [torch.clamp(x, _clip_bound(low), _clip_bound(high))]


def _clip_bound(bound):
    return bound if bound is None or isinstance(bound, Tensor) else float(bound)


@op("Softmax", "LogSoftmax")
def _softmax(vals, attrs):
    x = vals[0]
    fn = F.log_softmax if attrs.get("_op") == "LogSoftmax" else F.softmax
    if attrs.get("_opset", 13) < 13:  # old semantics: flatten to 2-D at `axis`
        axis = _axis(attrs.get("axis", 1), x.ndim)
        flat = x.reshape(*x.shape[:axis], -1) if axis > 0 else x.reshape(1, -1)
        return [fn(flat.flatten(0, max(axis - 1, 0)) if axis > 1 else flat, dim=-1).reshape(x.shape)]
    return [fn(x, dim=attrs.get("axis", -1))]


@op("Where")
def _where(vals, attrs):
    cond, a, b = vals
    like = a if isinstance(a, Tensor) else b if isinstance(b, Tensor) else None
    return [torch.where(tensor(cond).bool(), tensor(a, like), tensor(b, like))]


@op("Cast")
def _cast(vals, attrs):
    x = vals[0]
    dtype = DTYPES[attrs["to"]]
    if is_shape(x):  # sizes stay shape values, unless made floats (a head size's square root, a scale)
        return [tensor(x).to(dtype) if dtype.is_floating_point else x]
    return [x.to(dtype)]


# ---- linear algebra and normalisation ---------------------------------------------------

@op("MatMul")
def _matmul(vals, attrs):
    return [torch.matmul(vals[0], vals[1])]


@op("Gemm")
def _gemm(vals, attrs):
    a, b = vals[0], vals[1]
    if attrs.get("transA", 0):
        a = a.transpose(0, 1)
    if attrs.get("transB", 0):
        b = b.transpose(0, 1)
    out = attrs.get("alpha", 1.0) * (a @ b)
    if len(vals) > 2 and vals[2] is not None:
        out = out + attrs.get("beta", 1.0) * vals[2]
    return [out]


@op("BatchNormalization")
def _batch_norm(vals, attrs):
    x, scale, bias, mean, var = vals[:5]
    return [F.batch_norm(x, mean, var, scale, bias, training=False, eps=attrs.get("epsilon", 1e-5))]


@op("LayerNormalization")
def _layer_norm(vals, attrs):
    x, scale = vals[0], vals[1]
    bias = vals[2] if len(vals) > 2 else None
    axis = _axis(attrs.get("axis", -1), x.ndim)
    features = tuple(int(d) for d in x.shape[axis:])  # static: exporters need constant sizes here
    if tuple(scale.shape) == features and (bias is None or tuple(bias.shape) == features):
        return [F.layer_norm(x, features, scale, bias, eps=attrs.get("epsilon", 1e-5))]
    # a scale (bias) that broadcasts to the normalized axes (one per channel over C x H x W)
    normalized = F.layer_norm(x, features, eps=attrs.get("epsilon", 1e-5)) * scale
    return [normalized + bias if bias is not None else normalized]


# ---- pooling -----------------------------------------------------------------------------

def _pool_geometry(x: Tensor, attrs: dict) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    kernel = list(attrs["kernel_shape"])
    nd = len(kernel)
    strides = list(attrs.get("strides", [1] * nd))
    dilations = list(attrs.get("dilations", [1] * nd))
    pads = list(attrs.get("pads", [0] * (2 * nd)))
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = same_pads(padded_sizes(x), kernel, strides, dilations, upper=auto_pad == "SAME_UPPER")
    elif auto_pad == "VALID":
        pads = [0] * (2 * nd)
    return kernel, strides, dilations, pads[:nd], pads[nd:]


def static_sizes(x: Tensor) -> list[int]:
    """The sizes after batch and channels as Python ints: while an exporter traces, a size read
    from a tensor is a traced value that padding and kernel arguments cannot take."""
    return [int(d) for d in x.shape[2:]]


def padded_sizes(x: Tensor) -> list:
    """The sizes after batch and channels that SAME padding follows: Python ints, or while the
    export keeps sizes open (sizes_traced) the tracer's symbols, so that the file pads each input
    as its own size asks (at stride 2 the padding follows the size's parity)."""
    if _SIZES_TRACED.get() and torch.jit.is_tracing():
        return list(x.shape[2:])
    return static_sizes(x)


def explicit_padding(begins: list, ends: list, kernel: list[int]) -> bool:
    """Whether pooling must pad by F.pad first: torch pads symmetrically, at most half the kernel,
    and by constants (padding computed from traced sizes is always explicit)."""
    if any(isinstance(p, Tensor) for p in begins + ends):
        return True
    return begins != ends or any(b > k // 2 for b, k in zip(begins, kernel))


def same_pads(size: list, kernel, strides, dilations, *, upper: bool) -> list:
    """ONNX SAME_UPPER / SAME_LOWER padding as [begin..., end...] (ints, or traced sizes' symbols)."""
    begins, ends = [], []
    for n, k, s, d in zip(size, kernel, strides, dilations):
        out = (n + s - 1) // s  # ceil(n / s) on positive sizes, for ints and traced sizes alike (an
        # exported floor division of a negative traced size truncates instead: -(-n // s) went wrong)
        total = (out - 1) * s + (k - 1) * d + 1 - n
        total = torch.clamp(total, min=0) if isinstance(total, Tensor) else max(total, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if upper else large)
        ends.append(large if upper else small)
    return begins + ends


def torch_pad_order(begins: list[int], ends: list[int]) -> list[int]:
    """ONNX [b1, b2, .., e1, e2, ..] as F.pad's (last axis first) [b_last, e_last, ...]."""
    out: list[int] = []
    for b, e in zip(reversed(begins), reversed(ends)):
        out += [b, e]
    return out


@op("MaxPool")
def _max_pool(vals, attrs):
    x = vals[0]
    kernel, strides, dilations, begins, ends = _pool_geometry(x, attrs)
    padding = begins
    if explicit_padding(begins, ends, kernel):
        x = F.pad(x, torch_pad_order(begins, ends), value=float("-inf"))
        padding = [0] * len(kernel)
    fn = F.max_pool1d if len(kernel) == 1 else F.max_pool2d
    return [fn(x, kernel, strides, padding, dilations, ceil_mode=bool(attrs.get("ceil_mode", 0)))]


@op("AveragePool")
def _avg_pool(vals, attrs):
    x = vals[0]
    kernel, strides, _dil, begins, ends = _pool_geometry(x, attrs)
    include = bool(attrs.get("count_include_pad", 0))
    padding = begins
    fn = F.avg_pool1d if len(kernel) == 1 else F.avg_pool2d
    ceil_mode = bool(attrs.get("ceil_mode", 0))
    if explicit_padding(begins, ends, kernel):  # torch pads symmetrically: pad here
        order = torch_pad_order(begins, ends)
        # The mean of the real values (padding not counted): window sums over window counts
        if not include and any(isinstance(p, Tensor) or p for p in begins + ends):
            counts = F.pad(torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device), order)
            sums = fn(F.pad(x, order), kernel, strides, 0, ceil_mode=ceil_mode, count_include_pad=True)
            return [sums / fn(counts, kernel, strides, 0, ceil_mode=ceil_mode, count_include_pad=True)]
        x = F.pad(x, order)
        padding = [0] * len(kernel)
    return [fn(x, kernel, strides, padding, ceil_mode=ceil_mode, count_include_pad=include)]


@op("GlobalAveragePool")
def _global_avg_pool(vals, attrs):
    x = vals[0]
    return [x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)]


@op("GlobalMaxPool")
def _global_max_pool(vals, attrs):
    x = vals[0]
    return [x.amax(dim=tuple(range(2, x.ndim)), keepdim=True)]


def _reduce(fn_name: str) -> OpFn:
    def run(vals, attrs):
        x = vals[0]
        axes = ints(vals[1]) if len(vals) > 1 and vals[1] is not None else attrs.get("axes")
        keep = bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return [x]
            axes = list(range(x.ndim))
        dims = tuple(_axis(a, x.ndim) for a in axes)
        if fn_name == "mean":
            return [x.mean(dim=dims, keepdim=keep)]
        if fn_name == "sum":
            return [x.sum(dim=dims, keepdim=keep)]
        return [x.amax(dim=dims, keepdim=keep)]

    return run


OPS["ReduceMean"] = _reduce("mean")
OPS["ReduceSum"] = _reduce("sum")
OPS["ReduceMax"] = _reduce("max")


# ---- shapes ------------------------------------------------------------------------------

@op("Size")
def _size(vals, attrs):
    x = vals[0]
    return [x.numel() if isinstance(x, Tensor) else len(ints(x))]  # a shape value, as Shape's are


@op("Not")
def _not(vals, attrs):
    x = vals[0]
    if isinstance(x, Tensor):
        return [torch.logical_not(x)]
    return [int(not x)] if isinstance(x, int) else [[int(not v) for v in ints(x)]]  # a shape comparison


@op("Shape")
def _shape(vals, attrs):
    x = vals[0]
    # Only the batch dimension stays symbolic, unless the export keeps the sizes after it open
    # (sizes_traced; checked at other sizes, export.onnx): exporters need the others as constants
    # in some graphs (e.g. as LayerNorm or Resize sizes).
    traced = _SIZES_TRACED.get() and torch.jit.is_tracing()
    dims = ([x.shape[0], *(d if traced else int(d) for d in x.shape[1:])] if isinstance(x, Tensor)
            else [len(ints(x))])
    start, end = attrs.get("start", 0), attrs.get("end", None)
    return [dims[start:end]]


@op("Flatten")
def _flatten(vals, attrs):
    x = vals[0]
    axis = _axis(attrs.get("axis", 1), x.ndim)
    if axis == 0:
        return [x.reshape(1, -1)]
    lead = x.flatten(0, axis - 1) if axis > 1 else x
    return [lead.flatten(1) if lead.ndim > 1 else lead.unsqueeze(1)]


@op("Reshape")
def _reshape(vals, attrs):
    x, shape = vals[0], ints(vals[1])
    if is_shape(x) and len(shape) <= 1:  # a size or shape value as a scalar or a vector: still shape arithmetic
        values = ints(x)
        return [values[0] if not shape and len(values) == 1 else values]
    if not isinstance(x, Tensor):
        x = tensor(x)
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if isinstance(d, int) and d == 0 else d for i, d in enumerate(shape)]
    # The leading 1 of a graph exported at batch 1 is the batch (batch_free_steps); the export, traced
    # at batch 1, keeps the file's constant shape.
    if attrs.get("batch_lead") and not torch.jit.is_tracing():
        shape = [x.shape[0], *shape[1:]]
    return [x.reshape(shape)]


@op("Transpose")
def _transpose(vals, attrs):
    x = vals[0]
    perm = attrs.get("perm", list(reversed(range(x.ndim))))
    return [x.permute(*perm)]


def _small_int_vector(v: Value) -> bool:
    return isinstance(v, Tensor) and v.ndim <= 1 and v.numel() <= 8 and not v.dtype.is_floating_point


@op("Concat")
def _concat(vals, attrs):
    parts = [v for v in vals if v is not None]
    # A size read from the input beside constant integer vectors (tf2onnx's Concat(batch, [512, 256]))
    # is a shape: kept as a list, or torch.cat would bake the traced batch into the export.
    if all(is_shape(v) or _small_int_vector(v) for v in parts) and any(is_shape(v) for v in parts):
        out: list = []
        for v in parts:
            out += ints(v) if not isinstance(v, list) else v
        return [out]
    like = next(v for v in parts if isinstance(v, Tensor))
    tensors = [tensor(v, like) for v in parts]
    tensors = [t for t in tensors if t.numel() or t.ndim > 1]
    return [torch.cat(tensors, dim=attrs["axis"])]


@op("Unsqueeze")
def _unsqueeze(vals, attrs):
    x = vals[0]
    axes = ints(vals[1]) if len(vals) > 1 and vals[1] is not None else list(attrs["axes"])
    if is_shape(x):
        return [[x]]
    rank = x.ndim + len(axes)
    for a in sorted(_axis(a, rank) for a in axes):
        x = x.unsqueeze(a)
    return [x]


@op("Squeeze")
def _squeeze(vals, attrs):
    x = vals[0]
    axes = ints(vals[1]) if len(vals) > 1 and vals[1] is not None else attrs.get("axes")
    if is_shape(x):
        return [ints(x)[0]] if isinstance(x, list) and len(x) == 1 else [x]
    if axes is None:
        return [x.squeeze()]
    for a in sorted((_axis(a, x.ndim) for a in axes), reverse=True):
        x = x.squeeze(a)
    return [x]


@op("Gather")
def _gather(vals, attrs):
    data, idx = vals
    axis = attrs.get("axis", 0)
    if is_shape(data):
        seq = ints(data)
        if isinstance(idx, Tensor):
            idx = idx.tolist()
        return [seq[idx] if isinstance(idx, int) else [seq[i] for i in ints(idx)]]
    if isinstance(idx, int) or (isinstance(idx, Tensor) and idx.ndim == 0):
        return [data.select(axis, int(idx))]
    index = tensor(idx)
    flat = torch.index_select(data, _axis(axis, data.ndim), index.reshape(-1))
    a = _axis(axis, data.ndim)
    return [flat.reshape(*data.shape[:a], *index.shape, *data.shape[a + 1:])]


@op("Slice")
def _slice(vals, attrs):
    x = vals[0]
    if len(vals) > 1:
        starts, ends = ints(vals[1]), ints(vals[2])
        axes = ints(vals[3]) if len(vals) > 3 and vals[3] is not None else list(range(len(starts)))
        steps = ints(vals[4]) if len(vals) > 4 and vals[4] is not None else [1] * len(starts)
    else:  # opset < 10: attributes
        starts, ends = list(attrs["starts"]), list(attrs["ends"])
        axes = list(attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    if is_shape(x):
        seq = ints(x)
        return [seq[slice(_clamp_index(starts[0]), _clamp_index(ends[0]), steps[0])]]
    index: list[slice] = [slice(None)] * x.ndim
    reversed_axes = []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        a = _axis(axis, x.ndim)
        if step < 0:  # torch slicing has no negative steps: pick the indices explicitly
            reversed_axes.append((a, list(range(x.shape[a]))[slice(_clamp_index(start), _clamp_index(end), step)]))
        else:
            index[a] = slice(_clamp_index(start), _clamp_index(end), step)
    out = x[tuple(index)]
    for a, picks in reversed_axes:
        out = torch.index_select(out, a, torch.tensor(picks, dtype=torch.int64, device=out.device))
    return [out]


def _clamp_index(i: int) -> int | None:
    """ONNX uses INT64_MAX / INT64_MIN for 'to the end'; Python slices use None."""
    big = 2**62
    if i >= big or i <= -big:
        return None
    return i


@op("Split")
def _split(vals, attrs):
    x = vals[0]
    axis = _axis(attrs.get("axis", 0), x.ndim)
    sizes = ints(vals[1]) if len(vals) > 1 and vals[1] is not None else attrs.get("split")
    if sizes is None:
        parts = attrs.get("num_outputs") or attrs["_outputs"]
        chunk = math.ceil(x.shape[axis] / parts)
        sizes = [min(chunk, x.shape[axis] - chunk * i) for i in range(parts)]
    return list(torch.split(x, list(sizes), dim=axis))


@op("Pad")
def _pad(vals, attrs):
    x = vals[0]
    pads = ints(vals[1]) if len(vals) > 1 else list(attrs["pads"])
    value = vals[2] if len(vals) > 2 and vals[2] is not None else attrs.get("value", 0.0)
    value = float(value.reshape(-1)[0]) if isinstance(value, Tensor) else float(value)
    axes = ints(vals[3]) if len(vals) > 3 and vals[3] is not None else list(range(x.ndim))
    half = len(pads) // 2
    begins, ends = [0] * x.ndim, [0] * x.ndim
    for i, a in enumerate(axes):
        begins[_axis(a, x.ndim)], ends[_axis(a, x.ndim)] = pads[i], pads[half + i]
    while begins and begins[0] == 0 and ends[0] == 0:  # F.pad only pads trailing axes
        begins, ends = begins[1:], ends[1:]
    mode = attrs.get("mode", "constant")
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    order = torch_pad_order(begins, ends)
    if torch_mode == "constant":
        return [F.pad(x, order, value=value)]
    # torch pads reflect / edge / wrap over the last k axes of a rank k+1 or k+2 tensor only: the
    # axes before them are folded into one (silero VAD reflects the last axis of a 4-D tensor)
    k = len(order) // 2
    if k == 0:
        return [x]
    kept = [int(d) for d in x.shape[1:x.ndim - k]]
    folded = x.reshape(1, -1, *x.shape[x.ndim - k:])
    padded = F.pad(folded, order, mode=torch_mode)
    return [padded.reshape(-1, *kept, *padded.shape[2:]) if x.ndim > k else padded.reshape(padded.shape[2:])]


LINEAR_RESIZE_MODES = {3: "linear", 4: "bilinear", 5: "trilinear"}
# ONNX coordinate transformations that torch's linear interpolation computes (pytorch_half_pixel
# differs from half_pixel only where an output axis has one sample); asymmetric is computed apart
LINEAR_RESIZE_ALIGN = {"half_pixel": False, "pytorch_half_pixel": False, "align_corners": True}


@op("Resize", "Upsample")
def _resize(vals, attrs):
    x = vals[0]
    mode = attrs.get("mode", "nearest")
    where = attrs.get("coordinate_transformation_mode", "half_pixel")
    if mode not in ("nearest", "linear", "cubic"):
        raise ValueError(f"Resize mode {mode!r} is not supported (only 'nearest', 'linear' and 'cubic')")
    cubic_as_torch = (where in LINEAR_RESIZE_ALIGN and x.ndim == 4 and not attrs.get("exclude_outside", 0)
                      and attrs.get("cubic_coeff_a", -0.75) == -0.75 and not attrs.get("antialias", 0))
    if mode == "cubic" and not cubic_as_torch:  # torch's bicubic: a = -0.75, border samples repeated
        raise ValueError(f"Resize mode 'cubic' is supported on 4-D tensors with cubic_coeff_a -0.75, "
                         f"exclude_outside 0, no antialias and coordinate_transformation_mode one of "
                         f"{', '.join(LINEAR_RESIZE_ALIGN)} (got {where!r} on a rank-{x.ndim} tensor)")
    if mode == "linear" and (where not in (*LINEAR_RESIZE_ALIGN, "asymmetric") or attrs.get("antialias", 0)
                             or x.ndim not in LINEAR_RESIZE_MODES):
        raise ValueError(f"Resize mode 'linear' with coordinate_transformation_mode {where!r} (antialias "
                         f"{attrs.get('antialias', 0)}) on a rank-{x.ndim} tensor is not supported (supported: "
                         f"{', '.join(LINEAR_RESIZE_ALIGN)}, asymmetric; no antialias; rank 3 to 5)")
    sizes = ints(vals[3])[2:] if len(vals) > 3 and vals[3] is not None and len(ints(vals[3])) else None
    scales = None
    if sizes is None:
        given = vals[2] if len(vals) > 2 else vals[1]
        scales = [float(v) for v in (given.reshape(-1).tolist() if isinstance(given, Tensor) else attrs["scales"])][2:]
    if mode == "linear" and where == "asymmetric":  # TF's resize without half-pixel centres
        inputs = padded_sizes(x)
        sizes = sizes or [_scaled_size(n, f) for n, f in zip(inputs, scales)]
        return [_asymmetric_linear_resize(x, sizes, scales or [m / int(n) for m, n in zip(sizes, inputs)])]
    if mode == "nearest" and not _nearest_as_torch(where, attrs.get("nearest_mode", "round_prefer_floor"), scales):
        inputs = padded_sizes(x)
        sizes = sizes or [_scaled_size(n, f) for n, f in zip(inputs, scales)]
        return [_nearest_resize(x, sizes, scales or [m / int(n) for m, n in zip(sizes, inputs)], where,
                                attrs.get("nearest_mode", "round_prefer_floor"), given_scales=scales is not None)]
    how = {"mode": "nearest"} if mode == "nearest" else {
        "mode": "bicubic" if mode == "cubic" else LINEAR_RESIZE_MODES[x.ndim],
        "align_corners": LINEAR_RESIZE_ALIGN[where]}
    if sizes is not None:
        return [F.interpolate(x, size=sizes, **how)]
    return [F.interpolate(x, scale_factor=scales, **how)]


def _nearest_as_torch(where: str, rounding: str, scales: list[float] | None) -> bool:
    """Whether torch's nearest resize (source floor(o / scale)) picks what ONNX asks: always for
    asymmetric coordinates rounded down; for half-pixel ones rounded half down (ONNX's default)
    where every scale is a whole upscaling factor (the half-pixel offset then never reaches a
    rounding boundary)."""
    if where == "asymmetric" and rounding == "floor":
        return True
    return (where in ("half_pixel", "pytorch_half_pixel") and rounding == "round_prefer_floor"
            and scales is not None and all(s >= 1 and float(s).is_integer() for s in scales))


def _scaled_size(n, scale: float):
    """floor(n * scale): a Python int, or while the export keeps sizes open (padded_sizes) a traced
    size, so the written file resizes each input by its own size."""
    if isinstance(n, Tensor):
        return torch.floor(n.to(torch.float64) * scale).to(torch.int64)
    return int(math.floor(n * scale))


def _positive(m) -> Tensor:
    return torch.as_tensor(m > 1)


# ONNX's source coordinate of output samples o (float32, as onnxruntime computes them), from the
# scale s, the input size n and the output size m (Python ints, or traced sizes)
NEAREST_SOURCE = {
    "half_pixel": lambda o, s, n, m: (o + 0.5) / s - 0.5,
    "pytorch_half_pixel": lambda o, s, n, m: torch.where(_positive(m), (o + 0.5) / s - 0.5, 0.0),
    "align_corners": lambda o, s, n, m: torch.where(_positive(m), o * (n - 1) / torch.clamp(
        torch.as_tensor(m - 1), min=1), 0.0).to(torch.float32),
    "asymmetric": lambda o, s, n, m: o / s,
    "tf_half_pixel_for_nn": lambda o, s, n, m: (o + 0.5) / s,
}
NEAREST_ROUNDING = {
    "round_prefer_floor": lambda c: torch.where(c - c.floor() <= 0.5, c.floor(), c.ceil()),
    "round_prefer_ceil": lambda c: torch.where(c - c.floor() >= 0.5, c.ceil(), c.floor()),
    "floor": torch.floor,
    "ceil": torch.ceil,
}


def _nearest_resize(x: Tensor, sizes: list, scales: list[float], where: str, rounding: str,
                    given_scales: bool = False) -> Tensor:
    """Nearest resize by ONNX's own coordinates and rounding, axis by axis (a gather each; the
    source coordinates in float32, as onnxruntime computes them). Sizes may be traced: the
    written file then picks its samples for each input's own size."""
    if where not in NEAREST_SOURCE or rounding not in NEAREST_ROUNDING:
        raise ValueError(f"Resize nearest with coordinate_transformation_mode {where!r} and nearest_mode "
                         f"{rounding!r} is not supported (supported: {', '.join(NEAREST_SOURCE)}; "
                         f"{', '.join(NEAREST_ROUNDING)})")
    traced = torch.jit.is_tracing()
    for axis, (out_size, scale) in enumerate(zip(sizes, scales), start=2):
        n = x.shape[axis]
        # onnxruntime leaves an axis of scale 1 as it is, whatever the offset
        if scale == 1 and (given_scales or (not traced and out_size == n)):
            continue
        o = torch.arange(out_size, device=x.device).to(torch.float32)
        source = NEAREST_SOURCE[where](o, torch.tensor(scale, dtype=torch.float32), n, out_size)
        index = torch.clamp(NEAREST_ROUNDING[rounding](source), min=0)
        index = torch.minimum(index.to(torch.int64), torch.as_tensor(n - 1, device=x.device))
        x = torch.index_select(x, axis, index)
    return x


def _asymmetric_linear_resize(x: Tensor, sizes: list, scales: list[float]) -> Tensor:
    """Linear resize where output sample o reads input position o / scale, axis by axis (two
    gathers and a blend each; exported as Gather, which onnxruntime runs as the Resize it was)."""
    for axis, (out_size, scale) in enumerate(zip(sizes, scales), start=2):
        last = torch.as_tensor(x.shape[axis] - 1, device=x.device)
        position = torch.minimum(torch.arange(out_size, device=x.device).to(torch.float64) / scale,
                                 last.to(torch.float64))
        low = position.floor().to(torch.int64)
        high = torch.minimum(low + 1, last)
        weight = (position - low).to(x.dtype).reshape([-1] + [1] * (x.ndim - 1 - axis))
        x = torch.index_select(x, axis, low) * (1 - weight) + torch.index_select(x, axis, high) * weight
    return x


@op("Expand")
def _expand(vals, attrs):
    x, shape = vals[0], ints(vals[1])
    return [x.expand(_broadcast_sizes(list(x.shape), shape))]


def _broadcast_sizes(sizes: list, target: list) -> list:
    """ONNX Expand's output sizes: per axis the size that is not 1. While the exporter traces,
    the sizes are symbols valued at the example: where both read 1 (a batch of 1 expanded to a
    traced batch), the target's symbol is kept, so the written file expands to the batch it gets
    (torch.broadcast_shapes would return the constant 1 and bake it)."""
    rank = max(len(sizes), len(target))
    sizes = [1] * (rank - len(sizes)) + sizes
    target = [1] * (rank - len(target)) + target
    out = []
    for own, wanted in zip(sizes, target):
        if int(own) != 1 and int(wanted) != 1 and int(own) != int(wanted):
            raise ValueError(f"cannot expand size {int(own)} to {int(wanted)}")
        out.append(own if int(wanted) == 1 and not (int(own) == 1 and isinstance(wanted, Tensor)) else wanted)
    return out


@op("ConstantOfShape")
def _constant_of_shape(vals, attrs):
    value = attrs.get("value")
    fill = value.reshape(-1)[0] if isinstance(value, Tensor) else torch.tensor(0.0)
    return [torch.full(ints(vals[0]), fill.item(), dtype=fill.dtype)]


@op("Tile")
def _tile(vals, attrs):
    return [vals[0].repeat(*ints(vals[1]))]


@op("PRelu")
def _prelu(vals, attrs):
    x, slope = vals[0], vals[1]
    shape = (1,) * (x.dim() - slope.dim()) + tuple(slope.shape)
    per_channel = x.dim() >= 2 and all(d == 1 for i, d in enumerate(shape) if i != 1) and shape[1] in (1, x.shape[1])
    if per_channel:  # exported as PRelu again (not Where): the int8 C back-end runs it as a table per channel
        return [torch.nn.functional.prelu(x, slope.reshape(-1))]
    return [torch.where(x >= 0, x, x * slope)]


@op("Range")
def _range(vals, attrs):
    start, limit, delta = vals
    like = next((v for v in vals if isinstance(v, Tensor)), None)
    # Bounds that are Python ints (sizes folded at load) make a constant range, traced or not
    if like is None or (all(not isinstance(v, Tensor) or not v.dtype.is_floating_point for v in vals)
                        and not torch.jit.is_tracing()):
        return [torch.arange(ints(start)[0], ints(limit)[0], ints(delta)[0], dtype=torch.int64)]
    if torch.jit.is_tracing():  # a bound traced from the batch size stays a Range of it in the export
        return [torch.arange(*(tensor(v, like).reshape(()) for v in (start, limit, delta)))]
    return [torch.arange(tensor(start, like).item(), tensor(limit, like).item(), tensor(delta, like).item(),
                         dtype=like.dtype)]


@op("ConvTranspose")
def _conv_transpose(vals, attrs):
    x, weight = vals[0], vals[1]
    bias = vals[2] if len(vals) > 2 else None
    nd = weight.ndim - 2
    if nd not in (1, 2) or "output_shape" in attrs or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise ValueError("only 1-D and 2-D ConvTranspose with explicit pads is supported")
    pads = list(attrs.get("pads", [0] * 2 * nd))
    fn = F.conv_transpose1d if nd == 1 else F.conv_transpose2d
    y = fn(x, weight, bias, stride=attrs.get("strides", [1] * nd),
           output_padding=attrs.get("output_padding", [0] * nd), groups=attrs.get("group", 1),
           dilation=attrs.get("dilations", [1] * nd))
    # ONNX pads crop the full output, begin and end separately
    index = [slice(None), slice(None)] + [slice(b, y.shape[2 + i] - e) for i, (b, e) in
                                          enumerate(zip(pads[:nd], pads[nd:]))]
    return [y[tuple(index)]]


# ---- recurrent layers (ONNX gate orders: LSTM i, o, f, c; GRU z, r, h) ------------------------

def _recurrent_inputs(vals, attrs, gates: int):
    """(X as (seq, batch, in), W, R, Wb, Rb, hidden, directions) for LSTM / GRU."""
    x, r, hidden, directions = _sequence_first(vals, attrs)
    w = vals[1]
    bias = vals[3] if len(vals) > 3 and vals[3] is not None else torch.zeros(w.shape[0], 2 * gates * hidden)
    return x, w, r, bias[:, : gates * hidden], bias[:, gates * hidden :], hidden, directions


def _sequence_first(vals, attrs):
    """(vals[0] as (seq, batch, ...), R, hidden, directions): what every recurrent op reads alike."""
    if attrs.get("activations") is not None or attrs.get("clip") is not None:
        raise ValueError("only the default activations and no clip are supported")
    first = vals[0].transpose(0, 1) if attrs.get("layout", 0) else vals[0]
    directions = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}[
        attrs.get("direction", "forward")]
    r = _recurrent_weights(vals[2], attrs)
    return first, r, attrs.get("hidden_size") or vals[2].shape[-1], directions


def _recurrent_weights(r: Tensor | None, attrs) -> list[Callable[[Tensor], Tensor]]:
    """h -> h R^T per direction: the converter's layers (attrs["_modules"]) or the weight tensor."""
    if "_modules" in attrs:
        return list(attrs["_modules"])
    return [lambda h, w=w: h @ w.T for w in r]


def _initial(vals, index: int, d: int, batch: int, hidden: int, like: Tensor) -> Tensor:
    state = vals[index] if len(vals) > index and vals[index] is not None else None
    return state[d] if state is not None else like.new_zeros(batch, hidden)


def _recurrent_outputs(ys: list[Tensor], finals: list[list[Tensor]], attrs) -> list[Tensor]:
    y = torch.stack(ys, 1)  # (seq, directions, batch, hidden)
    states = [torch.stack(s, 0) for s in zip(*finals)]  # each (directions, batch, hidden)
    if attrs.get("layout", 0):
        y = y.permute(2, 0, 1, 3)
        states = [s.transpose(0, 1) for s in states]
    return [y, *states]


@op("LSTM")
def _lstm(vals, attrs):
    x, w, r, wb, rb, hidden, directions = _recurrent_inputs(vals, attrs, 4)
    return _lstm_steps([x @ w[d].T + wb[d] + rb[d] for d in range(len(directions))], vals, attrs, r, hidden,
                       directions)


@op("LSTMProjected")
def _lstm_projected(vals, attrs):
    """An LSTM whose input projection x W^T + Wb + Rb ran before it, as a Linear layer (vals[0]:
    every direction's gate inputs side by side on the last axis); the rest as the LSTM node's."""
    projected, r, hidden, directions = _sequence_first(vals, attrs)
    return _lstm_steps(projected.chunk(len(directions), -1), vals, attrs, r, hidden, directions)


def _lstm_steps(inputs_by_direction, vals, attrs, r, hidden, directions):
    if len(vals) > 7 and vals[7] is not None:
        raise ValueError("LSTM peepholes are not supported")
    ys, finals = [], []
    for d, backward in enumerate(directions):
        inputs = inputs_by_direction[d]  # every step's input part at once: (seq, batch, 4 * hidden)
        h = _initial(vals, 5, d, inputs.shape[1], hidden, inputs)
        c = _initial(vals, 6, d, inputs.shape[1], hidden, inputs)
        out = [None] * inputs.shape[0]
        for t in (reversed(range(inputs.shape[0])) if backward else range(inputs.shape[0])):
            i, o, f, g = (inputs[t] + r[d](h)).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            out[t] = h
        ys.append(torch.stack(out))
        finals.append([h, c])
    return _recurrent_outputs(ys, finals, attrs)


@op("GRU")
def _gru(vals, attrs):
    x, w, r, wb, rb, hidden, directions = _recurrent_inputs(vals, attrs, 3)
    return _gru_steps([x @ w[d].T + wb[d] for d in range(len(directions))], vals, attrs, r, rb, hidden, directions)


@op("GRUProjected")
def _gru_projected(vals, attrs):
    """A GRU whose input projection x W^T + Wb ran before it, as a Linear layer (see LSTMProjected).
    vals[3] is the recurrent bias Rb alone, (directions, 3 * hidden): it stays inside the reset
    gate's product."""
    projected, r, hidden, directions = _sequence_first(vals, attrs)
    rb = vals[3] if len(vals) > 3 and vals[3] is not None else torch.zeros(len(r), 3 * hidden)
    return _gru_steps(projected.chunk(len(directions), -1), vals, attrs, r, rb, hidden, directions)


def _gru_steps(inputs_by_direction, vals, attrs, r, rb, hidden, directions):
    before_reset = bool(attrs.get("linear_before_reset", 0))
    ys, finals = [], []
    for d, backward in enumerate(directions):
        inputs = inputs_by_direction[d]
        h = _initial(vals, 5, d, inputs.shape[1], hidden, inputs)
        bz, br, bh = rb[d].chunk(3, -1)
        out = [None] * inputs.shape[0]
        for t in (reversed(range(inputs.shape[0])) if backward else range(inputs.shape[0])):
            xz, xr, xh = inputs[t].chunk(3, -1)
            hz, hr, hh = r[d](h).chunk(3, -1)
            z = torch.sigmoid(xz + hz + bz)
            reset = torch.sigmoid(xr + hr + br)
            if not before_reset:  # the candidate's R reads reset * h: all three gates' rows, the last kept
                hh = r[d](reset * h).chunk(3, -1)[2]
            candidate = torch.tanh(xh + reset * (hh + bh) if before_reset else xh + hh + bh)
            h = (1 - z) * candidate + z * h
            out[t] = h
        ys.append(torch.stack(out))
        finals.append([h])
    return _recurrent_outputs(ys, finals, attrs)


# ---- already-quantized graphs: computed in float, exactly where float32 holds the integers ---------

def _per_axis(v: Tensor, x: Tensor, axis: int) -> Tensor:
    """A scale or zero point (scalar or 1-D along `axis`) shaped to broadcast against `x`."""
    if v.ndim == 0 or v.numel() == 1:
        return v.reshape(())
    shape = [1] * x.ndim
    shape[_axis(axis, x.ndim)] = -1
    return v.reshape(shape)


def _zero_point(vals, index: int, like: Tensor) -> Tensor:
    return vals[index] if len(vals) > index and vals[index] is not None else torch.zeros((), dtype=like.dtype)


def _blocks_repeated(v: Tensor, x: Tensor, axis: int, block_size: int) -> Tensor:
    """A blocked scale or zero point (x's rank, ceil(n / block_size) along `axis`) repeated to x's shape."""
    axis = _axis(axis, x.ndim)
    return v.repeat_interleave(block_size, dim=axis).narrow(axis, 0, x.shape[axis])


@op("DequantizeLinear")
def _dequantize(vals, attrs):
    x, scale = vals[0], vals[1]
    axis = attrs.get("axis", 1)
    zero = _zero_point(vals, 2, x)
    block_size = attrs.get("block_size", 0)
    if block_size:  # opset 21 blocked quantization: a scale (and zero point) per block along `axis`
        zero = _blocks_repeated(zero, x, axis, block_size) if zero.ndim else zero
        return [(x.to(torch.float32) - zero.to(torch.float32)) * _blocks_repeated(scale, x, axis, block_size)]
    return [(x.to(torch.float32) - _per_axis(zero, x, axis).to(torch.float32)) * _per_axis(scale, x, axis)]


_INT_RANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.int32: (-(2**31), 2**31 - 1)}


@op("QuantizeLinear")
def _quantize(vals, attrs):
    x, scale = vals[0], vals[1]
    axis = attrs.get("axis", 1)
    zero = _zero_point(vals, 2, torch.zeros((), dtype=torch.uint8))
    low, high = _INT_RANGE[zero.dtype]
    q = torch.round(x / _per_axis(scale, x, axis)) + _per_axis(zero, x, axis).to(torch.float32)
    return [q.clamp(low, high).to(zero.dtype)]


STRAIGHT_THROUGH = "QuantizeLinear:straight-through"


@op(STRAIGHT_THROUGH)
def _quantize_straight_through(vals, attrs):
    """QuantizeLinear for attack twins (rankfold.robustness): the same rounding and clipping
    forward, kept in float; the gradient passes straight through the rounding (and is zero where
    the value clips), so an attacker sees the quantized model's slopes instead of zeros."""
    x, scale = vals[0], vals[1]
    axis = attrs.get("axis", 1)
    zero = _zero_point(vals, 2, torch.zeros((), dtype=torch.uint8))
    low, high = _INT_RANGE[zero.dtype]
    scaled = x / _per_axis(scale, x, axis)
    q = scaled + (torch.round(scaled) - scaled).detach() + _per_axis(zero, x, axis).to(torch.float32)
    return [q.clamp(low, high)]


@op("DynamicQuantizeLinear")
def _dynamic_quantize(vals, attrs):
    """uint8 codes of x at a scale and zero point from its range. The codes are returned in float
    (the integers 0..255 a uint8 holds, the same values) and rounded straight-through, so that
    gradients flow back through an already-quantized graph's activations: as uint8 they cut the
    gradient, and the planner saw every layer before one as free (ddddocr's int8 recogniser at
    half its parameters read no line alike)."""
    x = vals[0]
    low, high = torch.clamp(x.min(), max=0.0), torch.clamp(x.max(), min=0.0)
    scale = (high - low) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.clamp(torch.round(-low / scale), 0, 255)
    scaled = x / scale
    q = torch.clamp(scaled + (torch.round(scaled) - scaled).detach() + zero, 0, 255)
    return [q.to(torch.float32), scale.to(torch.float32), zero.to(torch.uint8)]


def _wide() -> torch.dtype:
    """The float type of integer arithmetic: float32, exact for sums below 2^24 (8-bit products
    over a few hundred inputs), and what a written file computes (onnxruntime has no float64 Conv;
    float64 here made torch and the exported file round DynamicQuantizeLinear's codes apart,
    1 % of relative error on ddddocr's int8 recogniser)."""
    return torch.float32


def _centred(vals, index: int, zero_index: int, axis: int | None = None) -> Tensor:
    """An integer tensor minus its zero point, in float (see _wide)."""
    x = vals[index]
    zero = _zero_point(vals, zero_index, x).to(_wide())
    if axis is not None and zero.numel() > 1:
        zero = _per_axis(zero, x, axis)
    return x.to(_wide()) - zero


def _conv_geometry_call(x: Tensor, w: Tensor, attrs) -> Tensor:
    """A convolution with a node's geometry attributes (pads as _pool_geometry reads them)."""
    kernel, strides, dilations, begins, ends = _pool_geometry(x, {"kernel_shape": list(w.shape[2:]), **attrs})
    x = F.pad(x, torch_pad_order(begins, ends))
    fn = F.conv1d if len(kernel) == 1 else F.conv2d
    return fn(x, w, None, strides, 0, dilations, attrs.get("group", 1))


@op("ConvInteger")
def _conv_integer(vals, attrs):
    x, w = _centred(vals, 0, 2), _centred(vals, 1, 3, axis=0)
    return [torch.round(_conv_geometry_call(x, w, attrs)).to(torch.int32)]


@op("MatMulInteger")
def _matmul_integer(vals, attrs):
    a = _centred(vals, 0, 2)
    b = _centred(vals, 1, 3, axis=-1)
    return [torch.round(a @ b).to(torch.int32)]


@op("QLinearConv")
def _qlinear_conv(vals, attrs):
    x_scale, w_scale, y_scale = vals[1], vals[4], vals[6]
    x = (vals[0].to(_wide()) - vals[2].to(_wide())) * x_scale.to(_wide())
    w = (vals[3].to(_wide()) - _per_axis(vals[5].to(_wide()), vals[3], 0)) * \
        _per_axis(w_scale.to(_wide()), vals[3], 0)
    y = _conv_geometry_call(x, w, attrs)
    if len(vals) > 8 and vals[8] is not None:  # int32 bias at x_scale * w_scale
        bias = vals[8].to(_wide()) * (x_scale.to(_wide()) * w_scale.to(_wide())).reshape(-1)
        y = y + bias.reshape(1, -1, *[1] * (y.ndim - 2))
    return _quantize([y.to(torch.float32), y_scale, vals[7]], {"axis": 1})


@op("QLinearMatMul")
def _qlinear_matmul(vals, attrs):
    a = (vals[0].to(_wide()) - vals[2].to(_wide())) * vals[1].to(_wide())
    b = (vals[3].to(_wide()) - vals[5].to(_wide()).reshape(-1)) * vals[4].to(_wide()).reshape(-1)
    return _quantize([(a @ b).to(torch.float32), vals[6], vals[7]], {})
