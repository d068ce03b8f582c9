"""Activations that exporters write as several elementwise nodes, read as the one torch op that
computes the same: hard-swish as Add(x, 3) -> Clip(0, 6) -> Mul(x, .) -> Div(6) (Paddle2ONNX:
PP-OCR, PP-LCNet) or as Mul(x, HardSigmoid(x)) with alpha 1/6 (PyTorch before opset 14), SiLU as
Mul(x, Sigmoid(x)) (YOLOv8), GELU as x * (Erf(x / sqrt 2) + 1) * 0.5 (torch.onnx's BERT
exports, the 0.5 first or last, x / sqrt 2 also written as x * (1 / sqrt 2)), its tanh
approximation 0.5 * x * (1 + Tanh(sqrt(2 / pi) * (x + 0.044715 x^3))) (GPT-2's gelu_new, torch's
gelu(approximate="tanh"); x^3 as Pow or two Muls, or the argument as x * c * (1 + k x^2)) and Mish as
Mul(x, Tanh(Softplus(x))) (YOLOv4-style detectors); and, once those are read, a Mul then an Add
by constants (Paddle2ONNX's affine blocks) as one pass. Every pass over calibration data runs
them (sensitivity, output metrics, fitting, rounding, bias correction, the checks): PP-OCRv4's
detector, 24 hard-swishes on full-size maps, ran a forward pass of 14 pages in 0.80 s as four
nodes each and 0.37 s fused (forward and backward: 1.48 s and 1.04 s). The fused op computes the
same formula, to float32 rounding (GELU's and Mish's torch kernels order it their own way); a
pattern whose intermediate values anything else reads, or the graph returns, is left as it is."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping

import onnx
import torch
from onnx import helper
from torch import Tensor

FUSED_SILU = "Mul:fused-silu"  # x * sigmoid(x), one torch op (frontends/onnx_ops.py)
FUSED_MISH = "Mul:fused-mish"  # x * tanh(softplus(x)) as torch's mish kernel
FUSED_SCALE_SHIFT = "Add:fused-scale-shift"  # x * scale + shift by constants, one pass (torch.addcmul)
# A constant written in float32 from a formula (sqrt 2, 1/6) matches it to this relative tolerance.
CONSTANT_TOLERANCE = 1e-6


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

    def constant(self, value: str) -> Tensor | None:
        """The value of `value` where it is known before conversion (an initializer, a Constant node)."""
        tensor = self.consts.get(value)
        node = self.made.get(value)
        if tensor is None and node is not None and node.op_type == "Constant":
            attribute = next((a for a in node.attribute if a.name == "value"), None)
            tensor = torch.from_numpy(onnx.numpy_helper.to_array(attribute.t).copy()) if attribute else None
        return tensor

    def is_constant(self, value: str, number: float, tolerance: float = 0.0) -> bool:
        """Whether `value` is a known one-element constant equal to `number` (within `tolerance`,
        relative: a float32 sqrt 2 is not the float64 one)."""
        tensor = self.constant(value)
        if tensor is None or tensor.numel() != 1:
            return False
        return abs(float(tensor.reshape(())) - number) <= tolerance * abs(number)

    def other_input(self, node: onnx.NodeProto, number: float, tolerance: float = 0.0) -> str | None:
        """The input of a two-input node whose other input is the constant `number`, or None."""
        if len(node.input) != 2:
            return None
        for value, constant in (node.input, reversed(node.input)):
            if self.is_constant(constant, number, tolerance):
                return value
        return None


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


def _self_gated(graph: _Graph, mul: onnx.NodeProto, chain: tuple[str, ...]) -> list[onnx.NodeProto] | None:
    """The nodes of f in Mul(x, f(x)), f the one-input ops `chain` (the last applied first), or None."""
    if mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx") or len(mul.input) != 2:
        return None
    for x, value in (mul.input, reversed(mul.input)):
        nodes = []
        for op in chain:
            node = graph.producer(value, op)
            if node is None:
                break
            nodes.append(node)
            value = node.input[0]
        else:
            if value == x:
                return nodes
    return None


def _fused(op: str, mul: onnx.NodeProto, nodes: list[onnx.NodeProto]) -> tuple[onnx.NodeProto, list[onnx.NodeProto]]:
    """`op` of the gated input, written where `mul` was, replacing `nodes`."""
    return helper.make_node(op, [nodes[-1].input[0]], list(mul.output), name=mul.name), nodes


def _silu(graph: _Graph, mul: onnx.NodeProto) -> tuple[onnx.NodeProto, list[onnx.NodeProto]] | None:
    """Mul(x, Sigmoid(x)) as x * sigmoid(x) in one op."""
    nodes = _self_gated(graph, mul, ("Sigmoid",))
    return _fused(FUSED_SILU, mul, nodes) if nodes else None


def _hard_sigmoid_swish(graph: _Graph, mul: onnx.NodeProto) -> tuple[onnx.NodeProto, list[onnx.NodeProto]] | None:
    """Mul(x, HardSigmoid(x)) at alpha 1/6 and beta 1/2 as HardSwish(x)."""
    nodes = _self_gated(graph, mul, ("HardSigmoid",))
    attrs = {a.name: a.f for a in nodes[0].attribute} if nodes else {}
    if nodes and abs(attrs.get("alpha", 0.2) - 1 / 6) <= CONSTANT_TOLERANCE and attrs.get("beta", 0.5) == 0.5:
        return _fused("HardSwish", mul, nodes)
    return None


def _mish(graph: _Graph, mul: onnx.NodeProto) -> tuple[onnx.NodeProto, list[onnx.NodeProto]] | None:
    """Mul(x, Tanh(Softplus(x))) in one op."""
    nodes = _self_gated(graph, mul, ("Tanh", "Softplus"))
    return _fused(FUSED_MISH, mul, nodes) if nodes else None


def _erf_gate(graph: _Graph, gate: str, x: str) -> list[onnx.NodeProto] | None:
    """The nodes of Add(Erf(x / sqrt 2), 1) (or x * (1 / sqrt 2)) writing `gate`, or None."""
    add = graph.producer(gate, "Add")
    erf_out = graph.other_input(add, 1.0) if add is not None else None
    erf = graph.producer(erf_out, "Erf") if erf_out is not None else None
    if erf is None:
        return None
    divided = graph.producer(erf.input[0], "Div")
    if divided is not None and divided.input[0] == x and \
            graph.is_constant(divided.input[1], math.sqrt(2.0), CONSTANT_TOLERANCE):
        return [divided, erf, add]
    scaled = graph.producer(erf.input[0], "Mul")
    if scaled is not None and graph.other_input(scaled, math.sqrt(0.5), CONSTANT_TOLERANCE) == x:
        return [scaled, erf, add]
    return None


SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)  # GELU's tanh approximation: tanh(c * (x + k * x^3))
CUBIC = 0.044715


def _cube(graph: _Graph, value: str, x: str) -> list[onnx.NodeProto] | None:
    """The nodes of x^3 writing `value`: Pow(x, 3) or Mul(x, Mul(x, x)), or None."""
    power = graph.producer(value, "Pow")
    if power is not None:
        return [power] if power.input[0] == x and graph.is_constant(power.input[1], 3.0) else None
    mul = graph.producer(value, "Mul")
    if mul is None or len(mul.input) != 2:
        return None
    for first, second in (mul.input, reversed(mul.input)):
        square = graph.producer(second, "Mul")
        if first == x and square is not None and list(square.input) == [x, x]:
            return [square, mul]
    return None


def _scaled_square(graph: _Graph, value: str, x: str) -> list[onnx.NodeProto] | None:
    """The nodes of CUBIC * x^2 writing `value`: Mul(k, Mul(x, x)) or Mul(Mul(x, k), x), or None."""
    outer = graph.producer(value, "Mul")
    if outer is None or len(outer.input) != 2:
        return None
    squared = graph.other_input(outer, CUBIC, CONSTANT_TOLERANCE)
    if squared is not None:
        square = graph.producer(squared, "Mul")
        return [square, outer] if square is not None and list(square.input) == [x, x] else None
    for first, second in (outer.input, reversed(outer.input)):
        scaled = graph.producer(second, "Mul")
        if first == x and scaled is not None and graph.other_input(scaled, CUBIC, CONSTANT_TOLERANCE) == x:
            return [scaled, outer]
    return None


def _tanh_argument(graph: _Graph, value: str, x: str) -> list[onnx.NodeProto] | None:
    """The nodes of c * (x + k * x^3) writing `value` (torch.onnx, GPT-2's gelu_new), or of
    (x * c) * (1 + k * x^2) (Hugging Face's gelu_fast), or None."""
    mul = graph.producer(value, "Mul")
    if mul is None or len(mul.input) != 2:
        return None
    inner = graph.other_input(mul, SQRT_2_OVER_PI, CONSTANT_TOLERANCE)
    add = graph.producer(inner, "Add") if inner is not None else None
    if add is not None and len(add.input) == 2 and x in add.input:
        term = add.input[1] if add.input[0] == x else add.input[0]
        scaled = graph.producer(term, "Mul")
        cubed = graph.other_input(scaled, CUBIC, CONSTANT_TOLERANCE) if scaled is not None else None
        cube = _cube(graph, cubed, x) if cubed is not None else None
        return [*cube, scaled, add, mul] if cube else None
    for left, right in (mul.input, reversed(mul.input)):
        linear = graph.producer(left, "Mul")
        if linear is None or graph.other_input(linear, SQRT_2_OVER_PI, CONSTANT_TOLERANCE) != x:
            continue
        add = graph.producer(right, "Add")
        term = graph.other_input(add, 1.0) if add is not None else None
        square = _scaled_square(graph, term, x) if term is not None else None
        if square:
            return [linear, *square, add, mul]
    return None


def _tanh_gate(graph: _Graph, gate: str, x: str) -> list[onnx.NodeProto] | None:
    """The nodes of Add(Tanh(c * (x + k * x^3)), 1) writing `gate`, or None."""
    add = graph.producer(gate, "Add")
    tanh_out = graph.other_input(add, 1.0) if add is not None else None
    tanh = graph.producer(tanh_out, "Tanh") if tanh_out is not None else None
    argument = _tanh_argument(graph, tanh.input[0], x) if tanh is not None else None
    return [*argument, tanh, add] if argument else None


# GELU's gate (1 + erf(x / sqrt 2), or its tanh approximation) -> the Gelu op's `approximate`
GELU_GATES: dict[str, Callable[[_Graph, str, str], list[onnx.NodeProto] | None]] = {
    "none": _erf_gate, "tanh": _tanh_gate}


def _halved_products(graph: _Graph, mul: onnx.NodeProto) -> Iterator[tuple[str, str, onnx.NodeProto]]:
    """(x, gate, the other node) for every way `mul` may compute x * gate * 0.5: Mul(Mul(x, gate),
    0.5) (torch.onnx), Mul(Mul(x, 0.5), gate) (x halved first) or Mul(x, Mul(gate, 0.5))
    (torch.onnx's dynamo exporter). Which input is x, the gate's pattern decides."""
    product = graph.other_input(mul, 0.5)
    inner = graph.producer(product, "Mul") if product is not None else None
    if inner is not None and len(inner.input) == 2:
        for x, gate in (inner.input, reversed(inner.input)):
            yield x, gate, inner
    for other, halved in (mul.input, reversed(mul.input)):
        half = graph.producer(halved, "Mul")
        kept = graph.other_input(half, 0.5) if half is not None else None
        if kept is not None:
            yield kept, other, half
            yield other, kept, half


def _gelu(graph: _Graph, mul: onnx.NodeProto) -> tuple[onnx.NodeProto, list[onnx.NodeProto]] | None:
    """0.5 * x * gate, the gate 1 + Erf(x / sqrt 2) or 1 + Tanh(sqrt(2 / pi) * (x + 0.044715 x^3)),
    as Gelu(x) (approximate "tanh" for the second)."""
    if mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx") or len(mul.input) != 2:
        return None
    for x, gate, halving in _halved_products(graph, mul):
        for approximate, gate_nodes in GELU_GATES.items():
            parts = gate_nodes(graph, gate, x)
            if parts:
                node = helper.make_node("Gelu", [x], list(mul.output), name=mul.name, approximate=approximate)
                return node, [*parts, halving]
    return None


def _scale_shift(graph: _Graph, add: onnx.NodeProto) -> tuple[onnx.NodeProto, list[onnx.NodeProto]] | None:
    """Add(Mul(x, scale), shift), both float constants, as one pass over x: Paddle2ONNX writes
    PP-LCNetV3's learnable affine blocks so, after every activation (what follows a convolution
    the reader folds into it)."""
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2:
        return None
    for scaled, shift in (add.input, reversed(add.input)):
        mul = graph.producer(scaled, "Mul")
        if mul is None or len(mul.input) != 2 or not _float_constant(graph, shift):
            continue
        for x, scale in (mul.input, reversed(mul.input)):
            if _float_constant(graph, scale) and graph.constant(x) is None:
                return helper.make_node(FUSED_SCALE_SHIFT, [x, scale, shift], list(add.output), name=add.name), [mul]
    return None


def _float_constant(graph: _Graph, value: str) -> bool:
    tensor = graph.constant(value)
    return tensor is not None and tensor.is_floating_point()


# The last node of each pattern -> what recognises it there
Pattern = Callable[[_Graph, onnx.NodeProto], tuple[onnx.NodeProto, list[onnx.NodeProto]] | None]
PATTERNS: list[Pattern] = [_hard_swish, _hard_sigmoid_swish, _silu, _gelu, _mish]
# Read after the activations: a scale and shift inside one of them (GELU's 1 + k x^2) stays theirs.
LATER_PATTERNS: list[Pattern] = [_scale_shift]


def fused_activations(nodes: list[onnx.NodeProto], consts: Mapping[str, Tensor],
                      outputs: set[str]) -> list[onnx.NodeProto]:
    """`nodes` (in topological order) with every pattern of PATTERNS, then of LATER_PATTERNS,
    replaced by its one node, at the place of the pattern's last node."""
    for patterns in (PATTERNS, LATER_PATTERNS):
        nodes = _fused_by(patterns, nodes, consts, outputs)
    return nodes


def _fused_by(patterns: list[Pattern], nodes: list[onnx.NodeProto], consts: Mapping[str, Tensor],
              outputs: set[str]) -> list[onnx.NodeProto]:
    graph = _Graph(nodes, consts, outputs)
    fused: dict[int, onnx.NodeProto] = {}
    dropped: set[int] = set()
    for node in nodes:
        if id(node) in dropped:
            continue
        found = next((hit for pattern in patterns if (hit := pattern(graph, node)) is not None), None)
        if found is not None and not any(id(part) in dropped or id(part) in fused for part in found[1]):
            fused[id(node)] = found[0]
            dropped.update(id(part) for part in found[1])
    return [fused.get(id(node), node) for node in nodes if id(node) not in dropped]
