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
SUPPORTED = ("Conv", "Gemm", "Relu", "Clip", "Add", "GlobalAveragePool", "ReduceMean", *PASS_THROUGH)


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


@dataclass
class AvgPool:
    inp: str
    out: str
    mult: tuple[int, int]
    name: str = ""


@dataclass
class Requant:
    """Copy with new (scale, zero point); a ReLU raises act_min to the output zero point."""

    inp: str
    out: str
    mult: tuple[int, int]
    act_min: int = ACT_QMIN
    name: str = ""


ADD_LEFT_SHIFT = 20  # inputs are scaled up before their multipliers so the sum keeps precision


@dataclass
class Program:
    tensors: dict[str, QTensor] = field(default_factory=dict)
    ops: list = field(default_factory=list)
    input: str = ""
    output: str = ""

    @property
    def macs(self) -> int:
        total = 0
        for op in self.ops:
            if isinstance(op, Conv):
                total += self.tensors[op.out].size * op.macs_per_output
        return total

    @property
    def weight_bytes(self) -> int:
        return sum(op.weight_bytes + 4 * op.bias.size + 8 * op.multiplier.size for op in self.ops
                   if isinstance(op, Conv))


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
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
    if len(model.graph.output) != 1:
        names = ", ".join(o.name for o in model.graph.output)
        raise RankfoldError(f"the C back-end runs models with one output; this one has {len(model.graph.output)} "
                            f"({names})")
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:  # Constant nodes (e.g. ReduceMean axes at opset 18+) are initializers too
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            inits[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    shapes = _shapes(model)
    qparams: dict[str, tuple[float, int]] = {}  # float tensor -> (scale, zero point)
    quantized_of: dict[str, str] = {}  # Q output -> float tensor
    canonical: dict[str, str] = {}  # DQ output (activation) -> float tensor
    weights: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # DQ output (weight/bias) -> (ints, scales)
    int4 = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT4}
    bits_of: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            scale = float(inits[node.input[1]])
            zero = int(inits[node.input[2]]) if len(node.input) > 2 else 0
            qparams[node.input[0]] = (scale, zero)
            quantized_of[node.output[0]] = node.input[0]
        elif node.op_type == "DequantizeLinear":
            if node.input[0] in inits:
                weights[node.output[0]] = (inits[node.input[0]], np.atleast_1d(inits[node.input[1]]))
                bits_of[node.output[0]] = 4 if node.input[0] in int4 else 8
            elif node.input[0] in quantized_of:
                canonical[node.output[0]] = quantized_of[node.input[0]]
    program = Program()
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    for name in [o.name for o in model.graph.output]:
        consumers[name] = consumers.get(name, 0) + 1

    def tensor(float_name: str) -> str:
        if float_name not in qparams:
            raise RankfoldError(f"tensor {float_name!r} is not quantized: the C back-end needs a QDQ model "
                                "with every activation quantized (rankfold compress with a quantized plan)")
        if float_name not in program.tensors:
            if float_name not in shapes:
                raise RankfoldError(f"tensor {float_name!r} has no static shape")
            scale, zero = qparams[float_name]
            program.tensors[float_name] = QTensor(float_name, shapes[float_name], scale, zero)
        return float_name

    def source(name: str) -> str:
        if name in canonical:
            return tensor(canonical[name])
        if name in qparams:  # read unquantized by a layer kept float: here it runs in int8 like the rest
            return tensor(name)
        raise RankfoldError(f"input {name!r} of the graph is used without DequantizeLinear: not a QDQ model")

    # Conv/Gemm -> Relu or Clip (ReLU6) with no quantization between them: one kernel, its output
    # clamped to the activation's range on the output's integer grid
    relu_of = {node.input[0]: node for node in model.graph.node if node.op_type in ("Relu", "Clip")
               and node.input[0] not in qparams and node.input[0] not in canonical}
    graph_input = next(i.name for i in model.graph.input if i.name not in inits)
    program.input = tensor(graph_input)
    producer: dict[str, object] = {}
    for node in model.graph.node:
        op = node.op_type
        if op in ("QuantizeLinear", "DequantizeLinear", "Constant"):
            continue
        if op not in SUPPORTED:
            raise RankfoldError(f"op {op} (node {node.name!r}) is not supported by the C back-end; supported: "
                                f"{', '.join(SUPPORTED)}")
        if op in ("Conv", "Gemm"):
            relu = relu_of.get(node.output[0])
            out = tensor(relu.output[0] if relu is not None else node.output[0])
            item = _conv(node, source(node.input[0]), out, program, weights, inits)
            item.bits = bits_of.get(node.input[1], 8)
            if relu is not None:
                item.act_min, item.act_max = _activation_clamp(relu, program.tensors[out], inits)
        elif op in ("Relu", "Clip") and node.input[0] in relu_of:
            continue  # fused into the Conv above
        elif op == "Clip":
            raise RankfoldError(f"Clip {node.name!r} does not directly follow a Conv or Gemm: the C back-end "
                                "fuses Clip into the layer before it only")
        elif op == "Relu":
            inp, out = source(node.input[0]), tensor(node.output[0])
            prev = producer.get(inp)
            dq_name = next(n for n, f in canonical.items() if f == inp)
            if isinstance(prev, Conv) and consumers.get(dq_name, 0) == 1 and consumers.get(inp, 0) == 1:
                _refit_output(prev, program.tensors[prev.inp], program.tensors[out])  # fuse: one rounding
                prev.out, prev.act_min = out, program.tensors[out].zero_point
                producer[out] = prev
                continue
            item = Requant(inp, out, _mult(program.tensors[inp].scale / program.tensors[out].scale),
                           program.tensors[out].zero_point, node.name)
        elif op == "Add":
            a, b, out = source(node.input[0]), source(node.input[1]), tensor(node.output[0])
            item = _add(a, b, out, program, node.name)
        elif op in ("GlobalAveragePool", "ReduceMean"):
            inp, out = source(node.input[0]), tensor(node.output[0])
            count = int(np.prod(program.tensors[inp].shape[1:]))
            item = AvgPool(inp, out, _mult(program.tensors[inp].scale / (program.tensors[out].scale * count)),
                           node.name)
        else:  # layout-only ops: NCHW is contiguous, so a requantizing copy
            inp, out = source(node.input[0]), tensor(node.output[0])
            item = Requant(inp, out, _mult(program.tensors[inp].scale / program.tensors[out].scale), ACT_QMIN,
                           node.name)
        program.ops.append(item)
        producer[item.out] = item
    output = model.graph.output[0].name
    program.output = source(output) if output in canonical else tensor(output)
    return program


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
        bias = np.round(np.asarray(real, np.float64) / (x.scale * w_scale)).astype(np.int32)
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
