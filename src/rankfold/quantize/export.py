"""A compressed float torch model + per-layer bit-widths -> QDQ ONNX file."""

from __future__ import annotations

import copy
import os
import re
import tempfile
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import onnx
from torch import Tensor, nn

from rankfold.analyze import TABLES
from rankfold.errors import RankfoldError
from rankfold.quantize.core import ActivationParams
from rankfold.quantize.onnx_qdq import TABLE_OPS, WEIGHTED_OPS, calibrate, to_qdq
from rankfold.quantize.weights import correct_bias, grouped_leaves, per_tensor_leaves, quantize_weights

BIAS_CORRECTION_SAMPLES = 128
ROUNDING_SAMPLES = 256  # calibration inputs for the data-aware rounding's input moments


def module_of_node(node_name: str, modules: Mapping[str, int]) -> str | None:
    """The module (a key of `modules`) that produced an exported node, or None. torch's exporter
    names a node '/scope/.../<module name>/Op' with the second-last part the module's full name,
    or, for modules nested in scopes (a Hugging Face encoder), '/a/b/c/Op' for module 'a.b.c'."""
    parts = node_name.split("/")
    if len(parts) < 3:
        return None
    candidates = [parts[-2], ".".join(parts[1:-1])]
    if len(parts) > 3 and parts[-2].startswith(parts[-3] + "."):
        # A factor of a nested module's chain: '/a/b/query/query.0/MatMul' is module 'a.b.query.0'.
        candidates.append(".".join(parts[1:-2] + [parts[-2][len(parts[-3]) + 1:]]))
    # The k-th repeated call of a module is scoped '<name>_k' (a recurrence calls R at every step).
    candidates += [re.sub(r"_\d+$", "", c) for c in candidates if c not in modules]
    return next((c for c in candidates if c in modules), None)


def node_bits(model: onnx.ModelProto, leaf_bits: Mapping[str, int]) -> dict[str, int]:
    """Weighted ONNX nodes -> bits, by the module that produced each (module_of_node)."""
    result = {}
    for node in model.graph.node:
        leaf = module_of_node(node.name, leaf_bits) if node.op_type in WEIGHTED_OPS + TABLE_OPS else None
        if leaf is not None:
            result[node.name] = leaf_bits[leaf]
    return result


def weight_only_export(example_input: Tensor, model: nn.Module | None = None) -> bool:
    """Whether a quantized plan of this model is written with float activations: a model fed
    token ids (integer inputs, or packed with them: rankfold.frontends.packing) is a transformer,
    whose activations carry a few outlier channels that one int8 scale per tensor cannot hold
    (MiniLM, int8 everywhere: embedding cosine 0.83 with int8 activations, 0.9996 weight-only;
    its ONNX file with ids and a padding mask, at 30 % of its bytes: 0.45)."""
    packing = getattr(model, "packing", None)
    return not example_input.is_floating_point() or (packing is not None and packing.integer)


def quantized_copy(model: nn.Module, bits: Mapping[str, int], *, calib: Tensor, equalize: bool = True,
                   bias_correction: bool = True, data_aware_rounding: bool = True, reduce_range: bool = False,
                   per_tensor: Collection[str] = (), groups: Mapping[str, int] | None = None,
                   progress: Callable[[str], None] | None = None) -> tuple[nn.Module, dict[str, int]]:
    """A copy of `model` whose quantized layers' weights lie on their integer grid, as every
    quantized output (QDQ file, saved directory) stores them: seams equalized, data-aware
    rounding, bias correction (each optional). Returns the copy and the bits of each quantized
    leaf layer, by full name."""
    say = progress or (lambda _m: None)
    quantized = copy.deepcopy(model).eval()
    say("quantizing weights" + (" (seams equalized)" if equalize else "")
        + (", data-aware rounding" if data_aware_rounding else "")
        + (", int8 on 7 bits (reduce_range)" if reduce_range else ""))
    leaves = quantize_weights(quantized, bits, equalize=equalize,
                              calib=calib[:ROUNDING_SAMPLES] if data_aware_rounding else None,
                              reduce_range=reduce_range, per_tensor=per_tensor, groups=groups)
    if bias_correction:
        say("bias correction")
        modules = dict(model.named_modules())
        names = [n for n, b in bits.items() if b < 32 and not isinstance(modules[n], TABLES)]  # tables have no bias
        correct_bias(model.eval(), quantized, names, calib[:BIAS_CORRECTION_SAMPLES])
    return quantized, leaves


def layer_tensors(model: onnx.ModelProto) -> set[str]:
    """The tensors from which a Conv / Gemm / MatMul node is reached (through any ops), and the
    graph outputs such a node writes: what integer kernels, or the C back-end, need quantized.
    (Not every layer's output: one quantized amid a float tail, YOLOv8n's box decoding, made
    onnxruntime's optimizer propagate a QuantizeLinear it then failed to type.)"""
    reaching: set[str] = set()
    for node in reversed(model.graph.node):  # topological order, walked backwards
        if node.op_type in WEIGHTED_OPS or any(o in reaching for o in node.output):
            reaching.update(i for i in node.input if i)
    outputs = {o.name for o in model.graph.output}
    return reaching | {o for node in model.graph.node if node.op_type in WEIGHTED_OPS for o in node.output
                       if o in outputs}


@dataclass
class GridCopy:
    """What export_quantized makes before it quantizes activations: the copy whose quantized
    layers lie on their integer grid, its leaves' bits and its float graph. Passed again, it is
    reused: the forms one plan may be written in (int8 activations, then weight-only) hold the same
    weights, and rounding them again cost PP-OCRv4's detector 42 s."""

    quantized: nn.Module | None = None
    leaves: dict[str, int] | None = None
    graph: onnx.ModelProto | None = None


def export_quantized(
    model: nn.Module,
    bits: Mapping[str, int],
    path: str | os.PathLike,
    *,
    calib: Tensor,
    example_input: Tensor,
    observer: str = "percentile",
    equalize: bool = True,
    bias_correction: bool = True,
    data_aware_rounding: bool = True,
    reduce_range: bool | None = None,
    weight_only: bool = False,
    per_tensor: Collection[str] = (),
    groups: Mapping[str, int] | None = None,
    input_steps: Mapping[str, ActivationParams] | None = None,
    float_outputs: bool = False,
    float_graph: Callable[[nn.Module], onnx.ModelProto] | None = None,
    progress: Callable[[str], None] | None = None,
    grid: GridCopy | None = None,
) -> dict[str, int]:
    """Write the QDQ ONNX of `model` with each named layer's weights at `bits[name]` (32: float).
    `reduce_range`: int8 weights on 7 bits, which onnxruntime on x86 without VNNI needs to compute
    exactly; None: whatever onnxruntime on this CPU needs (rankfold.runtime.int8_kernels()).
    `weight_only`: no activation is quantized (float activations, integer weights).
    `per_tensor`: layers (of `bits`) stored with one weight scale for the tensor, not per channel.
    `groups`: int4 layers (of `bits`) with one scale per that many input elements of each channel.
    `input_steps`: int8 parameters of some quantized leaf layers' inputs (learned in training),
    written for those tensors instead of the calibrated ones.
    `float_outputs`: for onnxruntime, the tail after the last layers (layer_tensors' complement)
    stays float: no integer kernel reads it, and rounding it only loses. One int8 scale over
    YOLOv8n's joined output (boxes in pixels, scores in [0, 1]) rounded every score to 0, and one
    over its sigmoid's output most of the small scores. A graph output that a layer writes stays
    quantized, so a network that ends in a layer still exports to C; one with a tail (a softmax, a
    sigmoid) exports to C when planned for a C target.
    `float_graph`: the float graph of the copy whose weights lie on their grid, to quantize (the
    copy written into the user's own graph, rankfold.export.graft); its traced export where that
    is None or returns None.
    `grid`: filled with the copy on the integer grid and its graph, or, already filled (by a call
    with the same model, bits and weight options), reused.
    Returns the bits of every quantized ONNX node."""
    from rankfold.export.onnx import export_onnx
    from rankfold.frontends.packing import packed_values
    from rankfold.io import replace_atomically

    say = progress or (lambda _m: None)
    if reduce_range is None:
        from rankfold.runtime import int8_kernels

        reduce_range = int8_kernels().reduce_range
    grid = grid if grid is not None else GridCopy()
    if grid.graph is None:
        grid.quantized, grid.leaves = quantized_copy(
            model, bits, calib=calib, equalize=equalize, bias_correction=bias_correction,
            data_aware_rounding=data_aware_rounding, reduce_range=reduce_range, per_tensor=per_tensor,
            groups=groups, progress=say)
        proto = float_graph(grid.quantized) if float_graph is not None else None
        if proto is None:
            with tempfile.TemporaryDirectory() as tmp:
                float_path = os.path.join(tmp, "float.onnx")
                export_onnx(grid.quantized, float_path, example_input=example_input)
                proto = onnx.load(float_path)
        grid.graph = proto
    quantized, leaves, proto = grid.quantized, grid.leaves, grid.graph
    # Weight-only: activations stay float (DequantizeLinear on the weights alone), as transformers
    # need: per-tensor int8 of their activations (outlier channels) loses most of the signal.
    # A float tail (float_outputs) is not observed at all: it stays float (PP-OCRv4's detector's:
    # two transposed convolutions up to the page's size).
    kept = layer_tensors(proto) if float_outputs else None
    activations = {} if weight_only else calibrate(proto, calib.numpy(), observer=observer, only=kept,
                                                   progress=say)
    packing = getattr(model, "packing", None)
    if packing is not None:  # packed token ids and masks are integers carried in float: never rounded
        for name in packed_values(proto, packing):
            activations.pop(name, None)
    nodes = node_bits(proto, leaves)
    for node in proto.graph.node:  # learned steps replace the calibrated ones for those inputs
        leaf = module_of_node(node.name, input_steps) if node.name in nodes and input_steps else None
        if leaf is not None and node.input[0] in activations:
            activations[node.input[0]] = input_steps[leaf]
    mapped = {module_of_node(node, leaves) for node in nodes}
    unmapped = sorted(set(leaves) - mapped)
    if unmapped:  # never let a planned quantized layer silently stay float
        raise RankfoldError(f"quantized layer(s) {', '.join(unmapped)} could not be matched to an ONNX node "
                            "of the export")
    whole = set(node_bits(proto, dict.fromkeys(per_tensor_leaves(quantized, per_tensor), 8))) & set(nodes)
    grouped = {node: size for leaf, size in grouped_leaves(quantized, groups or {}).items()
               for node in node_bits(proto, {leaf: 4})}
    qdq = to_qdq(proto, nodes, activations, reduce_range=reduce_range, per_tensor=whole, groups=grouped,
                 for_onnxruntime=float_outputs)
    replace_atomically(path, qdq.SerializeToString())
    return nodes
