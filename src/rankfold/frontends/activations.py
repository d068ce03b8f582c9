"""Activations that exporters write as several elementwise nodes, read as the one torch op that
computes the same: hard-swish as Add(x, 3) -> Clip(0, 6) -> Mul(x, .) -> Div(6) (Paddle2ONNX:
PP-OCR, PP-LCNet), SiLU as Mul(x, Sigmoid(x)) (YOLOv8). Every pass over calibration data runs
them (sensitivity, output metrics, fitting, rounding, bias correction, the checks): PP-OCRv4's
detector, 24 hard-swishes on full-size maps, ran a forward pass of 14 pages in 0.80 s as four
nodes each and 0.37 s fused (forward and backward: 1.48 s and 1.04 s). The fused op computes the
same formula in the same order; a pattern whose intermediate values anything else reads, or the
graph returns, is left as it is."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import onnx
import torch
from onnx import helper
from torch import Tensor

FUSED_SILU = "Mul:fused-silu"  # x * sigmoid(x), one torch op (frontends/onnx_ops.py)


class _Graph:
    """The nodes' producers and readers, and the constants known before conversion."""

    def __init__(self, nodes: list[onnx.NodeProto], consts: Mapping[str, Tensor], outputs: set[str]) -> None:
        self.made = {out: node for node in nodes for out in node.output}
        self.readers: dict[str, int] = {}
        for node in nodes:
            for name in node.input:
                self.readers[name] = self.readers.get(name, 0) + 1
        self.consts, self.outputs = consts, outputs

    def producer(self, value: str, op: str) -> onnx.NodeProto | None:
        """The `op` node that writes `value`, where nothing else reads `value` and the graph does not
        return it (so that the pattern's intermediate values may go)."""
        node = self.made.get(value)
        if node is None or node.op_type != op or node.domain not in ("", "ai.onnx"):
            return None
        return node if self.readers.get(value, 0) == 1 and value not in self.outputs else None

    def is_constant(self, value: str, number: float) -> bool:
        tensor = self.consts.get(value)
        node = self.made.get(value)
        if tensor is None and node is not None and node.op_type == "Constant":
            attribute = next((a for a in node.attribute if a.name == "value"), None)
            tensor = torch.from_numpy(onnx.numpy_helper.to_array(attribute.t).copy()) if attribute else None
        return tensor is not None and tensor.numel() == 1 and float(tensor.reshape(())) == number


def _clip_bounds(graph: _Graph, clip: onnx.NodeProto) -> bool:
    """Whether the Clip bounds its input to [0, 6]: inputs from opset 11, attributes before."""
    if len(clip.input) >= 3:
        return graph.is_constant(clip.input[1], 0.0) and graph.is_constant(clip.input[2], 6.0)
    bounds = {a.name: a.f for a in clip.attribute}
    return bounds.get("min") == 0.0 and bounds.get("max") == 6.0


def _hard_swish(graph: _Graph, div: onnx.NodeProto) -> tuple[onnx.NodeProto, list[onnx.NodeProto]] | None:
    """Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6) as HardSwish(x), with the nodes it replaces."""
    if div.op_type != "Div" or not graph.is_constant(div.input[1], 6.0):
        return None
    mul = graph.producer(div.input[0], "Mul")
    if mul is None:
        return None
    for x, clipped in (mul.input, reversed(mul.input)):
        clip = graph.producer(clipped, "Clip")
        add = graph.producer(clip.input[0], "Add") if clip is not None and _clip_bounds(graph, clip) else None
        if add is not None and x in add.input:
            three = add.input[1] if add.input[0] == x else add.input[0]
            if graph.is_constant(three, 3.0):
                return helper.make_node("HardSwish", [x], list(div.output), name=div.name), [add, clip, mul]
    return None


def _silu(graph: _Graph, mul: onnx.NodeProto) -> tuple[onnx.NodeProto, list[onnx.NodeProto]] | None:
    """Mul(x, Sigmoid(x)) as x * sigmoid(x) in one op."""
    if mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx"):
        return None
    for x, gate in (mul.input, reversed(mul.input)):
        sigmoid = graph.producer(gate, "Sigmoid")
        if sigmoid is not None and sigmoid.input[0] == x:
            return helper.make_node(FUSED_SILU, [x], list(mul.output), name=mul.name), [sigmoid]
    return None


# The last node of each pattern -> what recognises it there
PATTERNS: list[Callable[[_Graph, onnx.NodeProto], tuple[onnx.NodeProto, list[onnx.NodeProto]] | None]] = [
    _hard_swish, _silu]


def fused_activations(nodes: list[onnx.NodeProto], consts: Mapping[str, Tensor],
                      outputs: set[str]) -> list[onnx.NodeProto]:
    """`nodes` (in topological order) with every pattern of PATTERNS replaced by its one node, at
    the place of the pattern's last node."""
    graph = _Graph(nodes, consts, outputs)
    fused: dict[int, onnx.NodeProto] = {}
    dropped: set[int] = set()
    for node in nodes:
        if id(node) in dropped:
            continue
        found = next((hit for pattern in PATTERNS if (hit := pattern(graph, node)) is not None), None)
        if found is not None and not any(id(part) in dropped or id(part) in fused for part in found[1]):
            fused[id(node)] = found[0]
            dropped.update(id(part) for part in found[1])
    return [fused.get(id(node), node) for node in nodes if id(node) not in dropped]
