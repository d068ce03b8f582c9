"""Float ONNX -> QDQ ONNX: QuantizeLinear/DequantizeLinear around every activation, integer weight
initializers (int8, or packed int4 at opset 21), int32 biases. onnxruntime fuses DQ -> Conv/Gemm
-> Q into its integer kernels. Every scale and zero point is computed here, once, and lives in the
written file; the C export reads them back from it."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import numpy as np
import onnx
import onnx.version_converter
from onnx import TensorProto, helper, numpy_helper

from rankfold.errors import RankfoldError, first_line
from rankfold.host_memory import format_bytes
from rankfold.quantize.core import BIAS_CODE_LIMIT, ActivationParams, pack_int4, quantize_weight, with_bias_room
from rankfold.quantize.observers import OBSERVERS, RangeObserver
from rankfold.settings import calibration_batch

INT4_OPSET = 21
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
TABLE_OPS = ("Gather",)  # an embedding table's read: its data input (0) is the table, one scale per row
INT8_RANGE_KEY = "rankfold.int8_weight_bits"  # metadata: "8" (codes within +-127) or "7" (+-63)


def float_activations(model: onnx.ModelProto) -> list[str]:
    """Names of the float tensors that depend on a graph input: the graph inputs and what nodes
    compute from them. Constants (a Clip's bounds, a Reshape's shape) are not activations:
    quantizing them wastes nodes, mangles the values and keeps the runtime from fusing Conv+Clip."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    inits = {i.name for i in model.graph.initializer}
    live = [i.name for i in model.graph.input if i.name not in inits]
    reached = set(live)
    for node in model.graph.node:  # topological order
        if any(name in reached for name in node.input):
            outputs = [o for o in node.output if o]
            reached.update(outputs)
            live += outputs
    return [n for n in dict.fromkeys(live) if types.get(n) == TensorProto.FLOAT]


def relu_fused_outputs(model: onnx.ModelProto) -> set[str]:
    """Outputs of Conv/Gemm/MatMul read by nothing but one Relu or Clip (ReLU6): they are not
    quantized, so that the runtime fuses DQ -> Conv -> Relu -> Q into one integer kernel that
    rounds once, and the quantization range (after the activation) does not spend levels on
    values the activation removes."""
    readers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    outputs = {o.name for o in model.graph.output}
    return {node.output[0] for node in model.graph.node
            if node.op_type in WEIGHTED_OPS and readers.get(node.output[0]) in (["Relu"], ["Clip"])
            and node.output[0] not in outputs}


# The observed tensors of one calibration run: beyond about a gigabyte, fresh pages cost more than
# a larger batch saves (PP-OCRv4's detector, 241 MB a sample: 56 samples in 21 s at 14 a run, 12 s at 4).
OBSERVED_BYTES_PER_RUN = 1 << 30
# All calibration runs together observe at most about this many bytes of activations, and never
# fewer than RANGE_SAMPLES_AT_LEAST samples: beyond it, more samples move a percentile range little
# and cost a pass each (PP-OCRv4's detector, 168 MB observed a page: 64 of 224 pages; compressed
# to 10 % of its bytes in 203 s against 233 s observing every page). A network with small
# activations (a classifier, a few megabytes a sample or less) sees every sample.
OBSERVED_BYTES_IN_ALL = 8 << 30
RANGE_SAMPLES_AT_LEAST = 64


def range_samples(count: int, sample_bytes: int) -> np.ndarray | None:
    """The indices of the calibration samples the activation ranges are observed on, spread evenly
    over all `count` (calibration files are often sorted by class), or None for every sample."""
    limit = max(RANGE_SAMPLES_AT_LEAST, OBSERVED_BYTES_IN_ALL // max(sample_bytes, 1))
    if count <= limit:
        return None
    return np.unique(np.linspace(0, count - 1, limit).round().astype(np.int64))


def calibrate(model: onnx.ModelProto, calib: np.ndarray, *, observer: str = "percentile",
              batch_size: int | None = None, only: Collection[str] | None = None,
              progress: Callable[[str], None] | None = None) -> dict[str, ActivationParams]:
    """int8 parameters for every float activation tensor (of `only`, where given), from
    onnxruntime runs over `calib`."""
    batch_size = batch_size or min(32, calibration_batch())
    from rankfold.runtime import model_input, run_batched
    from rankfold.runtime import session as ort_session

    if observer not in OBSERVERS:
        raise RankfoldError(f"unknown observer {observer!r}; choose from {', '.join(OBSERVERS)}")
    names = [n for n in float_activations(model) if n not in relu_fused_outputs(model)
             and (only is None or n in only)]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    session = ort_session(probe, optimized=False)  # unoptimized: every tensor is still there to observe
    input_name = session.get_inputs()[0].name
    wanted = [o.name for o in session.get_outputs() if o.name in set(names)]
    observers = {n: RangeObserver() for n in wanted}
    if len(calib) > 1:  # what one sample's observed tensors weigh sizes the batches (not observed twice)
        sample_bytes = sum(v.nbytes for v in run_batched(session, wanted, input_name, model_input(calib[:1])))
        batch_size = max(1, min(batch_size, OBSERVED_BYTES_PER_RUN // max(sample_bytes, 1)))
        spread = range_samples(len(calib), sample_bytes)
        if spread is not None:
            if progress:
                progress(f"activation ranges on {len(spread)} of {len(calib)} calibration samples, spread evenly "
                         f"({format_bytes(sample_bytes)} of activations a sample)")
            calib = calib[spread]
    for start in range(0, len(calib), batch_size):
        if progress:
            progress(f"activation ranges: samples {start + 1}-{min(start + batch_size, len(calib))} of {len(calib)}")
        values = run_batched(session, wanted, input_name, model_input(calib[start : start + batch_size]))
        for name, value in zip(wanted, values):
            observers[name].update(value)
    pick = OBSERVERS[observer]
    return {n: pick(o) for n, o in observers.items()}


def _const(graph_inits: list, name: str, array: np.ndarray) -> str:
    graph_inits.append(numpy_helper.from_array(array, name))
    return name


def _int4_tensor(name: str, values: np.ndarray) -> onnx.TensorProto:
    """Packed two values per byte in raw_data (helper.make_tensor would store one int32 each)."""
    tensor = TensorProto(name=name, data_type=TensorProto.INT4, dims=list(values.shape))
    tensor.raw_data = pack_int4(values)
    return tensor


def to_qdq(
    model: onnx.ModelProto,
    weight_bits: Mapping[str, int],
    activations: Mapping[str, ActivationParams],
    *,
    reduce_range: bool = False,
    per_tensor: Collection[str] = (),
    groups: Mapping[str, int] | None = None,
    for_onnxruntime: bool = False,
) -> onnx.ModelProto:
    """The QDQ model. `weight_bits`: node name -> 8 or 4 for the Conv/Gemm/MatMul nodes whose
    constant weights are quantized (others keep float weights). `activations`: tensor -> params.
    `reduce_range`: int8 weight codes within +-63 (what the fake-quantized weights were rounded to).
    `per_tensor`: nodes whose weights get one scale (and their int32 bias one) instead of one per
    output channel. `groups`: int4 nodes whose weights get one scale per that many input elements
    of each output channel (DequantizeLinear's block_size; their biases stay float).
    `for_onnxruntime`: a file for onnxruntime, not the C back-end: the activations that its
    MatMul + Add fusion would fail on are written uint8 (unsigned_for_fusion)."""
    groups = groups or {}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if any(b == 4 for b in weight_bits.values()) and opset < INT4_OPSET:
        model = raised_opset(model, INT4_OPSET)  # int4 tensors need opset 21
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {i.name: i for i in graph.initializer}
    new_inits: list[onnx.TensorProto] = []
    new_nodes: list[onnx.NodeProto] = []
    renamed: dict[str, str] = {}

    graph_outputs = {o.name for o in graph.output}
    unsigned = unsigned_for_fusion(out, activations) if for_onnxruntime else set()

    def qdq(tensor: str, source: str | None = None) -> None:
        """Q/DQ on `tensor`; a graph output keeps its name on the DQ, its producer writes `source`."""
        params = activations[tensor]
        scale = _const(new_inits, f"{tensor}_scale", np.array(params.scale, np.float32))
        # uint8 codes 128 above the int8 ones, with the zero point: the same real values
        zero_point = np.array(params.zero_point + 128, np.uint8) if tensor in unsigned else \
            np.array(params.zero_point, np.int8)
        zero = _const(new_inits, f"{tensor}_zero_point", zero_point)
        new_nodes.append(helper.make_node("QuantizeLinear", [source or tensor, scale, zero], [f"{tensor}_q"],
                                          name=f"{tensor}_QuantizeLinear"))
        dequantized = tensor if source else f"{tensor}_dq"
        new_nodes.append(helper.make_node("DequantizeLinear", [f"{tensor}_q", scale, zero], [dequantized],
                                          name=f"{tensor}_DequantizeLinear"))
        if not source:
            renamed[tensor] = dequantized

    graph_inputs = [i.name for i in graph.input if i.name in activations]
    for name in graph_inputs:
        qdq(name)
    # The exporter gives each repeated call of a layer (a recurrence's R, once per step) an Identity
    # copy of its weight: read the initializer itself, so that its quantized copy replaces it.
    copies = {n.output[0]: n.input[0] for n in graph.node
              if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in graph_outputs}
    for node in [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in copies)]:
        node.input[:] = [copies.get(name, name) for name in node.input]
        original_inputs = list(node.input)
        bits = weight_bits.get(node.name)
        # A layer kept float reads its input unquantized: fed by a DequantizeLinear, onnxruntime
        # would quantize its float weights itself (per tensor, nearest rounding). The input's Q/DQ
        # stays in the file (onnxruntime drops it when nothing reads it): the C back-end, which has
        # no float layers, runs the layer in int8 from those parameters.
        float_layer = node.op_type in WEIGHTED_OPS and (bits is None or bits >= 32)
        for i, name in enumerate(node.input):
            if name in renamed and not (float_layer and i == 0):
                node.input[i] = renamed[name]
        if node.op_type in WEIGHTED_OPS and bits is not None and bits < 32 and len(node.input) > 1 \
                and node.input[1] in inits:
            _quantize_node_weights(node, original_inputs[0], inits, new_inits, new_nodes, activations, bits,
                                   groups.get(node.name), reduce_range, node.name in per_tensor)
        elif node.op_type in TABLE_OPS and bits is not None and bits < 32 and node.input[0] in inits:
            _quantize_node_weights(node, None, inits, new_inits, new_nodes, activations, bits,
                                   groups.get(node.name), reduce_range, index=0)
        new_nodes.append(node)
        for i, name in enumerate(node.output):
            if name in activations and name in graph_outputs:
                node.output[i] = f"{name}_float"
                qdq(name, source=f"{name}_float")
            elif name in activations:
                qdq(name)
    new_nodes = _read_dequantized_where_shared(new_nodes, {i.name for i in new_inits})
    new_nodes = _tables_dequantized_by_row(new_nodes, new_inits, TABLE_OPS)
    new_nodes = _weights_folded_at_load(new_nodes, new_inits, set(renamed.values()))
    used = {i for n in new_nodes for i in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + [i for i in new_inits if i.name in used])
    del graph.node[:]
    graph.node.extend(new_nodes)
    if weight_bits:
        onnx.helper.set_model_props(out, {**{p.key: p.value for p in out.metadata_props},
                                          INT8_RANGE_KEY: "7" if reduce_range else "8"})
    from rankfold.frontends.onnx import as_onnx_checks_it

    onnx.checker.check_model(as_onnx_checks_it(out))  # a user's graph may hold onnxruntime's own ops (graft)
    return out


# Standard ops whose new versions up to opset 21 only take more types (float8, int4) or add an
# attribute or input whose default keeps the old behaviour (Pad's axes, Split's num_outputs,
# Resize's antialias, Cast's saturate for float8): an older node means the same at 21. Not here:
# the Reduce ops (axes moved from attribute to input at 18), GroupNormalization (21).
SAME_MEANING_THROUGH_21 = frozenset({
    "Cast", "CastLike", "Shape", "Size", "Transpose", "Reshape", "Identity", "Constant", "ConstantOfShape",
    "Squeeze", "Unsqueeze", "Flatten", "Equal", "If", "Loop", "Scan", "Pad", "Resize", "Split", "AveragePool",
    "DequantizeLinear", "QuantizeLinear"})


def raised_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """`model` at ONNX opset `target`: onnx's version converter, or, where it cannot convert the
    graph (it knows no schema for onnxruntime's own ops in the default domain, such as a language
    model's SimplifiedLayerNormalization), the same nodes under the new opset when none of the
    graph's standard ops changes meaning in between. Raises RankfoldError naming those that do."""
    try:
        return onnx.version_converter.convert_version(model, target)
    except Exception as exc:
        refusal = first_line(exc)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    standard = {n.op_type for n in _all_nodes(model.graph) if n.domain in ("", "ai.onnx") and onnx.defs.has(n.op_type)}
    changed = sorted(op for op in standard - SAME_MEANING_THROUGH_21 if onnx.defs.get_schema(op, target).since_version
                     != onnx.defs.get_schema(op, opset).since_version)
    if changed:
        raise RankfoldError(f"int4 weights need ONNX opset {target}: the graph's {', '.join(changed)} change "
                            f"meaning from opset {opset}, and onnx's version converter cannot convert it ({refusal})")
    raised = onnx.ModelProto()
    raised.CopyFrom(model)
    for entry in raised.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = target
    return raised


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _all_nodes(sub)


def unsigned_for_fusion(model: onnx.ModelProto, activations: Collection[str]) -> set[str]:
    """The activations to write as uint8 in an opset-21 file (int4 weights) for onnxruntime: those
    a MatMul reads whose output an Add reads unquantized (a last layer before a float tail; every
    other output has its own Q/DQ between them). Where every size is static, onnxruntime's
    MatMulAddFusion turns the pair into a Gemm between Reshapes and quantizes the reshaped input
    with output_dtype taken from the int8 input but a uint8 zero point; the file then fails to load
    ("output_dtype INT8 does not match y_zero_point type UINT8", microsoft/onnxruntime#25526;
    AECMOS, batch fixed at 1, at a tenth of its bytes). With a uint8 input both agree. int8 files
    (opset below 21) have no output_dtype and load either way."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < INT4_OPSET:
        return set()
    read_by_add = {name for node in model.graph.node if node.op_type == "Add" for name in node.input}
    return {node.input[0] for node in model.graph.node if node.op_type == "MatMul"
            and node.output[0] in read_by_add and node.output[0] not in activations}


def _read_dequantized_where_shared(nodes: list[onnx.NodeProto], made: set[str]) -> list[onnx.NodeProto]:
    """A quantized weight that other nodes read too (a language model's token table, whose
    transpose is its tied head) is read by them through its DequantizeLinear: the float copy would
    store the matrix a second time, and it holds the same values (the weights were rounded to their
    grid before export). Those DequantizeLinear nodes, which read initializers only, come first."""
    quantized = {name[: -len("_wscale")] for name in made if name.endswith("_wscale") and f"{name[:-7]}_q" in made}
    redirected = set()
    for node in nodes:
        if node.op_type == "DequantizeLinear" and node.input[0][:-2] in quantized:
            continue
        for i, name in enumerate(node.input):
            if name in quantized:
                node.input[i] = f"{name}_dq"
                redirected.add(name)
    first = [n for n in nodes if n.op_type == "DequantizeLinear" and n.output and n.output[0][:-3] in redirected
             and n.output[0].endswith("_dq")]
    return first + [n for n in nodes if all(n is not f for f in first)]


def _tables_dequantized_by_row(nodes: list[onnx.NodeProto], new_inits: list[onnx.TensorProto],
                               table_ops: Collection[str]) -> list[onnx.NodeProto]:
    """A quantized table is no longer dequantized whole at every call. onnxruntime folds no
    DequantizeLinear and fuses none a Gather reads, so SmolLM2's table (28M codes, tied to its
    head) was dequantized at each token: 44 of a 47 ms decode step, twice the float file's 23 ms.
    Now a Gather takes the rows it needs from the codes and dequantizes those alone (codes x the
    rows' scales, per group where the table has groups); any other reader (the tied head's
    Transpose) reads the table dequantized by Cast and Mul, constants that onnxruntime computes
    once at load. The file holds the same codes and scales (13.3 ms a step)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    inits = {t.name: t for t in new_inits}
    for dq in [n for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] in inits]:
        reads = readers.get(dq.output[0], [])
        gathers = [r for r in reads if r.op_type in table_ops and r.input[0] == dq.output[0]
                   and _attribute(r, "axis", 0) == 0]
        codes = inits[dq.input[0]]
        if not gathers or len(codes.dims) != 2 or len(dq.input) > 2:
            continue
        rows, width = codes.dims
        scale = inits[dq.input[1]]
        block = _attribute(dq, "block_size", 0)
        if scale.dims and (_attribute(dq, "axis", 1) != (1 if block else 0) or width % (block or width)):
            continue
        groups = width // block if block else 1
        base = dq.input[0][: -len("_q")]
        if scale.dims:  # one scale per row, or per group of a row: (rows, groups, 1) multiplies the codes
            values = numpy_helper.to_array(scale).reshape(rows, groups, 1)
            scale.CopyFrom(numpy_helper.from_array(values, scale.name))
        first: list[onnx.NodeProto] = []  # read constants only: before every node
        shapes = {"grouped": [-1, groups, width // groups], "row": [-1, width], "flat": [-1]}
        for key, shape in shapes.items():
            new_inits.append(numpy_helper.from_array(np.array(shape, np.int64), f"{base}_{key}_shape"))
        eight_bit = codes.name
        if codes.data_type == TensorProto.INT4:  # Gather takes no int4: the int8 copy is folded at load
            eight_bit = f"{base}_q8"
            first.append(helper.make_node("Cast", [codes.name], [eight_bit], to=TensorProto.INT8, name=f"{base}_Cast8"))

        def dequantized(codes_value: str, scales_value: str, out: str, tag: str) -> list[onnx.NodeProto]:
            """(n, width) codes and their (n, groups, 1) scales (or the one scale) -> (n, width) floats."""
            cast = helper.make_node("Cast", [codes_value], [f"{out}_f"], to=TensorProto.FLOAT, name=f"{tag}_Cast")
            if not scale.dims:
                return [cast, helper.make_node("Mul", [f"{out}_f", scales_value], [out], name=f"{tag}_Mul")]
            return [cast, helper.make_node("Reshape", [f"{out}_f", f"{base}_grouped_shape"], [f"{out}_g"],
                                           name=f"{tag}_Group"),
                    helper.make_node("Mul", [f"{out}_g", scales_value], [f"{out}_gs"], name=f"{tag}_Mul"),
                    helper.make_node("Reshape", [f"{out}_gs", f"{base}_row_shape"], [out], name=f"{tag}_Rows")]

        around: dict[int, tuple[list[onnx.NodeProto], list[onnx.NodeProto]]] = {}  # a Gather's nodes before, after
        for index, gather in enumerate(gathers):
            tag, ids, out = f"{base}_rows{index}", gather.input[1], gather.output[0]
            before = [helper.make_node("Reshape", [ids, f"{base}_flat_shape"], [f"{tag}_ids"], name=f"{tag}_Flat")]
            gather.input[:] = [eight_bit, f"{tag}_ids"]  # the codes of the rows asked for, ids flattened
            gather.output[0] = f"{tag}_codes"
            row_scales = scale.name
            after = []
            if scale.dims:
                row_scales = f"{tag}_scales"
                after.append(helper.make_node("Gather", [scale.name, f"{tag}_ids"], [row_scales], axis=0,
                                              name=f"{tag}_Scales"))
            new_inits.append(numpy_helper.from_array(np.array([width], np.int64), f"{tag}_width"))
            after += [*dequantized(f"{tag}_codes", row_scales, f"{tag}_float", tag),
                      helper.make_node("Shape", [ids], [f"{tag}_ids_shape"], name=f"{tag}_Shape"),
                      helper.make_node("Concat", [f"{tag}_ids_shape", f"{tag}_width"], [f"{tag}_shape"], axis=0,
                                       name=f"{tag}_OutShape"),
                      helper.make_node("Reshape", [f"{tag}_float", f"{tag}_shape"], [out], name=f"{tag}_Out")]
            around[id(gather)] = (before, after)
        if len(gathers) < len(reads):  # the others read the whole table: constants folded at load
            first += dequantized(eight_bit, scale.name, dq.output[0], f"{base}_table")
        rebuilt = list(first)
        for node in nodes:
            if node is dq:
                continue
            before, after = around.get(id(node), ([], []))
            rebuilt += [*before, node, *after]
        nodes = rebuilt
    return nodes


def _weights_folded_at_load(nodes: list[onnx.NodeProto], new_inits: list[onnx.TensorProto],
                           quantized_inputs: Collection[str]) -> list[onnx.NodeProto]:
    """Weight-only codes that no onnxruntime kernel takes are scaled by a Cast and a Mul, constants
    that onnxruntime folds into float weights at load, instead of a DequantizeLinear, which it
    folds never and runs at every call: a Conv's or a Gemm's (no kernel takes integer weights with
    float inputs; ResNet-18: 9.5 ms a call against 4.0 float), and a MatMul's that several MatMuls
    read (an unrolled recurrence's steps; a 576 x 1536 int8 weight read by two: 2.5 ms a call).
    A MatMul's own keeps its DequantizeLinear, which onnxruntime fuses into MatMulNBits; a layer
    between int8 activations keeps it too (its integer kernel reads it)."""
    inits = {t.name: t for t in new_inits}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    rebuilt: list[onnx.NodeProto] = []
    for node in nodes:
        reads = readers.get(node.output[0], []) if node.op_type == "DequantizeLinear" else []
        codes = inits.get(node.input[0]) if reads else None
        weight_only = codes is not None and len(node.input) == 2 and _attribute(node, "block_size", 0) == 0 and \
            all(r.op_type in WEIGHTED_OPS and r.input[1] == node.output[0] and r.input[0] not in quantized_inputs
                for r in reads)
        if not weight_only or (len(reads) == 1 and reads[0].op_type == "MatMul"):
            rebuilt.append(node)
            continue
        scale = inits[node.input[1]]
        if scale.dims:  # one scale per channel of the axis: broadcast over the axes after it
            axis = _attribute(node, "axis", 1) % len(codes.dims)
            values = numpy_helper.to_array(scale).reshape(-1, *[1] * (len(codes.dims) - 1 - axis))
            scale.CopyFrom(numpy_helper.from_array(values, scale.name))
        rebuilt += [helper.make_node("Cast", [node.input[0]], [f"{node.output[0]}_codes"], to=TensorProto.FLOAT,
                                     name=f"{node.name}_Cast"),
                    helper.make_node("Mul", [f"{node.output[0]}_codes", node.input[1]], [node.output[0]],
                                     name=f"{node.name}_Scale")]
    return rebuilt


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _weight_axis(node: onnx.NodeProto) -> int:
    """The output-channel axis of the node's weight."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 1  # MatMul: (in, out)


def _quantize_node_weights(node, input_tensor, inits, new_inits, new_nodes, activations, bits, group_size,
                           reduce_range, per_tensor: bool = False, index: int = 1) -> None:
    """Quantize the node's constant input `index`: a layer's weight (1), or a table (0: one row
    per channel, as a Gather reads it)."""
    base = node.input[index]
    if any(i.name == f"{base}_q" for i in new_inits):  # a weight shared by several calls: quantized once
        node.input[index] = f"{base}_dq"
        return
    weight = numpy_helper.to_array(inits[node.input[index]]).astype(np.float32)
    axis = _weight_axis(node) if index == 1 else 0
    per_channel = np.moveaxis(weight, axis, 0)
    # Grouped scales need DequantizeLinear's block_size (opset 21); per-channel otherwise.
    group = group_size if group_size is not None and bits == 4 and not per_tensor else None
    qw = quantize_weight(per_channel, bits, group, reduce_range=reduce_range, per_tensor=per_tensor)
    int32_bias = index == 1 and len(node.input) > 2 and node.input[2] in inits and input_tensor in activations \
        and group is None
    if int32_bias:
        bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
        input_scale = np.float64(np.float32(activations[input_tensor].scale))
        if not per_tensor:
            qw = with_bias_room(per_channel, qw, bias, input_scale, reduce_range)
    q = np.moveaxis(qw.q, 0, axis)
    # Weights are symmetric: the zero point input is left out (it defaults to 0), saving bytes.
    if bits == 4:
        new_inits.append(_int4_tensor(f"{base}_q", q))
    else:
        new_inits.append(numpy_helper.from_array(q.astype(np.int8), f"{base}_q"))
    scale = qw.scale if group is None else np.moveaxis(qw.scale, 0, axis)
    pointwise = group is not None and weight.ndim > 2 and node.op_type == "Conv" and \
        all(d == 1 for d in weight.shape[2:])
    if pointwise:  # (out, in, 1, 1): a scale per block of inputs and per (unit) tap
        scale = scale.reshape(*scale.shape, *weight.shape[2:])
    if per_tensor:  # one scalar: DequantizeLinear without an axis
        scale = np.array(qw.scale[0] if qw.scale.size else 1.0)
    new_inits.append(numpy_helper.from_array(scale.astype(np.float32), f"{base}_wscale"))
    attrs = {} if per_tensor else {"axis": axis}
    if group is not None:  # blocks run along the input axis: that is DequantizeLinear's axis then
        if weight.ndim != 2 and not pointwise:
            raise RankfoldError(f"{node.name}: int4 groups are for Linear weights and pointwise convolutions, got "
                                f"shape {weight.shape}")
        attrs = {"axis": 1 - axis, "block_size": group}
    new_nodes.append(helper.make_node("DequantizeLinear", [f"{base}_q", f"{base}_wscale"],
                                      [f"{base}_dq"], name=f"{base}_DequantizeLinear", **attrs))
    node.input[index] = f"{base}_dq"
    # int32 bias at scale s_in * s_w[c], so the integer kernels apply. The file computes that scale
    # from the two it holds (a Mul of constants, folded at load): 4 bytes fewer per channel.
    if not int32_bias:
        return
    # float32 product of the float32 scales, as the Mul computes it (exact in float64, then rounded)
    bias_scale = (input_scale * scale.astype(np.float64)).astype(np.float32)
    # A code past the limit (possible only with one scale for the whole tensor) would lose the bias:
    # the bias then stays float, and the Conv runs on dequantized weights.
    if np.all(bias_scale > 0) and np.all(np.abs(bias) <= BIAS_CODE_LIMIT * bias_scale.astype(np.float64)):
        q_bias = np.round(bias / bias_scale).astype(np.int32)
        b = node.input[2]
        if any(i.name == f"{b}_q" for i in new_inits):  # a bias shared by several calls: one code per input scale
            b = f"{b}_{len(new_inits)}"
        new_inits.append(numpy_helper.from_array(q_bias, f"{b}_q"))
        new_nodes.append(helper.make_node("Mul", [f"{input_tensor}_scale", f"{base}_wscale"], [f"{b}_bscale"],
                                          name=f"{b}_scale_Mul"))
        new_nodes.append(helper.make_node("DequantizeLinear", [f"{b}_q", f"{b}_bscale"], [f"{b}_dq"],
                                          name=f"{b}_DequantizeLinear", **({} if per_tensor else {"axis": 0})))
        node.input[2] = f"{b}_dq"
