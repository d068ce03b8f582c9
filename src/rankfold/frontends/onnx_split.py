"""A graph with ops rankfold cannot run, cut in two: the head, every node that computes without
them (where a detector's or recogniser's layers are), and the tail, the unsupported nodes and
every node that reads what they compute (a NonMaxSuppression and the gathers after it). The head
is compressed like any graph, checked on every value the tail reads (the cut) and on the graph
outputs it writes; the tail is then joined back to it, node for node as the file had it.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper

from rankfold.errors import RankfoldError, first_line
from rankfold.frontends.onnx import INTEGER_LAYER_OPS, LAYER_OPS, default_opset, qualified_op, unsupported_ops
from rankfold.frontends.packing import FLOAT_TYPES

TAIL_PREFIX = "rankfold_tail/"  # a tail name that the compressed head also uses is renamed so


@dataclass
class GraphSplit:
    head: onnx.ModelProto  # outputs: the graph outputs it writes, then the cut
    tail: list[onnx.NodeProto]
    tail_initializers: list[onnx.TensorProto]
    cut: list[str]  # values of the head that the tail reads
    outputs: list[onnx.ValueInfoProto]  # the original graph's outputs, in order
    inputs: list[onnx.ValueInfoProto]  # the original graph's inputs (initializers excluded)
    unsupported: dict[str, int]
    opsets: list[onnx.OperatorSetIdProto]  # the original's imports (other domains the tail may use)

    def describe(self) -> str:
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(self.unsupported.items()))
        return (f"rankfold cannot run {ops}: the graph is compressed up to the {len(self.cut)} value(s) those "
                f"nodes read ({', '.join(self.cut[:4])}{', ...' if len(self.cut) > 4 else ''}), and the "
                f"{len(self.tail)} node(s) from there on are kept as the file has them")


def _names_read(node: onnx.NodeProto) -> set[str]:
    """Every value a node reads, its subgraphs' reads from the outer scope included."""
    names = {i for i in node.input if i}
    for attribute in node.attribute:
        for graph in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)):
            inner = {o for n in graph.node for o in n.output} | {i.name for i in graph.input} | \
                    {t.name for t in graph.initializer}
            names |= {name for n in graph.node for name in _names_read(n)} - inner
    return names


SHAPE_READS = ("Shape", "Size")  # their outputs depend on a tensor's size only, never on its values


def _branching_on_values(graph: onnx.GraphProto, given_once: set[str]) -> list[onnx.NodeProto]:
    """The If nodes whose condition depends on the per-sample input's values (not on constants,
    inputs given once or sizes alone): rankfold cannot inline them (a wake-word model that runs
    its verifier only where its first score reaches 0.5)."""
    initializers = {t.name for t in graph.initializer}
    on_values = {i.name for i in graph.input if i.name not in initializers and i.name not in given_once}
    found = []
    for node in graph.node:
        if node.op_type == "If" and node.input[0] in on_values:
            found.append(node)
        if node.op_type not in SHAPE_READS and _names_read(node) & on_values:
            on_values.update(o for o in node.output if o)
    return found


def split_at_unsupported(model: onnx.ModelProto, given_once: set[str] | None = None) -> GraphSplit | None:
    """The split of `model` where it has ops rankfold cannot run (If nodes that branch on the
    input's values among them); None where it has none, or where the head holds no layer (nothing
    to compress before them). `given_once`: the inputs given once (constants of the result)."""
    graph = model.graph
    unsupported = unsupported_ops(graph.node)
    branching = _branching_on_values(graph, given_once or set())
    if branching:
        unsupported["If (on the input's values)"] = len(branching)
    if not unsupported:
        return None
    cut_at = {id(n) for n in branching}
    tainted: set[str] = set()
    head, tail = [], []
    for node in graph.node:
        if qualified_op(node) in unsupported or id(node) in cut_at or _names_read(node) & tainted:
            tail.append(node)
            tainted.update(o for o in node.output if o)
        else:
            head.append(node)
    known = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    known.update({v.name: v for v in graph.output})
    head, tail = _float_cut(head, tail, known)
    made_by_head = {o for n in head for o in n.output if o}
    made_by_tail = {o for n in tail for o in n.output if o}  # copies of head nodes among them (_float_cut)
    cut = list(dict.fromkeys(name for n in tail for name in sorted(_names_read(n))
                             if name in made_by_head and name not in made_by_tail))
    outputs = list(graph.output)
    head_outputs = [o.name for o in outputs if o.name in made_by_head]
    if (not cut and not head_outputs) or not any(n.op_type in (*LAYER_OPS, *INTEGER_LAYER_OPS) for n in head):
        return None  # nothing to compress before them: the load refuses the graph, naming them
    _shape_the_cut(model, cut, known)
    missing = [name for name in cut if name not in known or not known[name].type.tensor_type.elem_type
               or _rank(known[name]) is None]
    if missing:
        raise RankfoldError(f"unsupported ONNX ops ({', '.join(unsupported)}): the values they read "
                            f"({', '.join(missing[:4])}) have no type or rank that shape inference finds, so the graph "
                            "cannot be cut before them; export the part before them as its own ONNX file")
    initializers = {t.name: t for t in graph.initializer}
    read_by_head = set().union(*(_names_read(n) for n in head)) if head else set()
    read_by_tail = set().union(*(_names_read(n) for n in tail))
    inputs = [i for i in graph.input if i.name not in initializers]
    head_graph = helper.make_graph(
        head, graph.name or "head", [i for i in inputs if i.name in read_by_head or i.name in head_outputs],
        [known[name] for name in dict.fromkeys([*head_outputs, *cut])],
        initializer=[t for name, t in initializers.items() if name in read_by_head])
    head_model = helper.make_model(head_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    head_model.metadata_props.extend(model.metadata_props)
    return GraphSplit(head_model, tail, [t for name, t in initializers.items() if name in read_by_tail], cut,
                      outputs, inputs, unsupported, list(model.opset_import))


def _shape_the_cut(model: onnx.ModelProto, cut: list[str], known: dict) -> None:
    """Give each cut value ONNX's inference typed but left without a shape (a Transpose of a Reshape
    to a computed shape: SLANet's) the rank onnxruntime's symbolic inference finds, its unknown
    sizes open: a graph output needs a shape to be a valid model (the head's)."""
    shapeless = [name for name in cut if name in known and known[name].type.tensor_type.elem_type
                 and _rank(known[name]) is None]
    if not shapeless:
        return
    from rankfold.evaluate import _symbolic_shapes

    found = _symbolic_shapes(model)
    for name in shapeless:
        if found.get(name):
            dims = [d or f"{name}_dim{i}" for i, d in enumerate(found[name])]
            known[name] = helper.make_tensor_value_info(name, known[name].type.tensor_type.elem_type, dims)




def _float_cut(head: list, tail: list, known: dict) -> tuple[list, list]:
    """(head, tail) with the nodes that make a non-float or 0-d value the tail reads (a condition,
    an index, a scalar over the batch), and the constants only the tail reads, moved to the tail
    (and what they read in turn), so that the head ends in per-sample float values its self-check
    compares; layers stay in the head. Such a node whose value the head reads too (a shape both
    halves reshape by: SLANet's) stays, and the tail gets a copy (join renames its outputs)."""
    order = {id(n): i for i, n in enumerate([*head, *tail])}
    while True:
        made_by_tail = {o for n in tail for o in n.output}
        reads = set().union(*(_names_read(n) for n in tail)) - made_by_tail if tail else set()
        head_reads = set().union(*(_names_read(n) for n in head)) if head else set()

        def goes(n: onnx.NodeProto) -> bool:
            if n.op_type in LAYER_OPS:
                return False
            not_float = any(o in reads and o in known and (known[o].type.tensor_type.elem_type not in FLOAT_TYPES
                                                           or _rank(known[o]) == 0) for o in n.output)
            constant_for_tail = not n.input and any(o in reads for o in n.output) and not set(n.output) & head_reads
            return not_float or constant_for_tail

        moved = [n for n in head if goes(n)]
        if not moved:
            return head, tail
        copies = []
        for n in moved:
            if set(n.output) & head_reads:
                copy = onnx.NodeProto()
                copy.CopyFrom(n)
                order[id(copy)] = order[id(n)]
                copies.append(copy)
        head = [n for n in head if all(n is not m for m in moved) or set(n.output) & head_reads]
        tail = sorted([*[m for m in moved if not set(m.output) & head_reads], *copies, *tail],
                      key=lambda n: order[id(n)])


def _rank(value: onnx.ValueInfoProto) -> int | None:
    tensor = value.type.tensor_type
    return len(tensor.shape.dim) if tensor.HasField("shape") else None


def join(head: onnx.ModelProto, split: GraphSplit) -> onnx.ModelProto:
    """The compressed `head` with the split's tail after it: one graph with the original's inputs
    and outputs. The tail is brought to the head's opset by onnx's version converter."""
    head_opset = default_opset(head)
    tail = _tail_model(split, head)
    if default_opset(tail) != head_opset:
        from onnx import version_converter

        try:
            tail = version_converter.convert_version(tail, head_opset)
        except Exception as exc:
            raise RankfoldError(f"the nodes kept after the compressed head cannot be brought to its opset "
                                f"{head_opset} by onnx's version converter: {first_line(exc)}") from None
    taken = {o for n in head.graph.node for o in n.output} | {t.name for t in head.graph.initializer} | \
        {n.name for n in head.graph.node if n.name}
    keep = set(split.cut) | {o.name for o in split.outputs} | {i.name for i in split.inputs}
    renamed = {name: TAIL_PREFIX + name for name in
               ({o for n in tail.graph.node for o in n.output} | {t.name for t in tail.graph.initializer})
               if name in taken and name not in keep}
    graph = onnx.GraphProto()
    graph.CopyFrom(head.graph)
    for node in tail.graph.node:
        node.input[:] = [renamed.get(i, i) for i in node.input]
        node.output[:] = [renamed.get(o, o) for o in node.output]
        if node.name in taken:
            node.name = TAIL_PREFIX + node.name
    for tensor in tail.graph.initializer:
        tensor.name = renamed.get(tensor.name, tensor.name)
    graph.node.extend(tail.graph.node)
    graph.initializer.extend(tail.graph.initializer)
    head_inputs = {i.name for i in graph.input}
    graph.input.extend(i for i in split.inputs if i.name not in head_inputs and i.name in
                       {name for n in tail.graph.node for name in _names_read(n)})
    del graph.output[:]
    graph.output.extend(split.outputs)
    imports = {o.domain: o for o in split.opsets}
    imports.update({o.domain: o for o in head.opset_import})
    joined = helper.make_model(graph, opset_imports=list(imports.values()), ir_version=head.ir_version)
    joined.metadata_props.extend(head.metadata_props)
    try:
        onnx.checker.check_model(joined)
    except Exception as exc:
        raise RankfoldError(f"the compressed head and the nodes kept after it do not join into a valid "
                            f"graph: {first_line(exc)}") from None
    return joined


def _tail_model(split: GraphSplit, head: onnx.ModelProto) -> onnx.ModelProto:
    """The tail as a model of its own (inputs: the cut, as the compressed head declares it, and the
    graph inputs it reads), for the version converter."""
    declared = {v.name: v for v in head.graph.output}
    reads = set().union(*(_names_read(n) for n in split.tail))
    inputs = [declared[name] for name in split.cut] + [i for i in split.inputs if i.name in reads]
    made = {o for n in split.tail for o in n.output}
    graph = helper.make_graph(list(split.tail), "tail", inputs, [o for o in split.outputs if o.name in made],
                              initializer=split.tail_initializers)
    return helper.make_model(graph, opset_imports=split.opsets, ir_version=head.ir_version)
