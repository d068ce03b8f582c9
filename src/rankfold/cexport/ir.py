"""A QDQ ONNX graph read as an integer program: int8 tensors with (scale, zero point), and the ops
the C back-end implements, with every multiplier and shift precomputed (nothing float at run time)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from rankfold.cexport.arith import quantize_multiplier
from rankfold.errors import RankfoldError
from rankfold.quantize.core import ACT_QMAX, ACT_QMIN, quantize_weight

PASS_THROUGH = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity")


@dataclass
class QTensor:
    name: str
    shape: tuple[int, ...]  # one sample, channels first
    scale: float
    zero_point: int

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


@dataclass
class Conv:
    inp: str
    out: str
    weight: np.ndarray  # int8 (O, I/groups, kh, kw)
    bias: np.ndarray  # int32 (O,)
    multiplier: np.ndarray  # int32 (O,)
    shift: np.ndarray  # int32 (O,)
    stride: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    dilation: tuple[int, int]
    groups: int
    act_min: int = ACT_QMIN
    act_max: int = ACT_QMAX
    name: str = ""
    bits: int = 8  # 4: stored two weights per byte

    @property
    def inputs(self) -> list[str]:
        return [self.inp]

    @property
    def weight_bytes(self) -> int:
        return -(-self.weight.size * self.bits // 8)

    @property
    def macs_per_output(self) -> int:
        return int(np.prod(self.weight.shape[1:]))


@dataclass
class Add:
    a: str
    b: str
    out: str
    a_mult: tuple[int, int]  # (multiplier, shift) of each input, after a left shift of ADD_LEFT_SHIFT
    b_mult: tuple[int, int]
    out_mult: tuple[int, int]
    act_min: int = ACT_QMIN
    name: str = ""

    @property
    def inputs(self) -> list[str]:
        return [self.a, self.b]


class OneInput:
    """An op that reads one tensor, `inp`."""

    @property
    def inputs(self) -> list[str]:
        return [self.inp]


@dataclass
class AvgPool(OneInput):
    """The mean over each channel's whole plane (GlobalAveragePool, ReduceMean)."""

    inp: str
    out: str
    mult: tuple[int, int]
    name: str = ""


@dataclass
class Requant(OneInput):
    """Copy with new (scale, zero point); a ReLU raises act_min to the output zero point."""

    inp: str
    out: str
    mult: tuple[int, int]
    act_min: int = ACT_QMIN
    name: str = ""


@dataclass
class Pool(OneInput):
    """MaxPool or AveragePool over windows. Max: the largest value of the window's taps inside the
    input, then requantized (`mults[0]`). Average: the sum of x - zero point over the taps that
    count, requantized by `mults[count]` = s_in / (s_out * count) (count_include_pad: every tap
    inside the padded input counts, padding as the real value 0)."""

    inp: str
    out: str
    kind: str  # "max" | "avg"
    kernel: tuple[int, int]
    stride: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    dilation: tuple[int, int]
    count_include_pad: bool
    mults: list[tuple[int, int]]
    name: str = ""


@dataclass
class Concat:
    """Inputs joined along a per-sample axis, each requantized to the output's parameters."""

    parts: list[str]
    out: str
    axis: int  # per-sample axis (0: channels)
    mults: list[tuple[int, int]]
    name: str = ""

    @property
    def inputs(self) -> list[str]:
        return list(self.parts)


@dataclass
class Mul:
    """a * b (b broadcast over a: same shape, one value per channel, or one value):
    (a - za) * (b - zb) requantized by s_a * s_b / s_out."""

    a: str
    b: str
    out: str
    mult: tuple[int, int]
    act_min: int = ACT_QMIN
    name: str = ""

    @property
    def inputs(self) -> list[str]:
        return [self.a, self.b]


@dataclass
class Lookup(OneInput):
    """An element-wise function as a table of the 256 int8 inputs: (channels, 256), one row for all
    values or one per channel (PRelu). Built from the function in float32, quantized as
    QuantizeLinear does (round half to even): what onnxruntime's DQ -> op -> Q computes."""

    inp: str
    out: str
    table: np.ndarray
    function: str = ""
    name: str = ""


@dataclass
class Pad(OneInput):
    """Constant padding of the per-sample dimensions with `value` (already quantized)."""

    inp: str
    out: str
    pads: tuple[tuple[int, int], ...]  # per per-sample dimension: (before, after)
    value: int
    mult: tuple[int, int]
    name: str = ""


@dataclass
class Transpose(OneInput):
    """A permutation of the per-sample dimensions (the batch stays first)."""

    inp: str
    out: str
    perm: tuple[int, ...]  # per-sample
    mult: tuple[int, int]
    name: str = ""


@dataclass
class Softmax(OneInput):
    """Softmax along the last axis in integers: e = EXP[max - x] (exp(-d * s_in) * 2^16, rounded),
    then out = (e * K + S / 2) // S + zp_out with S = sum(e) * 2^8 and K = round(2^8 / s_out)."""

    inp: str
    out: str
    exp_table: np.ndarray  # int32 (256,)
    inv_out_scale: int  # K
    name: str = ""


SOFTMAX_EXP_BITS = 16
SOFTMAX_SCALE_BITS = 8
ADD_LEFT_SHIFT = 20  # inputs are scaled up before their multipliers so the sum keeps precision


@dataclass
class Program:
    tensors: dict[str, QTensor] = field(default_factory=dict)
    ops: list = field(default_factory=list)
    input: str = ""
    outputs: list[str] = field(default_factory=list)  # the graph's outputs, in its order

    @property
    def output(self) -> str:
        """The first output (the only one of most models)."""
        return self.outputs[0]

    @property
    def output_offsets(self) -> list[int]:
        """Where each output starts in model_run's `out` buffer: the outputs one after another."""
        return [int(v) for v in np.cumsum([0] + [self.tensors[o].size for o in self.outputs])[:-1]]

    @property
    def output_size(self) -> int:
        return sum(self.tensors[o].size for o in self.outputs)

    @property
    def macs(self) -> int:
        total = 0
        for op in self.ops:
            if isinstance(op, Conv):
                total += self.tensors[op.out].size * op.macs_per_output
        return total

    @property
    def weight_bytes(self) -> int:
        # per output channel: an int32 bias, an int32 multiplier and an int8 shift
        return sum(op.weight_bytes + 4 * op.bias.size + (4 + 1) * op.multiplier.size for op in self.ops
                   if isinstance(op, Conv))


def _shapes(model: onnx.ModelProto, inits: dict[str, np.ndarray] | None = None,
            folded: set[int] = frozenset()) -> dict[str, tuple[int, ...]]:
    """Each tensor's per-sample shape at batch 1; folded nodes' outputs given as constants, so that
    shapes computed from them (a Pad's pads) are known."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    if folded:
        known = {i.name for i in fixed.graph.initializer}
        produced = [o for i in sorted(folded) for o in model.graph.node[i].output if o and o not in known]
        kept = [n for i, n in enumerate(model.graph.node) if i not in folded]
        del fixed.graph.node[:]
        fixed.graph.node.extend(kept)
        fixed.graph.initializer.extend(numpy_helper.from_array(np.asarray(inits[o]), o) for o in produced)
    del fixed.graph.value_info[:]  # inferred afresh: an exporter's symbolic dims would stay symbolic
    for value in list(fixed.graph.input) + list(fixed.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_param")
            dims[0].dim_value = 1
    inferred = onnx.shape_inference.infer_shapes(fixed)
    shapes = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = [d.dim_value for d in v.type.tensor_type.shape.dim]
        if dims and all(d > 0 for d in dims):
            shapes[v.name] = tuple(dims[1:])
    return shapes


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def read_program(model: onnx.ModelProto) -> Program:
    """The integer program of a QDQ model as rankfold writes it (every activation quantized)."""
    inits = _constants(model)
    graph_input = next(i for i in model.graph.input if i.name not in inits)
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in graph_input.type.tensor_type.shape.dim]
    if any(not isinstance(d, int) or d <= 0 for d in dims[1:]):
        raise RankfoldError(f"the input {graph_input.name!r} leaves its size open ({dims[1:]}): it has no static "
                            "shape, and the C back-end runs one input size; give --calib data of that size")
    folded: set[int] = set()
    for _round in range(8):  # a known shape lets a Shape node fold; a folded Reshape target lets shapes follow
        if not _fold_constants(model, inits, _shapes(model, inits, folded), folded):
            break
    unsupported: dict[str, int] = {}
    for index, node in enumerate(model.graph.node):
        if node.op_type not in READERS and node.op_type not in QDQ_OPS and index not in folded:
            unsupported[node.op_type] = unsupported.get(node.op_type, 0) + 1
    if unsupported:
        first = next(n for n in model.graph.node if n.op_type in unsupported)
        listed = ", ".join(f"{op} x{count}" for op, count in unsupported.items())
        raise RankfoldError(f"ops not supported by the C back-end: {listed} (first: op {first.op_type}, node "
                            f"{first.name!r}); supported: {', '.join(SUPPORTED)}")
    reader = _Reader(model, inits, folded)
    for index, node in enumerate(model.graph.node):
        if node.op_type in QDQ_OPS or index in folded:
            continue
        item = READERS[node.op_type](reader, node)
        if item is None:  # fused into the op before it
            continue
        reader.program.ops.append(item)
        reader.producer[item.out] = item
    reader.program.outputs = [reader.source(o.name) if o.name in reader.canonical else reader.tensor(o.name)
                              for o in model.graph.output]
    return reader.program


QDQ_OPS = ("QuantizeLinear", "DequantizeLinear", "Constant")


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant nodes' values (e.g. ReduceMean axes at opset 18+)."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            inits[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return inits


def _fold_constants(model: onnx.ModelProto, inits: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]],
                    folded: set[int]) -> bool:
    """Nodes that compute from constants only (an exporter's shape arithmetic: the pads of F.pad
    come out as ConstantOfShape, Slice, Cast, ...), and Shape nodes of tensors whose shape is known
    (the C program runs one sample of one size), evaluated here with ONNX's reference
    implementation; their outputs join `inits`, their indices `folded`. Returns whether any did."""
    from onnx.reference import ReferenceEvaluator

    grown = False
    for index, node in enumerate(model.graph.node):
        if index in folded or node.op_type in QDQ_OPS or node.op_type in ("Conv", "Gemm"):
            continue
        if node.op_type == "Shape" and node.input[0] in shapes:
            full = np.array([1, *shapes[node.input[0]]], np.int64)
            start, end = int(_attr(node, "start", 0)), _attr(node, "end", None)
            inits[node.output[0]] = full[start : None if end is None else int(end)]
            folded.add(index)
            grown = True
            continue
        names = [name for name in node.input if name]
        if not all(name in inits for name in names):
            continue
        try:
            values = ReferenceEvaluator(node).run(None, {name: inits[name] for name in names})
        except Exception as exc:  # noqa: BLE001 - any failure of the reference op is reported as such
            raise RankfoldError(f"{node.op_type} {node.name!r} computes from constants only, but evaluating it "
                                f"failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        inits.update((name, np.asarray(value)) for name, value in zip(node.output, values) if name)
        folded.add(index)
        grown = True
    return grown


def _require_symmetric_weights(node: onnx.NodeProto, inits: dict[str, np.ndarray]) -> None:
    """The kernels keep one scale per output channel (or tensor) and no weight zero point: refuse
    int4 groups (blocked DequantizeLinear, with their zero points) rather than misread them."""
    block = next((a.i for a in node.attribute if a.name == "block_size"), 0)
    zero = inits.get(node.input[2]) if len(node.input) > 2 else None
    if block or (zero is not None and np.any(zero != 0)):
        what = f"int4 groups of {block} (a scale per block of inputs)" if block else "a weight zero point"
        raise RankfoldError(f"DequantizeLinear {node.name!r}: {what}; the C back-end takes symmetric weights with "
                            "one scale per output channel or tensor: plan for a C target, which offers no groups "
                            "(no --group-size)")


class _Reader:
    """The QDQ graph's quantization parameters and weights, and the program being built."""

    def __init__(self, model: onnx.ModelProto, inits: dict[str, np.ndarray], folded: set[int]):
        self.inits = inits
        self.shapes = _shapes(model, inits, folded)
        self.qparams: dict[str, tuple[float, int]] = {}  # float tensor -> (scale, zero point)
        quantized_of: dict[str, str] = {}  # Q output -> float tensor
        self.canonical: dict[str, str] = {}  # DQ output (activation) -> float tensor
        self.weights: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # DQ output (weight/bias) -> (ints, scales)
        int4 = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT4}
        self.bits_of: dict[str, int] = {}
        for node in model.graph.node:
            if node.op_type == "QuantizeLinear":
                scale = float(inits[node.input[1]])
                zero = int(inits[node.input[2]]) if len(node.input) > 2 else 0
                self.qparams[node.input[0]] = (scale, zero)
                quantized_of[node.output[0]] = node.input[0]
            elif node.op_type == "DequantizeLinear":
                if node.input[0] in inits:
                    _require_symmetric_weights(node, inits)
                    self.weights[node.output[0]] = (inits[node.input[0]], np.atleast_1d(inits[node.input[1]]))
                    self.bits_of[node.output[0]] = 4 if node.input[0] in int4 else 8
                elif node.input[0] in quantized_of:
                    self.canonical[node.output[0]] = quantized_of[node.input[0]]
        self.program = Program()
        self.consumers: dict[str, int] = {}
        for node in model.graph.node:
            for name in node.input:
                self.consumers[name] = self.consumers.get(name, 0) + 1
        for name in [o.name for o in model.graph.output]:
            self.consumers[name] = self.consumers.get(name, 0) + 1
        # Conv/Gemm -> Relu or Clip (ReLU6) with no quantization between them: one kernel, its output
        # clamped to the activation's range on the output's integer grid
        self.relu_of = {node.input[0]: node for node in model.graph.node if node.op_type in ("Relu", "Clip")
                        and node.input[0] not in self.qparams and node.input[0] not in self.canonical}
        graph_input = next(i.name for i in model.graph.input if i.name not in inits)
        self.program.input = self.tensor(graph_input)
        self.producer: dict[str, object] = {}

    def tensor(self, float_name: str) -> str:
        if float_name not in self.qparams:
            raise RankfoldError(f"tensor {float_name!r} is not quantized: the C back-end needs a QDQ model "
                                "with every activation quantized (rankfold compress with a quantized plan for a C "
                                "target, --target cortex-m4 or another: files planned for onnxruntime keep the ops "
                                "after their last layer in float)")
        if float_name not in self.program.tensors:
            if float_name not in self.shapes:
                raise RankfoldError(f"tensor {float_name!r} has no static shape: the C back-end runs one input size; "
                                    "give --calib data of that size (or a model whose input size is fixed)")
            scale, zero = self.qparams[float_name]
            self.program.tensors[float_name] = QTensor(float_name, self.shapes[float_name], scale, zero)
        return float_name

    def source(self, name: str) -> str:
        if name in self.canonical:
            return self.tensor(self.canonical[name])
        if name in self.qparams:  # read unquantized by a layer kept float: here it runs in int8 like the rest
            return self.tensor(name)
        raise RankfoldError(f"input {name!r} of the graph is used without DequantizeLinear: not a QDQ model")

    def constant(self, node: onnx.NodeProto, index: int, what: str):
        name = node.input[index] if len(node.input) > index else ""
        if not name:
            return None
        if name in self.weights:
            ints, scales = self.weights[name]
            return ints.astype(np.float64) * scales.reshape(-1)[0] if scales.size == 1 else ints * scales
        if name not in self.inits:
            raise RankfoldError(f"{node.op_type} {node.name!r}: its {what} must be a constant")
        return self.inits[name]

    def constant_operand(self, node: onnx.NodeProto) -> int | None:
        """Which input of a two-input node is a constant (not an activation), if exactly one is."""
        if len(node.input) != 2:
            return None
        constant = [i for i, name in enumerate(node.input) if name not in self.canonical and name not in self.qparams
                    and (name in self.inits or name in self.weights)]
        return constant[0] if len(constant) == 1 else None

    def io(self, node: onnx.NodeProto) -> tuple[QTensor, QTensor]:
        inp, out = self.source(node.input[0]), self.tensor(node.output[0])
        return self.program.tensors[inp], self.program.tensors[out]

    def rescale(self, x: QTensor, y: QTensor) -> tuple[int, int]:
        return _mult(x.scale / y.scale)


def _read_conv(r: _Reader, node: onnx.NodeProto):
    relu = r.relu_of.get(node.output[0])
    out = r.tensor(relu.output[0] if relu is not None else node.output[0])
    item = _conv(node, r.source(node.input[0]), out, r.program, r.weights, r.inits)
    item.bits = r.bits_of.get(node.input[1], 8)
    if relu is not None:
        item.act_min, item.act_max = _activation_clamp(relu, r.program.tensors[out], r.inits)
    return item


def _read_relu(r: _Reader, node: onnx.NodeProto):
    if node.input[0] in r.relu_of:
        return None  # fused into the Conv before it
    inp, out = r.source(node.input[0]), r.tensor(node.output[0])
    prev = r.producer.get(inp)
    dq_name = next(n for n, f in r.canonical.items() if f == inp)
    if isinstance(prev, Conv) and r.consumers.get(dq_name, 0) == 1 and r.consumers.get(inp, 0) == 1:
        _refit_output(prev, r.program.tensors[prev.inp], r.program.tensors[out])  # fuse: one rounding
        prev.out, prev.act_min = out, r.program.tensors[out].zero_point
        r.producer[out] = prev
        return None
    return Requant(inp, out, _mult(r.program.tensors[inp].scale / r.program.tensors[out].scale),
                   r.program.tensors[out].zero_point, node.name)


def _read_clip(r: _Reader, node: onnx.NodeProto):
    if node.input[0] in r.relu_of:
        return None  # fused into the Conv before it
    return _read_lookup(r, node)


def _read_add(r: _Reader, node: onnx.NodeProto):
    if r.constant_operand(node) is not None:
        return _read_with_constant(r, node)
    a, b, out = r.source(node.input[0]), r.source(node.input[1]), r.tensor(node.output[0])
    if r.program.tensors[a].shape != r.program.tensors[b].shape:
        raise RankfoldError(f"Add {node.name!r}: the C back-end adds tensors of one shape; these are "
                            f"{r.program.tensors[a].shape} and {r.program.tensors[b].shape}")
    return _add(a, b, out, r.program, node.name)


def _read_global_average(r: _Reader, node: onnx.NodeProto):
    x, y = r.io(node)
    if node.op_type == "ReduceMean":
        axes = _attr(node, "axes", None)
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = [int(a) for a in r.inits[node.input[1]]]
        rank = len(x.shape) + 1
        if axes is None or sorted(a % rank for a in axes) != list(range(2, rank)):
            raise RankfoldError(f"ReduceMean {node.name!r}: the C back-end averages over the spatial axes only "
                                f"(axes {axes})")
    count = int(np.prod(x.shape[1:]))
    return AvgPool(x.name, y.name, _mult(x.scale / (y.scale * count)), node.name)


def _read_pass_through(r: _Reader, node: onnx.NodeProto):
    x, y = r.io(node)  # NCHW is contiguous: a requantizing copy
    return Requant(x.name, y.name, r.rescale(x, y), ACT_QMIN, node.name)


def _read_pool(r: _Reader, node: onnx.NodeProto):
    x, y = r.io(node)
    if len(x.shape) != 3:
        raise RankfoldError(f"{node.op_type} {node.name!r}: the C back-end pools 2-D inputs (N, C, H, W)")
    kernel = tuple(int(k) for k in _attr(node, "kernel_shape", [1, 1]))
    stride = tuple(int(v) for v in _attr(node, "strides", [1, 1]))
    dilation = tuple(int(v) for v in _attr(node, "dilations", [1, 1]))
    pads = _explicit_pads(node, x.shape[1:], y.shape[1:], kernel, stride, dilation)
    kind = "max" if node.op_type == "MaxPool" else "avg"
    if kind == "avg" and dilation != (1, 1):
        raise RankfoldError(f"AveragePool {node.name!r}: dilations are not supported by the C back-end")
    if len(node.output) > 1 and node.output[1]:
        raise RankfoldError(f"MaxPool {node.name!r}: its indices output is not supported by the C back-end")
    taps = kernel[0] * kernel[1]
    mults = ([r.rescale(x, y)] if kind == "max" else
             [(0, 0)] + [_mult(x.scale / (y.scale * count)) for count in range(1, taps + 1)])
    return Pool(x.name, y.name, kind, kernel, stride, pads, dilation, bool(_attr(node, "count_include_pad", 0)),
                mults, node.name)


def _read_global_max(r: _Reader, node: onnx.NodeProto):
    x, y = r.io(node)
    if len(x.shape) != 3:
        raise RankfoldError(f"GlobalMaxPool {node.name!r}: the C back-end pools 2-D inputs (N, C, H, W)")
    kernel = (x.shape[1], x.shape[2])
    return Pool(x.name, y.name, "max", kernel, (1, 1), (0, 0, 0, 0), (1, 1), False, [r.rescale(x, y)], node.name)


def _read_concat(r: _Reader, node: onnx.NodeProto):
    parts = [r.source(name) for name in node.input]
    out = r.program.tensors[r.tensor(node.output[0])]
    axis = int(_attr(node, "axis", 1))
    rank = len(out.shape) + 1
    axis = axis % rank
    if axis == 0:
        raise RankfoldError(f"Concat {node.name!r}: joining along the batch axis is not supported by the C back-end")
    return Concat(parts, out.name, axis - 1, [r.rescale(r.program.tensors[p], out) for p in parts], node.name)


def _read_mul(r: _Reader, node: onnx.NodeProto):
    if r.constant_operand(node) is not None:
        return _read_with_constant(r, node)
    a, b, out = r.source(node.input[0]), r.source(node.input[1]), r.tensor(node.output[0])
    ta, tb, to = r.program.tensors[a], r.program.tensors[b], r.program.tensors[out]
    if tb.size > ta.size:
        a, b, ta, tb = b, a, tb, ta
    if ta.shape != to.shape or mul_broadcast(ta.shape, tb.shape) is None:
        raise RankfoldError(f"Mul {node.name!r}: the C back-end multiplies by a tensor of the same shape, one value "
                            f"per channel or one value; these are {ta.shape} and {tb.shape}")
    return Mul(a, b, out, _mult(ta.scale * tb.scale / to.scale), ACT_QMIN, node.name)


def mul_broadcast(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> tuple[int, int] | None:
    """How b repeats over a, as (count, inner): b[(i // inner) % count] goes with a[i]; None when b
    is neither a's shape, one value per channel (dimension 0 of a sample), nor one value."""
    size = int(np.prod(a_shape))
    b_size = int(np.prod(b_shape)) if b_shape else 1
    if tuple(b_shape) == tuple(a_shape):
        return size, 1
    if b_size == 1:
        return 1, size
    squeezed = tuple(b_shape)[-len(a_shape):] if len(b_shape) >= len(a_shape) else \
        (1,) * (len(a_shape) - len(b_shape)) + tuple(b_shape)
    if int(np.prod(b_shape)) == int(np.prod(squeezed)) and squeezed[0] == a_shape[0] and \
            all(d == 1 for d in squeezed[1:]):
        return a_shape[0], size // a_shape[0]
    return None


# Element-wise functions as onnxruntime's DQ -> op -> Q computes them, in float32.
def _hard_sigmoid(node):
    alpha, beta = np.float32(_attr(node, "alpha", 0.2)), np.float32(_attr(node, "beta", 0.5))
    return lambda x: np.clip(alpha * x + beta, np.float32(0), np.float32(1))


def _leaky(node):
    alpha = np.float32(_attr(node, "alpha", 0.01))
    return lambda x: np.where(x >= 0, x, alpha * x)


def _elu(node):
    alpha = np.float32(_attr(node, "alpha", 1.0))
    return lambda x: np.where(x >= 0, x, alpha * (np.exp(x) - np.float32(1)))


FUNCTIONS = {
    "Sigmoid": lambda node: lambda x: np.float32(1) / (np.float32(1) + np.exp(-x)),
    "Tanh": lambda node: np.tanh,
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": lambda node: lambda x: x * np.clip(x / np.float32(6) + np.float32(0.5), np.float32(0), np.float32(1)),
    "LeakyRelu": _leaky,
    "Elu": _elu,
}


def lookup_table(x: QTensor, y: QTensor, function) -> np.ndarray:
    """int8 outputs for the 256 int8 inputs: QuantizeLinear(function(DequantizeLinear(q)))."""
    q = np.arange(-128, 128, dtype=np.int32)
    real = (q - np.int32(x.zero_point)).astype(np.float32) * np.float32(x.scale)
    with np.errstate(over="ignore"):
        value = np.asarray(function(real), np.float32)
    return np.clip(np.round(value / np.float32(y.scale)) + y.zero_point, ACT_QMIN, ACT_QMAX).astype(np.int8)


ARITHMETIC = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}


def _read_with_constant(r: _Reader, node: onnx.NodeProto):
    """Add, Sub, Mul or Div of an activation and a constant (one value or one per channel): an
    element-wise function of the activation, so a table (one per channel)."""
    index = r.constant_operand(node)
    if index is None:
        raise RankfoldError(f"{node.op_type} {node.name!r}: the C back-end computes {node.op_type} of an activation "
                            "and a constant only")
    value = np.asarray(r.constant(node, index, "operand"), np.float32)
    x, y = r.program.tensors[r.source(node.input[1 - index])], r.program.tensors[r.tensor(node.output[0])]
    repeat = mul_broadcast(x.shape, value.shape)
    if repeat is None or (value.size > 1 and repeat[0] != x.shape[0]):
        raise RankfoldError(f"{node.op_type} {node.name!r}: the C back-end takes a constant of one value or one per "
                            f"channel; this one has shape {value.shape}")
    function = ARITHMETIC[node.op_type]
    tables = [lookup_table(x, y, (lambda v, c=c: function(v, c)) if index == 1 else (lambda v, c=c: function(c, v)))
              for c in value.reshape(-1).astype(np.float32)]
    return Lookup(x.name, y.name, np.stack(tables), node.op_type, node.name)


def _read_lookup(r: _Reader, node: onnx.NodeProto):
    x, y = r.io(node)
    op = node.op_type
    if op == "Clip":
        low, high = r.constant(node, 1, "min"), r.constant(node, 2, "max")
        low = np.float32(_attr(node, "min", -np.inf) if low is None else low)
        high = np.float32(_attr(node, "max", np.inf) if high is None else high)
        tables = [lookup_table(x, y, lambda v: np.clip(v, low, high))]
    elif op == "PRelu":
        slope = np.asarray(r.constant(node, 1, "slope"), np.float32)
        count = mul_broadcast(x.shape, slope.shape)
        if count is None or count[1] == 1 and count[0] > 1 and len(x.shape) > 1:
            raise RankfoldError(f"PRelu {node.name!r}: the C back-end takes one slope or one per channel; this one "
                                f"has shape {slope.shape}")
        per_channel = slope.reshape(-1)
        tables = [lookup_table(x, y, lambda v, a=a: np.where(v >= 0, v, np.float32(a) * v)) for a in per_channel]
    else:
        tables = [lookup_table(x, y, FUNCTIONS[op](node))]
    return Lookup(x.name, y.name, np.stack(tables), op, node.name)


def _read_pad(r: _Reader, node: onnx.NodeProto):
    x, y = r.io(node)
    mode = _attr(node, "mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        raise RankfoldError(f"Pad {node.name!r}: mode {mode!r} is not supported by the C back-end (constant only)")
    pads = _attr(node, "pads", None)
    if pads is None:
        pads = [int(v) for v in r.constant(node, 1, "pads")]
    if len(node.input) > 3 and node.input[3]:
        raise RankfoldError(f"Pad {node.name!r}: padding only some axes is not supported by the C back-end")
    value = r.constant(node, 2, "value")
    value = 0.0 if value is None else float(np.asarray(value).reshape(-1)[0])
    rank = len(x.shape) + 1
    begins, ends = pads[:rank], pads[rank:]
    if begins[0] or ends[0] or min(pads) < 0:
        raise RankfoldError(f"Pad {node.name!r}: the C back-end pads the per-sample axes by >= 0 only; pads {pads}")
    value_q = int(np.clip(np.round(value / y.scale) + y.zero_point, ACT_QMIN, ACT_QMAX))
    return Pad(x.name, y.name, tuple(zip(begins[1:], ends[1:])), value_q, r.rescale(x, y), node.name)


def _read_transpose(r: _Reader, node: onnx.NodeProto):
    x, y = r.io(node)
    perm = [int(p) for p in _attr(node, "perm", list(range(len(x.shape), -1, -1)))]
    if perm[0] != 0:
        raise RankfoldError(f"Transpose {node.name!r}: the C back-end keeps the batch axis first; perm {perm}")
    if len(perm) - 1 > 4:
        raise RankfoldError(f"Transpose {node.name!r}: at most 4 per-sample axes in the C back-end")
    return Transpose(x.name, y.name, tuple(p - 1 for p in perm[1:]), r.rescale(x, y), node.name)


def _read_softmax(r: _Reader, node: onnx.NodeProto):
    x, y = r.io(node)
    axis = int(_attr(node, "axis", -1))
    if axis % (len(x.shape) + 1) != len(x.shape):
        raise RankfoldError(f"Softmax {node.name!r}: the C back-end takes the softmax along the last axis")
    d = np.arange(256, dtype=np.float64)
    table = np.round(np.exp(-d * x.scale) * 2**SOFTMAX_EXP_BITS).astype(np.int64)
    inv = int(round(2**SOFTMAX_SCALE_BITS / y.scale))
    if inv * 2**SOFTMAX_EXP_BITS >= 2**62 or x.shape[-1] * 2**(SOFTMAX_EXP_BITS + SOFTMAX_SCALE_BITS) >= 2**62:
        raise RankfoldError(f"Softmax {node.name!r}: its output scale {y.scale} is too small for the C back-end")
    return Softmax(x.name, y.name, table.astype(np.int32), inv, node.name)


def _explicit_pads(node, in_hw, out_hw, kernel, stride, dilation) -> tuple[int, int, int, int]:
    auto = _attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", "VALID"):
        p = list(_attr(node, "pads", [0, 0, 0, 0])) if auto == "NOTSET" else [0, 0, 0, 0]
        return (int(p[0]), int(p[1]), int(p[2]), int(p[3]))
    totals = [max((o - 1) * s + (k - 1) * d + 1 - i, 0)
              for i, o, k, s, d in zip(in_hw, out_hw, kernel, stride, dilation)]
    first = [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in totals]
    return (first[0], first[1], totals[0] - first[0], totals[1] - first[1])


READERS = {
    "Conv": _read_conv, "Gemm": _read_conv, "Relu": _read_relu, "Clip": _read_clip, "Add": _read_add,
    "GlobalAveragePool": _read_global_average, "ReduceMean": _read_global_average,
    **{op: _read_pass_through for op in PASS_THROUGH},
    "MaxPool": _read_pool, "AveragePool": _read_pool, "GlobalMaxPool": _read_global_max, "Concat": _read_concat,
    "Mul": _read_mul, "Sub": _read_with_constant, "Div": _read_with_constant, "PRelu": _read_lookup,
    **{op: _read_lookup for op in FUNCTIONS}, "Pad": _read_pad,
    "Transpose": _read_transpose, "Softmax": _read_softmax,
}
SUPPORTED = tuple(READERS)


def _activation_clamp(node: onnx.NodeProto, out: QTensor, inits) -> tuple[int, int]:
    """The integer range [act_min, act_max] a fused Relu or Clip leaves on the output's grid."""
    if node.op_type == "Relu":
        return out.zero_point, ACT_QMAX
    bounds = []
    for index, attr, default in ((1, "min", -np.inf), (2, "max", np.inf)):
        name = node.input[index] if len(node.input) > index else ""
        if name and name not in inits:
            raise RankfoldError(f"Clip {node.name!r}: its bounds must be constants")
        bounds.append(float(inits[name]) if name else float(_attr(node, attr, default)))
    low, high = (np.clip(np.round(b / out.scale) + out.zero_point, ACT_QMIN, ACT_QMAX) for b in bounds)
    return int(low), int(high)


def _mult(real: float) -> tuple[int, int]:
    return quantize_multiplier(real)


def _conv(node, inp: str, out: str, program: Program, weights, inits) -> Conv:
    x, y = program.tensors[inp], program.tensors[out]
    w_name = node.input[1]
    if w_name in weights:
        w_int, w_scale = weights[w_name]
        w_int = w_int.astype(np.int8)
    elif w_name in inits:  # a layer the plan kept float: quantized here, int8 per channel
        qw = quantize_weight(np.moveaxis(inits[w_name], 1, 0) if node.op_type == "Gemm" and
                             not _attr(node, "transB", 0) else inits[w_name], 8)
        w_int, w_scale = qw.q, qw.scale
    else:
        raise RankfoldError(f"node {node.name!r}: weights are not constant")
    if node.op_type == "Gemm":
        if not _attr(node, "transB", 0) and w_name in weights:
            w_int = w_int.T
        w_int = w_int.reshape(w_int.shape[0], -1, 1, 1)
        stride, pads, dilation, groups = (1, 1), (0, 0, 0, 0), (1, 1), 1
    else:
        if w_int.ndim != 4:
            raise RankfoldError(f"node {node.name!r}: only 2-D convolutions are supported")
        stride = tuple(_attr(node, "strides", [1, 1]))
        p = list(_attr(node, "pads", [0, 0, 0, 0]))
        pads = (p[0], p[1], p[2], p[3])
        dilation = tuple(_attr(node, "dilations", [1, 1]))
        groups = int(_attr(node, "group", 1))
        if _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise RankfoldError(f"node {node.name!r}: auto_pad is not supported by the C back-end")
    w_scale = np.broadcast_to(np.asarray(w_scale, np.float64).reshape(-1), (w_int.shape[0],))
    bias = np.zeros(w_int.shape[0], np.int32)
    if len(node.input) > 2 and node.input[2]:
        b_name = node.input[2]
        real = (weights[b_name][0] * weights[b_name][1]) if b_name in weights else inits[b_name]
        codes = np.round(np.asarray(real, np.float64) / (x.scale * w_scale))
        if not np.all(np.abs(codes) <= 2**31 - 1):  # astype would wrap them around
            raise RankfoldError(f"node {node.name!r}: its bias needs codes past int32 at the scales of its input "
                                f"and weights ({np.abs(codes).max():.3g}); the C back-end adds an int32 bias")
        bias = codes.astype(np.int32)
    conv = Conv(inp, out, w_int.astype(np.int8), bias, np.zeros(w_int.shape[0], np.int32),
                np.zeros(w_int.shape[0], np.int32), stride, pads, dilation, groups, name=node.name)
    conv.w_scale = w_scale
    _refit_output(conv, x, y)
    return conv


def _refit_output(conv: Conv, x: QTensor, y: QTensor) -> None:
    pairs = [quantize_multiplier(x.scale * s / y.scale) for s in conv.w_scale]
    conv.multiplier = np.array([m for m, _ in pairs], np.int32)
    conv.shift = np.array([s for _, s in pairs], np.int32)


def _add(a: str, b: str, out: str, program: Program, name: str) -> Add:
    sa, sb, so = program.tensors[a].scale, program.tensors[b].scale, program.tensors[out].scale
    twice_max = 2 * max(sa, sb)
    return Add(a, b, out, _mult(sa / twice_max), _mult(sb / twice_max),
               _mult(twice_max / ((1 << ADD_LEFT_SHIFT) * so)), ACT_QMIN, name)
