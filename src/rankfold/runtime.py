"""onnxruntime as users run it, and what its int8 kernels do on the CPU at hand.

On x86 without VNNI (AVX2, and AVX-512 before VNNI), onnxruntime's u8 x s8 kernels multiply with
VPMADDUBSW, which adds each pair of neighbouring u8 x s8 products into a *saturating* int16: two
products of 255 x 127 overflow it. A QDQ model whose int8 weights use the full +-127 then computes
something else in the default (optimized) session than in the reference arithmetic. With weights
on 7 bits (+-63, onnxruntime's "reduce_range") a pair sums to at most 2 x 255 x 63 = 32,130 and
the kernels are exact. VNNI (AVX512_VNNI, AVX_VNNI) and ARM64 accumulate in int32.

Which kernel onnxruntime picks is decided by CPUID inside onnxruntime, so rankfold does not guess
from flags: it asks onnxruntime, with a one-node probe whose exact result is known.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from rankfold.errors import RankfoldError, first_line
from rankfold.quantize.core import REDUCED_INT8_QMAX

PROBE_CHANNELS = 64


def session(model, *, optimized: bool = True, threads: int = 0):
    """The one way rankfold opens an onnxruntime CPU session. `model`: a path, serialized bytes or
    an onnx.ModelProto. `optimized` is onnxruntime's default (every graph optimization, hence its
    fused integer kernels); False runs each node as written (reference arithmetic). `threads`: 0
    for onnxruntime's own choice, else that many (and one inter-op thread: timing runs use 1).
    A file onnxruntime cannot load is a RankfoldError naming it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: a failed run raises, and rankfold says it in its own words
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else model
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for a bad file
        where = model if isinstance(model, str) else "the model"
        raise RankfoldError(f"{where}: onnxruntime cannot load it: {first_line(exc)}") from None


def model_input(x: np.ndarray) -> np.ndarray:
    """`x` as a graph input takes it: integer arrays (token ids) as int64, the rest as float32."""
    return x.astype(np.int64) if np.issubdtype(x.dtype, np.integer) else x.astype(np.float32)


DECLARED_TYPES = {"tensor(float16)": np.float16, "tensor(int32)": np.int32, "tensor(int64)": np.int64}


def as_declared(declared, x: np.ndarray) -> np.ndarray:
    """`x` in the type an onnxruntime input (`session.get_inputs()[i]`) declares: float16 files
    take float16 (rankfold's data is float32), integer inputs (token ids, bytes) their width."""
    wanted = DECLARED_TYPES.get(declared.type)
    if wanted is not None and x.dtype != wanted:
        return x.astype(wanted)
    return x


def timing_sample(declared, shape: tuple[int, ...]) -> np.ndarray:
    """An input to time a graph on: Gaussian values, or zeros (a valid id) for an integer input."""
    if declared.type in ("tensor(int32)", "tensor(int64)"):
        return np.zeros(shape, DECLARED_TYPES[declared.type])
    return as_declared(declared, np.random.default_rng(1).standard_normal(shape, np.float32))


def fixed_batch_of(inputs) -> int | None:
    """The batch size every input declares as a number (an export at batch 1), else None."""
    sizes = set()
    for value in inputs:
        dims = value.type.tensor_type.shape.dim
        if not dims or not dims[0].HasField("dim_value") or dims[0].dim_value < 1:  # Paddle writes -1
            return None
        sizes.add(dims[0].dim_value)
    return sizes.pop() if len(sizes) == 1 else None


def run_batched(sess, outputs: list[str] | None, feed_name: str, x: np.ndarray) -> list[np.ndarray]:
    """`sess.run` on all of `x`, in pieces of the batch the graph declares when it fixes one (an
    export at batch 1), else at once."""
    declared = next(i for i in sess.get_inputs() if i.name == feed_name)
    dims = declared.shape
    x = as_declared(declared, x)
    batch = dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else len(x)
    parts = [sess.run(outputs, {feed_name: x[i : i + batch]}) for i in range(0, len(x), batch)]
    counts = [len(x[i : i + batch]) for i in range(0, len(x), batch)]
    return [join_samples([p[k] for p in parts], counts) for k in range(len(parts[0]))]


def join_samples(pieces: list[np.ndarray], counts: list[int]) -> np.ndarray:
    """One output of runs on successive pieces of the samples (`counts` in each), joined on its
    sample axis: the first axis whose size is each piece's count, every other axis alike (axis 1 of
    a sequence-first (T, N, classes) output), else axis 0 (rows a piece selects, as many as the
    data decides). A 0-d value (a dynamic quantization's scale) is one per piece: stacked."""
    if pieces[0].ndim == 0:
        return np.stack(pieces)
    if len(pieces) == 1:  # one run: nothing to join (a copy of every observed tensor cost 6 % of a plan)
        return pieces[0]
    shape = pieces[0].shape

    def joins_on(axis: int) -> bool:
        return all(p.ndim == len(shape) and p.shape[axis] == c and p.shape[:axis] + p.shape[axis + 1 :]
                   == shape[:axis] + shape[axis + 1 :] for p, c in zip(pieces, counts))

    return np.concatenate(pieces, axis=next((a for a in range(len(shape)) if joins_on(a)), 0))


def _probe_model(op: str, weight_code: int) -> tuple[bytes, list[int]]:
    """x quantized to 127 with zero point -128 (u8 255 inside onnxruntime) times weights all equal
    to `weight_code`, scaled so that the exact output is PROBE_CHANNELS (in units of 1.0)."""
    from onnx import TensorProto, helper, numpy_helper

    k, o = PROBE_CHANNELS, 8
    if op == "Conv":
        weight, axis, shape = np.full((o, k, 1, 1), weight_code, np.int8), 0, [1, k, 4, 4]
    else:
        weight, axis, shape = np.full((k, o), weight_code, np.int8), 1, [4, k]
    inits = [numpy_helper.from_array(np.array(1 / 255, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(-128, np.int8), "x_zero"),
             numpy_helper.from_array(np.array(1.0, np.float32), "y_scale"),
             numpy_helper.from_array(np.array(0, np.int8), "y_zero"),
             numpy_helper.from_array(weight, "w_q"),
             numpy_helper.from_array(np.full(o, 1 / weight_code, np.float32), "w_scale")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w_dq"], axis=axis),
             helper.make_node(op, ["x_dq", "w_dq"], ["y"]),
             helper.make_node("QuantizeLinear", ["y", "y_scale", "y_zero"], ["y_q"]),
             helper.make_node("DequantizeLinear", ["y_q", "y_scale", "y_zero"], ["out"])]
    graph = helper.make_graph(nodes, "int8_probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString(), shape


def _probe_exact(weight_code: int) -> bool:
    """Whether onnxruntime's optimized session computes the probe exactly, for Conv and MatMul."""
    for op in ("Conv", "MatMul"):
        model, shape = _probe_model(op, weight_code)
        out = session(model).run(None, {"x": np.ones(shape, np.float32)})[0]
        if not np.all(out == PROBE_CHANNELS):
            return False
    return True


@dataclass(frozen=True)
class Int8Kernels:
    """What onnxruntime's int8 kernels do here."""

    full_range_exact: bool  # int8 weights on +-127 computed exactly
    reduced_range_exact: bool  # int8 weights on +-63 computed exactly
    cpu: str  # a few words on the CPU

    @property
    def reduce_range(self) -> bool:
        return not self.full_range_exact

    def describe(self) -> str:
        if self.full_range_exact:
            return f"{self.cpu}: onnxruntime's int8 kernels accumulate exactly; int8 weights use the full 8 bits"
        return (f"{self.cpu}: onnxruntime's int8 kernels saturate 16-bit pair sums here (no VNNI); int8 weights "
                f"use 7 bits (+-{REDUCED_INT8_QMAX})"
                + ("" if self.reduced_range_exact else ", though even those are not computed exactly"))


def cpu_summary() -> str:
    """Architecture and the int8-relevant flags the OS reports (for messages; decisions use the probe)."""
    machine = platform.machine() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return machine
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith(("flags", "Features"))), [])
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    machine = f"{model}, {machine}" if model else machine
    shown = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "asimddp", "i8mm") if f in flags]
    return f"{machine} ({', '.join(shown) if shown else 'no int8 dot-product flags'})"


@functools.lru_cache(maxsize=1)
def int8_kernels() -> Int8Kernels:
    """Probe onnxruntime once per process."""
    return Int8Kernels(_probe_exact(127), _probe_exact(REDUCED_INT8_QMAX), cpu_summary())


# ops whose onnxruntime kernels multiply u8 x s8 (after graph optimization, QDQ pairs become them)
INTEGER_KERNEL_OPS = frozenset({
    "QuantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger",
    "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "QAttention", "QGemm"})


def computes_in_int8(model) -> bool:
    """Whether onnxruntime runs some of the graph (a ModelProto) in its integer kernels."""
    return any(node.op_type in INTEGER_KERNEL_OPS for node in model.graph.node)


def optimized_is_faithful(model) -> bool:
    """Whether onnxruntime's default (optimized) session computes what the file means on this CPU:
    always, unless the graph runs in int8 and this CPU's fused kernels saturate its weights (8-bit
    ones; a file made for such CPUs keeps its int8 weights within +-REDUCED_INT8_QMAX, which they
    compute exactly). Where it is False, rankfold measures a file in onnxruntime's reference
    arithmetic (each node as written), which is what VNNI and ARM CPUs and rankfold's C compute,
    and says so."""
    kernels = int8_kernels()
    if kernels.full_range_exact or not computes_in_int8(model):
        return True
    return kernels.reduced_range_exact and qdq_weights_within(model, REDUCED_INT8_QMAX)


def qdq_weights_within(model, qmax: int) -> bool:
    """Whether every weight the integer kernels would multiply is an int8 initializer behind a
    DequantizeLinear with codes within +-qmax. A graph with integer ops of its own (QLinearConv,
    ConvInteger, ...), uint8 weights, or weights stored outside the file is not read: False."""
    from onnx import TensorProto, numpy_helper

    if any(node.op_type in INTEGER_KERNEL_OPS - {"QuantizeLinear"} for node in model.graph.node):
        return False
    inits = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        weight = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if weight is None or weight.data_type in (TensorProto.INT32, TensorProto.INT4, TensorProto.UINT4):
            continue  # an activation's, a bias's (int32) or an int4 weight's (dequantized to float)
        if weight.data_type != TensorProto.INT8 or weight.data_location == TensorProto.EXTERNAL:
            return False
        if np.abs(numpy_helper.to_array(weight).astype(np.int16)).max(initial=0) > qmax:
            return False
    return True


REFERENCE_ARITHMETIC_NOTE = ("onnxruntime's reference arithmetic (its fused int8 kernels saturate 16-bit pair sums "
                             "on this CPU: no VNNI)")


# -- the optimized session against the reference arithmetic, layer by layer ------------------
@dataclass(frozen=True)
class KernelCheck:
    """Each quantized layer of a QDQ model run alone from the same int8 input: onnxruntime's
    optimized session (its fused integer kernels) against its reference arithmetic (no graph
    optimizations: DequantizeLinear, the float op, QuantizeLinear). Both round once, so a correct
    kernel is within one unit; a saturating one is tens of units away."""

    layers: int  # quantized layers compared
    worst_units: int  # largest difference, in units of the layer's int8 output
    worst_layer: str | None
    cpu: str

    TOLERANCE_UNITS = 1

    @property
    def ok(self) -> bool:
        return self.worst_units <= self.TOLERANCE_UNITS

    def describe(self) -> str:
        where = f" ({self.worst_layer})" if self.worst_layer else ""
        return (f"onnxruntime's optimized int8 kernels vs its reference arithmetic, {self.layers} quantized "
                f"layer(s) alone: at most {self.worst_units} unit(s) apart{where}, on {self.cpu}")


def _producers(model) -> dict[str, object]:
    return {out: node for node in model.graph.node for out in node.output}


def _readers(model) -> dict[str, list]:
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


class LayerSpan(NamedTuple):
    layer: str
    source: str  # the float tensor before the input's QuantizeLinear
    output: str  # the DequantizeLinear after the output's QuantizeLinear
    scale: str  # the output's scale initializer


def quantized_layer_spans(model) -> list[LayerSpan]:
    """Every Conv/Gemm/MatMul whose input and weights are dequantized int8 and whose output (after
    at most one Relu/Clip) is quantized: what onnxruntime fuses into one integer kernel. The span
    runs from before the input's QuantizeLinear to after the output's DequantizeLinear, because
    onnxruntime picks its kernel (u8 or s8 activations) from those Q/DQ pairs."""
    producers, readers = _producers(model), _readers(model)

    def dequantized(name: str) -> str | None:
        node = producers.get(name)
        return node.input[0] if node is not None and node.op_type == "DequantizeLinear" else None

    spans = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        source, weight = dequantized(node.input[0]), dequantized(node.input[1])
        if source is None or weight is None or weight in producers:  # weights must be constant int8
            continue
        out = node.output[0]
        after = readers.get(out, [])
        if len(after) == 1 and after[0].op_type in ("Relu", "Clip"):
            out = after[0].output[0]
            after = readers.get(out, [])
        quantize = producers.get(source)
        if quantize is None or quantize.op_type != "QuantizeLinear" or len(after) != 1 \
                or after[0].op_type != "QuantizeLinear":
            continue
        dequantize = next((r for r in readers.get(after[0].output[0], []) if r.op_type == "DequantizeLinear"), None)
        if dequantize is not None:
            spans.append(LayerSpan(node.name or out, quantize.input[0], dequantize.output[0], after[0].input[1]))
    return spans


def _single_layer(model, source: str, target: str) -> bytes:
    """The nodes computing `target` from `source` (and constants), as a model."""
    import onnx

    producers = _producers(model)
    inits = {i.name: i for i in model.graph.initializer}
    nodes, used, todo = [], set(), [target]
    while todo:
        name = todo.pop()
        if name == source or name in inits or name in used or name not in producers:
            continue
        used.add(name)
        node = producers[name]
        if node not in nodes:
            nodes.append(node)
            todo.extend(n for n in node.input if n)
    order = {id(n): i for i, n in enumerate(model.graph.node)}
    nodes.sort(key=lambda n: order[id(n)])
    needed = {n for node in nodes for n in node.input}
    graph = onnx.helper.make_graph(
        nodes, "layer", [onnx.helper.make_tensor_value_info(source, onnx.TensorProto.FLOAT, None)],
        [onnx.helper.make_tensor_value_info(target, onnx.TensorProto.FLOAT, None)],
        [inits[n] for n in sorted(needed) if n in inits])
    single = onnx.helper.make_model(graph, opset_imports=list(model.opset_import))
    single.ir_version = model.ir_version
    return single.SerializeToString()


def int8_kernel_check(model, x: np.ndarray) -> KernelCheck:
    """Run the check on `x` (a few samples: the model's input). `model`: a path or ModelProto."""
    import onnx

    proto = onnx.load(model) if isinstance(model, str) else model
    spans = quantized_layer_spans(proto)
    cpu = cpu_summary()
    if not spans:
        return KernelCheck(0, 0, None, cpu)
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    existing = {o.name for o in probe.graph.output}
    wanted = list(dict.fromkeys(span.source for span in spans))
    for name in wanted:
        if name not in existing:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    reference = session(probe.SerializeToString(), optimized=False)
    values = dict(zip(wanted, run_batched(reference, wanted, reference.get_inputs()[0].name, model_input(x))))
    scales = {i.name: i for i in proto.graph.initializer}
    worst, worst_layer = 0, None
    for span in spans:
        single = _single_layer(proto, span.source, span.output)
        outs = [run_batched(session(single, optimized=opt), None, span.source, values[span.source])[0]
                for opt in (True, False)]
        scale = float(onnx.numpy_helper.to_array(scales[span.scale]).reshape(-1)[0])
        diff = int(np.round(np.abs(outs[0] - outs[1]).max(initial=0) / scale))
        if diff > worst:
            worst, worst_layer = diff, span.layer
    return KernelCheck(len(spans), worst, worst_layer, cpu)
