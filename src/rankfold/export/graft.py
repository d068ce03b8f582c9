"""A float or weight-only result of an ONNX graph written into the user's own graph.

The traced export (rankfold.export.onnx) writes what the torch module computes: inputs given once
are constants there, so a decoder's result loses its key/value caches and a streaming model its
state. Here each layer the compression changed replaces the nodes it was read from, and
everything else stays as the file has it: its inputs and outputs, caches and states, Ifs,
onnxruntime's own ops, names and declared shapes. A layer is grafted where it was read from a
MatMul, Gemm, Conv or table Gather node (with the BatchNormalization, Mul or Add folded into it) and
is made of layers LAYER_WRITERS knows; anything else raises GraftRefused with the reason, and the
caller writes the traced export instead.
"""

from __future__ import annotations

import collections
import os
import tempfile
from collections.abc import Callable, Mapping

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import Tensor, nn

from rankfold.errors import RankfoldError
from rankfold.frontends.onnx import GatheredTable, read_onnx
from rankfold.layers import ColumnBlocks, ExactRows
from rankfold.runtime import join_samples

HEAD_OPS = ("MatMul", "Gemm", "Conv", "Gather")  # the weighted node a layer was read from (Gather: a table)
FOLDED_OPS = ("Add", "Mul", "BatchNormalization")  # what the reader folds into the layer after it
MAX_PROTO_BYTES = 2_000_000_000  # one protobuf holds at most 2 GB


class GraftRefused(Exception):
    """The result cannot be written into the original graph (the reason); the traced export can."""


def checked_graft(result: nn.Module, original: nn.Module, example: Tensor, rtol: float = 1e-4) -> onnx.ModelProto:
    """`result` written into the graph of the file `original` was read from (grafted_model),
    checked in onnxruntime against `result` on `example`, fed the inputs given once at their values
    as well. The graph is the file's as rankfold reads it: an older opset converted, float16 read
    in float32, as the traced export writes them too. Raises GraftRefused."""
    source = getattr(result, "source_path", None)
    if not source or not os.path.isfile(source):
        raise GraftRefused("the original file is not at hand")
    try:
        grafted = grafted_model(read_onnx(source), result, original)
    except (GraftRefused, RankfoldError):
        raise
    except Exception as exc:  # a result of another shape than rankfold's own reader makes: traced instead
        raise GraftRefused(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}") from None
    if grafted.ByteSize() > MAX_PROTO_BYTES:
        raise GraftRefused("the grafted graph would exceed the 2 GB one ONNX file holds")
    with tempfile.TemporaryDirectory(prefix="rankfold-") as scratch:
        tmp = os.path.join(scratch, "grafted.onnx")
        onnx.save(grafted, tmp)
        _verify(tmp, result, example, rtol)
    return grafted


def grafted_model(model: onnx.ModelProto, result: nn.Module, original: nn.Module) -> onnx.ModelProto:
    """`model` with the layers of `result` that differ from `original`'s in place of the nodes
    they were read from."""
    _refuse_other_changes(result, original)
    graft = onnx.ModelProto()
    graft.CopyFrom(model)
    graph = graft.graph
    constants = _constant_values(graph)
    producer = {out: node for node in graph.node for out in node.output}
    readers = collections.Counter(name for node in graph.node for name in node.input)
    outputs = {v.name for v in graph.output}
    taken = set(producer) | constants | {v.name for v in graph.input}
    replaced: dict[int, list[onnx.NodeProto]] = {}  # id of a chain's last node -> the nodes in its place
    removed: set[int] = set()
    weights = _Weights(result, taken)
    for step in result.steps:
        if step.module is None or _same_layer(result.get_submodule(step.module), original.get_submodule(step.module)):
            continue
        chain, x = _source_chain(step, producer, constants, readers, outputs)
        nodes = _layer_nodes(result.get_submodule(step.module), step.module, x, step.outputs[0], taken, weights)
        removed.update(id(n) for n in chain)
        replaced[id(chain[-1])] = nodes
    if not replaced:
        raise GraftRefused("no layer changed")
    kept: list[onnx.NodeProto] = []
    for node in graph.node:
        kept += replaced.get(id(node), []) if id(node) in removed else [node]
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(weights.made)
    _drop_unread(graph)
    return graft


def _refuse_other_changes(result: nn.Module, original: nn.Module) -> None:
    """Only layers may differ: the steps and the constants between them are the original's."""
    if not hasattr(result, "steps") or [(s.op, s.inputs, s.outputs, s.module) for s in result.steps] != \
            [(s.op, s.inputs, s.outputs, s.module) for s in original.steps]:
        raise GraftRefused("the result's graph is not the original's (its steps differ)")
    for value, buffer in result.buffer_of.items():
        theirs = original.buffer_of.get(value)
        if theirs is None or not torch.equal(getattr(result, buffer), getattr(original, theirs)):
            raise GraftRefused(f"the constant {value!r} changed")


def _constant_values(graph: onnx.GraphProto) -> set[str]:
    """The values computed from constants alone (initializers, Constant nodes, what reads only
    them: the transposed table a tied head's weight is gathered from)."""
    inputs = {v.name for v in graph.input}
    known = {t.name for t in graph.initializer} - inputs
    for node in graph.node:  # in topological order (read_onnx)
        if node.op_type == "Constant" or (node.op_type not in ("If", "Loop", "Scan") and node.input
                                          and all(not name or name in known for name in node.input)):
            known.update(node.output)
    return known


class _Weights:
    """The initializers written, each made once by the parameter it holds, however many nodes read
    it: a layer several steps call (nodes that shared their weights), a table and the LM head tied
    to it (`tied`: the ids of weights several layers hold; a Linear reads those through a Transpose)."""

    def __init__(self, result: nn.Module, taken: set[str]) -> None:
        self.taken = taken
        self.made: list[onnx.TensorProto] = []
        self.names: dict[tuple[int, bool], str] = {}
        holders: dict[int, set[str]] = {}
        for step in result.steps:
            weight = getattr(result.get_submodule(step.module), "weight", None) if step.module else None
            if isinstance(weight, Tensor):
                holders.setdefault(id(weight), set()).add(step.module)
        self.tied = {key for key, layers in holders.items() if len(layers) > 1}

    def name(self, value: Tensor, name: str, transposed: bool = False) -> str:
        """The initializer holding `value`: float32, or int64 for indices (ExactRows' rows)."""
        key = (id(value), transposed)
        if key not in self.names:
            data = (value.T if transposed else value).detach().cpu()
            data = data.float().numpy() if data.is_floating_point() else data.numpy().astype(np.int64)
            self.made.append(numpy_helper.from_array(np.ascontiguousarray(data), _unique(name, self.taken)))
            self.names[key] = self.made[-1].name
        return self.names[key]


def _same_layer(layer: nn.Module, before: nn.Module) -> bool:
    if type(layer) is not type(before):
        return False
    mine, theirs = layer.state_dict(), before.state_dict()
    return mine.keys() == theirs.keys() and all(
        mine[k].shape == theirs[k].shape and torch.equal(mine[k], theirs[k]) for k in mine)


def _source_chain(step, producer: Mapping[str, onnx.NodeProto], constants: set[str], readers: Mapping[str, int],
                  outputs: set[str]) -> tuple[list[onnx.NodeProto], str]:
    """The nodes a layer step was read from, first to last: its weighted node, then what was
    folded into it, each read by the next alone; and the value the layer reads."""
    chain: list[onnx.NodeProto] = []
    value = step.outputs[0]
    while True:
        node = producer.get(value)
        if node is None or node.domain not in ("", "ai.onnx") or \
                node.op_type not in HEAD_OPS + FOLDED_OPS or len(node.output) != 1:
            raise GraftRefused(f"layer {step.module!r} was not read from a MatMul, Gemm or Conv node of the file")
        if chain and (readers.get(node.output[0], 0) != 1 or node.output[0] in outputs):
            raise GraftRefused(f"an inner value of layer {step.module!r} is read elsewhere")
        chain.append(node)
        varying = [name for name in node.input if name and name not in constants]
        if len(varying) != 1:
            raise GraftRefused(f"layer {step.module!r}: its node {node.name or node.output[0]!r} reads "
                               f"{len(varying)} computed values")
        if node.op_type in HEAD_OPS:
            if node.op_type != step.op:
                raise GraftRefused(f"layer {step.module!r} was read from a {step.op}, found a {node.op_type}")
            if node.input[1 if node.op_type == "Gather" else 0] != varying[0]:
                raise GraftRefused(f"layer {step.module!r}: its weight is computed, not a constant")
            return chain[::-1], varying[0]
        if len(chain) > len(FOLDED_OPS):
            raise GraftRefused(f"layer {step.module!r}: more than its weighted node and what folds into it")
        value = varying[0]


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 0
    while candidate in taken:
        n += 1
        candidate = f"{name}{n}"
    taken.add(candidate)
    return candidate


def _layer_nodes(layer: nn.Module, name: str, x: str, out: str, taken: set[str], weights: _Weights
                 ) -> list[onnx.NodeProto]:
    """The nodes that compute `layer` (module `name`) from the value `x` into the value `out` (a
    chain of factors one after another). Nodes are named as torch's exporter names them
    ('/q.0/MatMul' for factor 0 of layer q), so the quantizer finds each one's layer."""
    parts = list(layer.named_children()) if isinstance(layer, nn.Sequential) else [("", layer)]
    nodes: list[onnx.NodeProto] = []
    value = x
    for index, (child, part) in enumerate(parts):
        writer = LAYER_WRITERS.get(type(part))
        if writer is None:
            raise GraftRefused(f"a {type(part).__name__} layer is not written into a graph")
        leaf = f"{name}.{child}" if child else name
        target = out if index == len(parts) - 1 else _unique(f"{leaf}.output", taken)
        nodes += writer(part, value, target, leaf, taken, weights)
        value = target
    return nodes


def _linear_nodes(layer: nn.Linear, x: str, out: str, leaf: str, taken: set[str], weights: _Weights):
    """x W^T (+ b) as MatMul (+ Add): MatMul takes any leading axes, as the layer does. A weight
    tied to a table is stored once, as the table (out, in), and read through a Transpose."""
    nodes: list[onnx.NodeProto] = []
    if id(layer.weight) in weights.tied:
        weight = _unique(f"{leaf}.weight_t", taken)
        nodes.append(helper.make_node("Transpose", [weights.name(layer.weight, f"{leaf}.weight")], [weight],
                                      name=_unique(f"/{leaf}/Transpose", taken)))
    else:
        weight = weights.name(layer.weight, f"{leaf}.weight", transposed=True)
    matmul = _unique(f"/{leaf}/MatMul", taken)
    if layer.bias is None:
        return [*nodes, helper.make_node("MatMul", [x, weight], [out], name=matmul)]
    product = _unique(f"{leaf}.product", taken)
    return [*nodes, helper.make_node("MatMul", [x, weight], [product], name=matmul),
            helper.make_node("Add", [product, weights.name(layer.bias, f"{leaf}.bias")], [out],
                             name=_unique(f"/{leaf}/Add", taken))]


def _table_nodes(layer: nn.Embedding, ids: str, out: str, leaf: str, taken: set[str], weights: _Weights):
    """Rows of the table (GatheredTable: negative ids count from the end, as Gather's do)."""
    table = weights.name(layer.weight, f"{leaf}.weight")
    return [helper.make_node("Gather", [table, ids], [out], name=_unique(f"/{leaf}/Gather", taken), axis=0)]


def _conv_nodes(layer: nn.Conv1d | nn.Conv2d, x: str, out: str, leaf: str, taken: set[str], weights: _Weights):
    if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        raise GraftRefused(f"a convolution padded {layer.padding!r} ({layer.padding_mode}) is not written into a graph")
    inputs = [x, weights.name(layer.weight, f"{leaf}.weight")]
    if layer.bias is not None:
        inputs.append(weights.name(layer.bias, f"{leaf}.bias"))
    return [helper.make_node("Conv", inputs, [out], name=_unique(f"/{leaf}/Conv", taken),
                             kernel_shape=list(layer.kernel_size), strides=list(layer.stride),
                             dilations=list(layer.dilation), group=layer.groups, pads=list(layer.padding) * 2)]


def _blocks_nodes(layer: ColumnBlocks, x: str, out: str, leaf: str, taken: set[str], weights: _Weights):
    """Each block's nodes from the same input, then their outputs joined on the last axis."""
    nodes: list[onnx.NodeProto] = []
    parts = []
    for index, block in enumerate(layer.blocks):
        parts.append(_unique(f"{leaf}.blocks.{index}.output", taken))
        nodes += _layer_nodes(block, f"{leaf}.blocks.{index}", x, parts[-1], taken, weights)
    return [*nodes, helper.make_node("Concat", parts, [out], name=_unique(f"/{leaf}/Concat", taken), axis=-1)]


def _exact_rows_nodes(layer: ExactRows, x: str, out: str, leaf: str, taken: set[str], weights: _Weights):
    """The rest's nodes and the read rows' from the same input, then the read rows' outputs written
    over the rest's at their indices on the last axis (ScatterElements, the indices expanded to the
    read rows' output shape)."""
    rest, read = _unique(f"{leaf}.rest.output", taken), _unique(f"{leaf}.read.output", taken)
    nodes = [*_layer_nodes(layer.rest, f"{leaf}.rest", x, rest, taken, weights),
             *_layer_nodes(layer.read, f"{leaf}.read", x, read, taken, weights)]
    rows = weights.name(layer.rows, f"{leaf}.rows")
    shape, spread = _unique(f"{leaf}.read.shape", taken), _unique(f"{leaf}.rows.spread", taken)
    return [*nodes, helper.make_node("Shape", [read], [shape], name=_unique(f"/{leaf}/Shape", taken)),
            helper.make_node("Expand", [rows, shape], [spread], name=_unique(f"/{leaf}/Expand", taken)),
            helper.make_node("ScatterElements", [rest, spread, read], [out], name=_unique(f"/{leaf}/ScatterElements",
                                                                                          taken), axis=-1)]


# One writer per layer type a factor can be: how its nodes read in ONNX.
LAYER_WRITERS: dict[type, Callable] = {nn.Linear: _linear_nodes, nn.Conv1d: _conv_nodes, nn.Conv2d: _conv_nodes,
                                       GatheredTable: _table_nodes, ColumnBlocks: _blocks_nodes,
                                       ExactRows: _exact_rows_nodes}


def _drop_unread(graph: onnx.GraphProto) -> None:
    """What the replaced nodes alone read (their weights, a transpose of them, Constant nodes),
    and the shapes declared for values no node computes any more."""
    while True:
        read = _read_values(graph)
        nodes = [n for n in graph.node if any(o in read for o in n.output)]
        if len(nodes) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(nodes)
    inputs = {v.name for v in graph.input}
    kept = [t for t in graph.initializer if t.name in read or t.name in inputs]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    computed = {o for n in graph.node for o in n.output}
    infos = [v for v in graph.value_info if v.name in computed]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def _read_values(graph: onnx.GraphProto) -> set[str]:
    read = {name for node in graph.node for name in node.input} | {v.name for v in graph.output}
    for node in graph.node:
        for attribute in node.attribute:  # an If's branches read outer values too
            for sub in [attribute.g, *attribute.graphs] if attribute.HasField("g") or attribute.graphs else []:
                read |= _read_values(sub)
    return read


def _verify(path: str, result: nn.Module, example: Tensor, rtol: float) -> None:
    """The grafted file in onnxruntime (given_feeds_run) against `result` on `example`."""
    from rankfold.export.onnx import relative_error
    from rankfold.runtime import session

    if getattr(result, "fixed_batch", None) is not None:
        example = example[: result.fixed_batch]
    try:
        got = given_feeds_run(session(path), result, example)
    except GraftRefused:
        raise
    except Exception as exc:  # onnxruntime refuses the grafted graph
        raise GraftRefused(f"onnxruntime cannot run the grafted graph: {str(exc).splitlines()[0][:200]}") from None
    with torch.no_grad():
        expected = result(example)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for name, g, w in zip(result.output_names, got, expected, strict=True):
        w = w.detach().cpu().numpy()
        error = relative_error(g, w) if w.dtype.kind == "f" else float(not np.array_equal(g, w))
        if error > rtol:
            raise RankfoldError(f"the grafted file disagrees with the compressed model on {name!r}: relative "
                                f"error {error:.2e} > {rtol:g}")


def given_feeds_run(runner, module: nn.Module, x: Tensor) -> list[np.ndarray]:
    """An onnxruntime session of a file that takes every input of `module`'s original file, run
    on the per-sample input `x` (unpacked where `module` reads several packed) and the inputs
    given once at their values: one sample at a time, as those were given for one sample (a
    state of batch 1 that onnxruntime would not broadcast)."""
    parts = [runner.run(None, _feeds(module, x[i : i + 1], {i.name for i in runner.get_inputs()}))
             for i in range(len(x))]
    return [join_samples([p[k] for p in parts], [1] * len(parts)) for k in range(len(parts[0]))]


def _feeds(module: nn.Module, example: Tensor, names: set[str]) -> dict[str, np.ndarray]:
    """Every input of the original file: the per-sample ones (unpacked where read packed) and the
    ones given once, at the values the module was read with."""
    packing = getattr(module, "packing", None)
    x = example.detach().cpu().numpy()
    if packing is not None:
        from rankfold.frontends.packing import unpack_arrays

        feeds = unpack_arrays(packing, x)
    else:
        feeds = {module.input_names[0]: x}
    feeds.update(getattr(module, "given_values", {}))
    missing = sorted(names - feeds.keys())
    if missing:
        raise GraftRefused(f"no value at hand for the inputs {', '.join(missing)}")
    return {name: feeds[name] for name in names}
