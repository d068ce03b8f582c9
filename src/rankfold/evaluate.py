"""Measure an ONNX model: accuracy, parameters, MACs, bytes and onnxruntime latency."""

from __future__ import annotations

import contextlib
import io
import os
import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from rankfold.data import check_input_shape
from rankfold.errors import RankfoldError
from rankfold.runtime import REFERENCE_ARITHMETIC_NOTE, as_declared, cpu_summary, fixed_batch_of, optimized_is_faithful

SHAPE_DTYPES = {onnx.TensorProto.INT64}  # initializers of these types are shape constants
# One sample's shape (every input of matching rank), or each input's by name (inputs packed flat)
SampleShape = tuple[int, ...] | Mapping[str, tuple[int, ...]] | None


@dataclass
class OnnxSize:
    params: int  # elements of the weight initializers
    weight_bytes: int  # bytes of the weight initializers as stored
    macs: int  # multiply-accumulates of Conv / Gemm / MatMul for one sample
    file_bytes: int


# Types stored packed, several values per byte.
PACKED_BITS = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}
# The integer types of weight codes (a weight-only table's rows are gathered as codes, then scaled)
CODE_DTYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}


# What a value is read through on its way from a weight's codes or scales to the Mul that joins them
PASS_THROUGH_OPS = ("Gather", "Reshape", "Unsqueeze", "Cast")


def _code_scales(nodes: list[onnx.NodeProto], graphs: list[onnx.GraphProto]) -> set[str]:
    """The float constants that multiply integer codes (a weight-only table's rows, gathered as
    codes and then scaled: quantize/onnx_qdq.py): scales, as a DequantizeLinear's are."""
    made = {out: node for node in nodes for out in node.output}
    types = {init.name: init.data_type for graph in graphs for init in graph.initializer}

    def source(name: str) -> str:
        while name in made and made[name].op_type in PASS_THROUGH_OPS:
            name = made[name].input[0]
        return name

    scales = set()
    for node in nodes:
        if node.op_type == "Mul" and len(node.input) == 2:
            first, second = (source(name) for name in node.input)
            for codes, scale in ((first, second), (second, first)):
                if types.get(codes) in CODE_DTYPES and types.get(scale) == onnx.TensorProto.FLOAT:
                    scales.add(scale)
    return scales


def onnx_size(path: str | os.PathLike, model: onnx.ModelProto | None = None,
              sample_shape: SampleShape = None) -> OnnxSize:
    """Count parameters, weight bytes and MACs of an ONNX file (one definition for all reports).
    MACs are for one sample; `sample_shape` sizes the input's open dimensions (a graph that
    leaves its height and width open has no MAC count without it), or each input's by name."""
    model = model if model is not None else onnx.load(os.fspath(path))
    graphs = list(_graphs_in(model.graph))  # an If's branches hold weights too (Silero VAD: all of them)
    nodes = [node for graph in graphs for node in graph.node]
    # Scales and zero points of Quantize/DequantizeLinear are bytes, not parameters.
    qparams = {name for node in nodes if node.op_type in ("QuantizeLinear", "DequantizeLinear")
               for name in node.input[1:]} | _code_scales(nodes, graphs)
    params = weight_bytes = 0
    # Exporters such as Paddle2ONNX keep the weights in Constant nodes instead of initializers.
    held = [(node.output[0], a.t) for node in nodes if node.op_type == "Constant"
            for a in node.attribute if a.name == "value"]
    for name, init in [*((i.name, i) for graph in graphs for i in graph.initializer), *held]:
        if init.data_type in SHAPE_DTYPES:
            continue
        count = int(np.prod(init.dims)) if len(init.dims) else 1
        bits = PACKED_BITS.get(init.data_type)
        weight_bytes += -(-count * bits // 8) if bits else numpy_helper.to_array(init).nbytes
        if name not in qparams:
            params += count
    return OnnxSize(params, weight_bytes, onnx_macs(model, sample_shape), os.path.getsize(os.fspath(path)))


def _graphs_in(graph: onnx.GraphProto):
    """`graph` and every subgraph its nodes hold (If / Loop / Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else
                        attribute.graphs if attribute.type == onnx.AttributeProto.GRAPHS else []):
                yield from _graphs_in(sub)


def _batch1_shapes(model: onnx.ModelProto, sample_shape: SampleShape = None
                   ) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    """The model shape-inferred with the batch dimension fixed to 1 (and the other open
    dimensions of each input of matching rank to `sample_shape`, or of each input named in it to
    its own), and every value's shape."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    inits = {i.name for i in fixed.graph.initializer}
    for inp in fixed.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        shape = sample_shape.get(inp.name) if isinstance(sample_shape, Mapping) else sample_shape
        fill = list(shape) if shape is not None and len(shape) == len(dims) - 1 else None
        for i, dim in enumerate(dims):
            is_open = not dim.HasField("dim_value") or dim.dim_value < 1
            if i == 0 or (fill is not None and is_open):
                dim.ClearField("dim_param")
                dim.dim_value = 1 if i == 0 else fill[i - 1]
    inferred = onnx.shape_inference.infer_shapes(fixed)
    shapes = _value_shapes(inferred)
    left_open = any(not shapes.get(name) or 0 in shapes[name] for node in inferred.graph.node for name in node.output
                    if name)
    for name, dims in (_symbolic_shapes(fixed) if left_open else {}).items():  # fills what ONNX's left open
        if (not shapes.get(name) or 0 in shapes[name]) and dims and 0 not in dims:
            shapes[name] = dims
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)
    counted = [name for node in inferred.graph.node if node.op_type in COUNTED_OPS
               for name in (node.output[0], node.input[0]) if not shapes.get(name) or 0 in shapes[name]]
    if counted:  # what neither inference follows (a Reshape to a computed shape): one run tells
        shapes.update(_executed_shapes(fixed, inferred, counted))
    return inferred, shapes


COUNTED_OPS = ("Conv", "ConvInteger", "QLinearConv", "Gemm", "MatMul", "MatMulInteger", "QLinearMatMul",
               "FusedConv", "FusedGemm", "FusedMatMul", "QGemm", "MatMulNBits", "Attention", "QAttention")


FLOAT_CONTRIB_OPS = ("FusedConv", "FusedGemm", "FusedMatMul", "MatMulNBits", "Attention")


def _executed_shapes(model: onnx.ModelProto, inferred: onnx.ModelProto, names: list[str]) -> dict[str, list[int]]:
    """The shapes of the values `names` in one onnxruntime run of `model` on zeros, where every
    input's shape is known (the batch at 1); none where it is not or the run fails. The ONNX
    shape inference and onnxruntime's symbolic one both stop at a Reshape to a shape computed in
    the graph (a torch export of a BERT's result: its MACs read 0)."""
    from rankfold.runtime import session

    inits = {i.name for i in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in value.type.tensor_type.shape.dim]
        if 0 in dims:
            return {}
        feeds[value.name] = np.zeros(dims, onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
    # onnxruntime's fused ops, which ONNX's inference does not type, compute in float
    types = {out: onnx.TensorProto.FLOAT for node in model.graph.node if node.op_type in FLOAT_CONTRIB_OPS
             and node.domain == "com.microsoft" for out in node.output[:1]}
    types.update((vi.name, vi.type.tensor_type.elem_type) for vi in [*inferred.graph.value_info, *inferred.graph.output]
                 if vi.type.tensor_type.elem_type)
    # values after them that ONNX could not type either: float first, and if onnxruntime refuses
    # that, the typed values alone
    guessed = {name: types.get(name, onnx.TensorProto.FLOAT) for name in dict.fromkeys(names)}
    for kinds in (guessed, {name: kind for name, kind in guessed.items() if name in types}):
        if not kinds:
            return {}
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        present = {o.name for o in probe.graph.output}
        probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, k, None) for n, k in kinds.items()
                                  if n not in present)
        try:
            values = session(probe, optimized=False).run(list(kinds), feeds)
        except Exception:  # noqa: BLE001 - a graph onnxruntime cannot run on zeros keeps the shapes inferred
            continue
        return {name: list(np.shape(value)) for name, value in zip(kinds, values)}
    return {}


def _value_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Every value's declared or inferred shape (0 where a dimension is unknown), inside an If's
    branches too."""
    return _graph_shapes(model.graph)


def _dims(value: onnx.ValueInfoProto) -> list[int]:
    """A value's dimensions, 0 where one is unknown."""
    return [d.dim_value if d.HasField("dim_value") else 0 for d in value.type.tensor_type.shape.dim]


def _graph_shapes(graph: onnx.GraphProto) -> dict[str, list[int]]:
    shapes = {vi.name: _dims(vi) for vi in [*graph.input, *graph.value_info, *graph.output]}
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                shapes.update((name, dims) for name, dims in _graph_shapes(a.g).items()
                              if dims and 0 not in dims or name not in shapes)
                shapes.update((init.name, list(init.dims)) for init in a.g.initializer)
    return shapes


def _symbolic_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Shapes from onnxruntime's symbolic inference, which follows a Reshape to a shape computed
    from Shape ops (ddddocr's recogniser: its LSTM's input) and knows onnxruntime's contrib ops;
    what it found where it stops part way, none where it cannot run (the counts then rest on
    ONNX's inference alone). Its loop is run here rather than through infer_shapes(), which, when
    a shape stays open, saves the model and its weights into the working directory: a user's
    folder, never to be written."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inference = SymbolicShapeInference(2**31 - 1, True, False, 0)  # int_max, auto_merge, guess rank, verbose
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            inference._preprocess(model)
    except Exception:  # noqa: BLE001 - any failure of the optional tool leaves ONNX's shapes
        return {}
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            while inference.run_:
                inference._infer_impl()
            inference._update_output_from_vi()
        return _value_shapes(inference.out_mp_)
    except Exception:  # noqa: BLE001 - stopped at an op it cannot follow (a QDQ export of Magika, at
        pass  # a Squeeze after ReduceMax-18): what it found before still counts
    return {name: _dims(vi) for name, vi in inference.known_vi_.items() if vi.type.HasField("tensor_type")}


def onnx_macs(model: onnx.ModelProto, sample_shape: SampleShape = None) -> int:
    """MACs for batch 1, from ONNX shape inference with the batch dimension fixed to 1. An If
    counts its costlier branch (Silero VAD's 16 kHz and 8 kHz models: the run takes one of them)."""
    inferred, shapes = _batch1_shapes(model, sample_shape)
    return _graph_macs(inferred.graph, shapes)


def _graph_macs(graph: onnx.GraphProto, shapes: dict[str, list[int]]) -> int:
    total = 0
    for node in graph.node:
        if node.op_type == "If":
            total += max((_graph_macs(a.g, shapes) for a in node.attribute if a.type == onnx.AttributeProto.GRAPH),
                         default=0)
            continue
        if node.op_type in RECURRENT_OPS:  # sized by its input: ONNX cannot infer a contrib op's output
            total += _recurrent_macs(node, shapes)
            continue
        if node.op_type == "Attention" or node.op_type in CONTRIB_ATTENTION_MACS:  # sized by their inputs
            standard = node.op_type == "Attention" and node.domain in ("", "ai.onnx")
            count = _standard_attention_macs if standard else CONTRIB_ATTENTION_MACS[node.op_type]
            total += count(node, shapes)
            continue
        out = shapes.get(node.output[0])
        if not out or min(out) < 1:  # left open (0, or -1 from a symbolic inference): not counted
            continue
        out_elems = int(np.prod(out))
        if node.op_type in ("Conv", "ConvInteger", "QLinearConv", "FusedConv"):
            w = shapes.get(node.input[3] if node.op_type == "QLinearConv" else node.input[1])
            if w and min(w) >= 1:
                total += out_elems * int(np.prod(w[1:]))
        elif node.op_type in ("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul", "FusedGemm", "FusedMatMul", "QGemm"):
            a = shapes.get(node.input[0])
            if a and min(a) >= 1:
                trans_a = any(at.name == "transA" and at.i for at in node.attribute)
                total += out_elems * (a[0] if trans_a and node.op_type != "FusedMatMul" else
                                      a[-2] if trans_a else a[-1])
        elif node.op_type == "MatMulNBits":
            total += out_elems * next(at.i for at in node.attribute if at.name == "K")
    return total


def _attention_macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    """onnxruntime's fused attention on (batch, S, input): the q, k, v projections (S x input x
    (q + k + v)), then the scores Q K^T and their mix with V (S x S x (q + v), over all heads)."""
    x, weight = shapes.get(node.input[0]), shapes.get(node.input[1])
    if not x or not weight or len(x) != 3 or min(x) < 1:
        return 0
    sizes = next((list(a.ints) for a in node.attribute if a.name == "qkv_hidden_sizes"), []) or [weight[1] // 3] * 3
    tokens = x[1]
    return x[0] * (tokens * weight[0] * weight[1] + tokens * tokens * (sizes[0] + sizes[2]))


def _standard_attention_macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    """Opset 23's Attention on projected Q, K, V: the scores Q K^T and their mix with V for every
    query head, over the keys and any past cache (a key head serves a group of query heads)."""
    q, k, v = (shapes.get(name) for name in node.input[:3])
    if not q or not k or not v or len(q) not in (3, 4) or min(q + k + v) < 1:
        return 0
    past = shapes.get(node.input[4]) if len(node.input) > 4 and node.input[4] else None
    keys = k[-2] + (past[2] if past and min(past) >= 1 else 0)
    if len(q) == 4:  # (batch, heads, S, size)
        return q[0] * q[1] * q[2] * keys * (q[3] + v[3])
    attrs = {a.name: a.i for a in node.attribute}
    query_heads, key_heads = attrs.get("q_num_heads", 1), attrs.get("kv_num_heads", 1)
    return q[0] * q[1] * keys * (q[2] + v[2] * query_heads // key_heads)


def _multi_head_attention_macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    """onnxruntime's MultiHeadAttention on projected q (batch, S, hidden) and k, v (batch, L,
    hidden) or (batch, heads, L, size): the scores and their mix with v, over any past cache."""
    q, k, v = (shapes.get(name) if name else None for name in list(node.input[:3]) + [""] * (3 - len(node.input)))
    if not q or not k or not v or len(q) != 3 or min(q + k + v) < 1:
        return 0
    past = shapes.get(node.input[6]) if len(node.input) > 6 and node.input[6] else None
    keys = (k[1] if len(k) == 3 else k[2]) + (past[2] if past and min(past) >= 1 else 0)
    values = v[2] if len(v) == 3 else v[1] * v[3]
    return q[0] * q[1] * keys * (q[2] + values)


def _group_query_attention_macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    """onnxruntime's GroupQueryAttention on projected q (batch, S, heads * size), or q, k, v packed
    in one input: the scores and their mix for every query head, over the past cache and the new keys."""
    q = shapes.get(node.input[0])
    if not q or len(q) != 3 or min(q) < 1:
        return 0
    attrs = {a.name: a.i for a in node.attribute}
    heads, kv_heads = attrs.get("num_heads", 1), attrs.get("kv_num_heads", 1)
    packed = len(node.input) < 2 or not node.input[1]
    size = q[2] // (heads + 2 * kv_heads) if packed else q[2] // heads
    past = shapes.get(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    keys = q[1] + (past[2] if past and min(past) >= 1 else 0)
    return q[0] * q[1] * keys * 2 * heads * size


CONTRIB_ATTENTION_MACS = {"Attention": _attention_macs, "QAttention": _attention_macs,
                          "MultiHeadAttention": _multi_head_attention_macs,
                          "GroupQueryAttention": _group_query_attention_macs}


# Recurrences whose input weights W and recurrent weights R are inputs 1 and 2, and whose input
# X is (T, N, features), or (N, T, features) with layout=1.
RECURRENT_OPS = ("LSTM", "GRU", "RNN", "DynamicQuantizeLSTM")


def _recurrent_macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    """Every time step multiplies the step's input by W and the state by R, in every direction:
    T x (|W| + |R|) however W and R are laid out (DynamicQuantizeLSTM keeps them transposed)."""
    x, w, r = (shapes.get(name) for name in node.input[:3])
    if not x or not w or not r or len(x) != 3:
        return 0
    batch_first = any(a.name == "layout" and a.i == 1 for a in node.attribute)
    steps = x[1] if batch_first else x[0]
    return steps * (int(np.prod(w)) + int(np.prod(r)))


def onnx_peak_activation_bytes(model: onnx.ModelProto, sample_shape: SampleShape = None) -> int:
    """Peak bytes of activations alive at once for one sample, running the nodes in file order.

    A value is alive from the node that writes it to the last node that reads it; weights, and
    values computed from weights alone (e.g. dequantized weights), are not activations. In a QDQ
    graph the runtime fuses DequantizeLinear -> op -> QuantizeLinear into an integer kernel, so
    the float values inside such a group (made by DequantizeLinear, or read only by
    QuantizeLinear) take no memory; the int8 values between the groups do. Open dimensions take
    `sample_shape` (as onnx_macs); left open, their values counted nothing (a BERT file read 4 kB).
    """
    inferred, shapes = _batch1_shapes(model, sample_shape)
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]}
    constant = {i.name for i in inferred.graph.initializer}
    for node in inferred.graph.node:
        if all(not name or name in constant for name in node.input):
            constant.update(node.output)
    # onnxruntime's fused ops, which ONNX's inference does not type, compute in float
    float_values = {out: onnx.TensorProto.FLOAT for node in inferred.graph.node
                    if node.op_type in FLOAT_CONTRIB_OPS and node.domain == "com.microsoft" for out in node.output[:1]}

    def nbytes(name: str) -> int:
        dims, elem = shapes.get(name), types.get(name) or float_values.get(name)
        if not dims or min(dims) < 1 or not elem:
            return 0
        return int(np.prod(dims)) * onnx.helper.tensor_dtype_to_np_dtype(elem).itemsize

    nodes = [n for n in inferred.graph.node if not all(o in constant for o in n.output)]
    readers: dict[str, set[str]] = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    outputs = {o.name for o in inferred.graph.output}
    fused = {name for node in nodes if node.op_type == "DequantizeLinear" for name in node.output}
    fused |= {name for name, ops in readers.items() if ops == {"QuantizeLinear"}}
    fused -= outputs | {i.name for i in inferred.graph.input}
    last_use = {o.name: len(nodes) for o in inferred.graph.output}
    for index, node in enumerate(nodes):
        for name in node.input:
            if name and name not in constant:
                last_use[name] = max(last_use.get(name, index), index)
    for node in reversed(nodes):  # a fused group's inputs live until the group's int8 output exists
        outs = [name for name in node.output if name]
        if outs and all(name in fused for name in outs):
            end = max(last_use.get(name, 0) for name in outs)
            for name in node.input:
                if name in last_use:
                    last_use[name] = max(last_use[name], end)
    alive = {i.name: nbytes(i.name) for i in inferred.graph.input if i.name not in constant}
    peak = sum(alive.values())
    for index, node in enumerate(nodes):
        alive.update({name: 0 if name in fused else nbytes(name) for name in node.output if name})
        peak = max(peak, sum(alive.values()))
        alive = {name: size for name, size in alive.items() if last_use.get(name, -1) > index}
    return peak


def _session(path: str, threads: int = 1, optimized: bool = True):
    from rankfold.runtime import session

    return session(path, threads=threads, optimized=optimized)


def faithful(path: str) -> bool:
    """Whether the file's own meaning is what onnxruntime's default session computes here (see
    rankfold.runtime.optimized_is_faithful); False: measure it in the reference arithmetic."""
    return optimized_is_faithful(onnx.load(path, load_external_data=False))


def input_dims(session) -> list:
    return list(session.get_inputs()[0].shape)


def fixed_batch(proto: onnx.ModelProto) -> int | None:
    """The batch size the graph's inputs fix (an export at batch 1), or None: open."""
    constants = {init.name for init in proto.graph.initializer}
    return fixed_batch_of([i for i in proto.graph.input if i.name not in constants])


def class_scores(path: str, x: np.ndarray, *, batch_size: int = 250, threads: int = 0,
                 optimized: bool | None = None) -> np.ndarray:
    """The ONNX model's first output, (N, classes) scores, on x (in batches). `optimized`: None
    runs the file as it means to compute (onnxruntime's default session unless its int8 kernels
    saturate on this CPU, faithful()); True or False forces the default or the reference session."""
    session = _session(path, threads, faithful(path) if optimized is None else optimized)
    check_input_shape(x, input_dims(session), path)
    name = session.get_inputs()[0].name
    fixed_batch = input_dims(session)[0]
    if isinstance(fixed_batch, int) and fixed_batch > 0:  # a model exported for one batch size
        batch_size = fixed_batch
        if len(x) % batch_size:
            raise RankfoldError(f"{path}: its batch size is fixed at {batch_size}, which does not divide "
                                f"the {len(x)} samples")
    scores = []
    for start in range(0, len(x), batch_size):
        logits = session.run(None, {name: as_declared(session.get_inputs()[0], x[start : start + batch_size])})[0]
        if logits.ndim != 2:
            raise RankfoldError(f"{path}: top-1 accuracy needs (N, classes) scores as the first output, "
                                f"got shape {logits.shape}")
        scores.append(logits)
    return np.concatenate(scores)


def accuracy(path: str, x: np.ndarray, y: np.ndarray, *, batch_size: int = 250, threads: int = 0,
             optimized: bool | None = None) -> float:
    """Top-1 accuracy of the ONNX model on (x, y) (`optimized`: see class_scores)."""
    scores = class_scores(path, x, batch_size=batch_size, threads=threads, optimized=optimized)
    if int(y.max()) >= scores.shape[1]:
        raise RankfoldError(f"{path}: labels go up to {int(y.max())} but the model scores "
                            f"{scores.shape[1]} classes")
    return float((scores.argmax(axis=1) == y).mean())


def latency_ms(path: str, sample: np.ndarray, *, batch: int, runs: int = 30, warmup: int = 5) -> float:
    """Median onnxruntime latency (1 thread) over `runs` runs after `warmup`, in milliseconds."""
    session = _session(path, 1)
    name = session.get_inputs()[0].name
    reps = int(np.ceil(batch / len(sample)))
    feed = {name: as_declared(session.get_inputs()[0], np.concatenate([sample] * reps)[:batch])}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


KERNEL_CHECK_SAMPLES = 16


SATURATING_LATENCY_NOTE = ("timed in the default session, whose fused int8 kernels compute this file wrongly on "
                           "this CPU: its own arithmetic (the accuracy's) runs slower here")


@dataclass
class EvalResult:
    accuracy: float | None
    params: int
    macs: int
    weight_bytes: int
    file_bytes: int
    latency_ms_b1: float | None
    latency_ms_b32: float | None
    peak_activation_bytes: int = 0
    int8_kernel_max_units: int | None = None  # QDQ models: optimized kernels vs reference, layer by layer
    cpu: str = ""
    # where this CPU's fused int8 kernels saturate: accuracy is the reference arithmetic's (what the
    # file means), and this is what onnxruntime's default session computes here
    accuracy_default_session: float | None = None
    arithmetic: str = "onnxruntime's default session"
    # latency is always the default session's: where its int8 kernels saturate, it times kernels
    # that compute something else than the file (said here, not hidden)
    latency_note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(
    path: str | os.PathLike,
    x: np.ndarray,
    y: np.ndarray | None,
    *,
    runs: int = 30,
    measure_latency: bool = True,
) -> EvalResult:
    """Everything `rankfold eval` reports for one ONNX file."""
    path = os.fspath(path)
    size = onnx_size(path, sample_shape=tuple(x.shape[1:]))  # open dimensions sized by the data
    proto = onnx.load(path)
    exact = optimized_is_faithful(proto)
    acc = accuracy(path, x, y, optimized=exact) if y is not None else None
    acc_default = accuracy(path, x, y, optimized=True) if y is not None and not exact else None
    # a file exported for one batch size is timed at that size only: it refuses any other
    fixed = fixed_batch(proto)
    b1, b32 = (latency_ms(path, x[:batch], batch=batch, runs=runs)
               if measure_latency and fixed in (None, batch) else None for batch in (1, 32))
    peak = onnx_peak_activation_bytes(proto, sample_shape=tuple(x.shape[1:]))
    kernels = None
    if any(node.op_type == "QuantizeLinear" for node in proto.graph.node):
        from rankfold.runtime import int8_kernel_check

        kernels = int8_kernel_check(proto, x[:KERNEL_CHECK_SAMPLES])
    return EvalResult(acc, size.params, size.macs, size.weight_bytes, size.file_bytes, b1, b32, peak,
                      None if kernels is None else kernels.worst_units, cpu_summary(), acc_default,
                      "onnxruntime's default session" if exact else REFERENCE_ARITHMETIC_NOTE,
                      "" if exact else SATURATING_LATENCY_NOTE)
