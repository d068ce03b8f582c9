"""ONNX -> torch.nn.Module: Conv and Gemm/MatMul layers with constant weights become real
nn.Conv1d / nn.Conv2d / nn.Linear submodules named after their ONNX nodes, so every later stage
(calibration, compression, export) serves ONNX models and PyTorch models alike."""

from __future__ import annotations

import heapq
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import Tensor, nn

from rankfold.data import GraphInput
from rankfold.errors import RankfoldError, first_line
from rankfold.evaluate import PACKED_BITS
from rankfold.frontends import (  # noqa: F401 (the op modules register their ops in OPS)
    onnx_contrib,
    onnx_ops_attention,
    onnx_ops_field,
    onnx_ops_signal,
)
from rankfold.frontends.activations import FUSED_SCALE_SHIFT, fused_activations
from rankfold.frontends.onnx_ops import OPS, STRAIGHT_THROUGH, padded_sizes, same_pads, torch_pad_order
from rankfold.frontends.packing import Packing, packed_model
from rankfold.layers import ColumnBlocks
from rankfold.runtime import fixed_batch_of

MIN_OPSET, MAX_OPSET = 11, 25
# Older graphs (the ONNX model zoo's classics are opset 3 to 10) are read after onnx's own version
# converter has rewritten them at MIN_OPSET; below 7 its adapters are incomplete.
MIN_UPGRADABLE_OPSET = 7
UPGRADED_FROM = "rankfold.upgraded_from_opset"  # metadata key: the opset the file itself declares
WIDENED = "rankfold.widened_float16"  # metadata key: a float16 graph read in float32 (its float16 inputs, outputs)
HALF_TYPES = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
RECURRENT_GATES = {"LSTM": 4, "GRU": 3}  # their input projections become Linear layers
INTEGER_LAYER_OPS = {"ConvInteger": "Conv", "MatMulInteger": "MatMul"}  # with constant weights: float layers
# onnxruntime's contrib ops that rankfold reads (domain-qualified, as unsupported_ops names them), as
# the standard nodes onnx_contrib rewrites them into
CONTRIB_OPS = onnx_contrib.supported()
# internal steps (named "op:variant") are not ops a file can hold
SUPPORTED_OPS = sorted({op for op in OPS if ":" not in op} | set(LAYER_OPS) | {"Constant", "If"} | CONTRIB_OPS)
# Ops that move integer codes without arithmetic: as float codes they compute the same values (and
# a nearest Resize: _moves_codes)
CODE_MOVING_OPS = {"Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "MaxPool", "GlobalMaxPool",
                   "Slice", "Split", "Gather", "DepthToSpace", "SpaceToDepth", "Tile", "Expand"}
# Ops of already-quantized graphs: read in float from their integer weights, and said so
QUANTIZED_OPS = ("DynamicQuantizeLSTM", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger", "QLinearConv",
                 "QLinearMatMul", "DequantizeLinear", "QGemm", "QLinearAdd", "QLinearMul", "QLinearConcat",
                 "QLinearSigmoid", "QLinearLeakyRelu", "QLinearGlobalAveragePool", "QLinearAveragePool",
                 "MatMulNBits")


@dataclass
class Step:
    """One graph node at run time: an op from OPS, or a layer submodule."""

    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    module: str | None = None  # attribute name of the layer submodule
    baked: dict[int, Any] = field(default_factory=dict)  # constant inputs: Python ints / lists


# OnnxModule's own attributes: a layer named like one of them is renamed.
OWN_ATTRIBUTES = ("steps", "input_names", "output_names", "buffer_of", "dynamic_axes", "fixed_batch", "size_note",
                  "size_reason", "declared_outputs", "runs_at_batch", "fixed_inputs", "quantized_note", "opset_note",
                  "widened_note", "packing", "output_kinds", "source_path", "given_values")


def symbolic_axes(values) -> dict[str, dict[int, str]]:
    """The axes after the batch that an ONNX graph leaves open (a name, or no size), by value:
    exported again, the compressed model accepts the same shapes as the original."""
    axes: dict[str, dict[int, str]] = {}
    for value in values:
        dims = value.type.tensor_type.shape.dim
        open_axes = {i: d.dim_param or f"{value.name}_dim{i}" for i, d in enumerate(dims)
                     if i > 0 and not d.HasField("dim_value")}
        if open_axes:
            axes[value.name] = open_axes
    return axes


def sizes_fixed_by(original: str, written: str) -> dict[str, list[int]]:
    """The axes after the batch that the file `original` leaves open on an input and the file
    `written` fixes, by input name (what a user's inputs can no longer vary)."""
    def open_axes(path: str) -> dict[str, set[int]]:
        graph = onnx.load(path, load_external_data=False).graph
        constants = {t.name for t in graph.initializer}
        return {name: set(axes) for name, axes in
                symbolic_axes([v for v in graph.input if v.name not in constants]).items()}

    before, after = open_axes(original), open_axes(written)
    fixed = {name: sorted(axes - after.get(name, set())) for name, axes in before.items()}
    return {name: axes for name, axes in fixed.items() if axes}


class OnnxModule(nn.Module):
    """A torch module that runs an ONNX graph; its layers are ordinary submodules."""

    def __init__(self, input_names: list[str], output_names: list[str]) -> None:
        super().__init__()
        self.input_names = input_names
        self.output_names = output_names
        self.steps: list[Step] = []
        self.buffer_of: dict[str, str] = {}  # ONNX value name -> buffer attribute
        self.dynamic_axes: dict[str, dict[int, str]] = {}  # open axes after the batch, kept on export
        self.fixed_batch: int | None = None  # the batch size the graph was exported with, when it is fixed
        # The batch each run of the steps takes: the fixed batch, or None (any) where a probe showed
        # the steps compute each sample alone at any batch (batch_free_steps); the file keeps its batch.
        self.runs_at_batch: int | None = None
        self.size_note: str | None = None  # why open axes after the batch are fixed on export
        self.size_reason: str | None = None  # what the graph computes from its input's size, when it does
        self.declared_outputs: dict[str, list[int | None]] = {}  # the file's output sizes (None: open)
        self.fixed_inputs: list[str] = []  # graph inputs given once: constants of this module and its results
        self.quantized_note: str | None = None  # an already-quantized graph: which integer ops are read in float
        self.opset_note: str | None = None  # an older graph read after onnx's version converter upgraded it
        self.widened_note: str | None = None  # a float16 graph read in float32
        self.packing: Packing | None = None  # inputs read packed as one (rankfold.frontends.packing)
        # The file read, and the values of the inputs given once: a float or weight-only result is
        # written into that file's graph, taking them again (rankfold.export.graft)
        self.source_path: str | None = None
        self.given_values: dict[str, np.ndarray] = {}

    def forward(self, *args: Tensor):
        results = self.outputs_in(self.run_graph(*args))
        return results[0] if len(results) == 1 else tuple(results)

    def outputs_in(self, env: dict[str, Any]) -> list[Tensor]:
        """The graph's outputs among the values `env` holds after the last step."""
        # an output computed as shape arithmetic (Python ints) is returned as the tensor the file gives
        return [env[name] if isinstance(env[name], Tensor) else torch.tensor(env[name], dtype=torch.int64)
                for name in self.output_names]

    def run_graph(self, *args: Tensor, observe: Callable[[int, Step, list], None] | None = None) -> dict[str, Any]:
        """Every value of the graph on `args`; `observe(index, step, outputs)` sees each step run."""
        env = self.start(*args)
        self.advance(env, 0, len(self.steps), observe=observe, keep_all=True)
        return env

    def start(self, *args: Tensor) -> dict[str, Any]:
        """The graph's values before its first step: the inputs and the constants."""
        if len(args) != len(self.input_names):
            raise RankfoldError(f"the model takes {len(self.input_names)} input(s), got {len(args)}")
        env: dict[str, Any] = {"": None}
        env.update(zip(self.input_names, args))
        for value, buffer in self.buffer_of.items():
            env[value] = getattr(self, buffer)
        return env

    def advance(self, env: dict[str, Any], start: int, stop: int, *,
                observe: Callable[[int, Step, list], None] | None = None, keep_all: bool = False) -> None:
        """Run steps [start, stop) on `env`. Unless `keep_all`, a value no later step or output reads
        is dropped once read, so that `env` holds only what the rest of the graph needs."""
        last_read = {} if keep_all else self.last_reads()
        for index in range(start, stop):
            step = self.steps[index]
            vals = on_one_device([step.baked[i] if i in step.baked else env[name]
                                  for i, name in enumerate(step.inputs)])
            if step.module is not None:
                outs = [_run_layer(getattr(self, step.module), vals[0], step.attrs)]
            elif "_layers" in step.attrs:  # an op that calls layers of its own (a recurrence's R)
                outs = OPS[step.op](vals, {**step.attrs, "_modules": [getattr(self, n) for n in step.attrs["_layers"]]})
            else:
                outs = _run_op(step, vals)
            if observe is not None:
                observe(index, step, outs)
            env.update((name, value) for name, value in zip(step.outputs, outs) if name)  # "": not wanted
            for name in step.inputs:
                if last_read.get(name, len(self.steps)) <= index and name in env:
                    del env[name]

    def last_reads(self) -> dict[str, int]:
        """Each value's last reading step; graph outputs and constants are read 'at the end'."""
        last = {name: index for index, step in enumerate(self.steps) for name in step.inputs}
        for name in [*self.output_names, *self.buffer_of, ""]:
            last[name] = len(self.steps)
        return last

    def layer_argument(self, env: dict[str, Any], index: int) -> Tensor:
        """What the layer of step `index` is called with (its input, padded as the step pads it)."""
        step = self.steps[index]
        return _layer_argument(env[step.inputs[0]], step.attrs)


def on_one_device(vals: list) -> list:
    """A step's inputs on one device. Values made from shapes (Range, ConstantOfShape, Python lists)
    are made on the CPU; on a GPU they move beside the data the step also reads."""
    devices = {v.device for v in vals if isinstance(v, Tensor)}
    if len(devices) < 2:
        return vals
    target = next(d for d in devices if d.type != "cpu")
    return [v.to(target) if isinstance(v, Tensor) else v for v in vals]


def _run_op(step: Step, vals: list) -> list:
    """An op's outputs; an op that refuses what it is given (an attribute combination rankfold does
    not compute, such as Resize's cubic mode) ends in one line naming the node, not a traceback."""
    try:
        return OPS[step.op](vals, step.attrs)
    except (ValueError, NotImplementedError) as exc:
        raise RankfoldError(f"the ONNX node that writes {step.outputs[0]!r} ({step.op}) cannot run: "
                            f"{first_line(exc)}") from None


def _layer_argument(x: Tensor, attrs: dict) -> Tensor:
    if "same_pad" in attrs:  # auto_pad SAME_*: padding depends on the input size
        conv = attrs["same_pad"]
        pads = same_pads(padded_sizes(x), conv["kernel"], conv["strides"], conv["dilations"], upper=conv["upper"])
        half = len(pads) // 2
        x = F.pad(x, torch_pad_order(pads[:half], pads[half:]))
    elif "pre_pad" in attrs:
        x = F.pad(x, attrs["pre_pad"])
    if attrs.get("channels_last") and x.dim() == 4 and x.is_floating_point():
        # torch's CPU convolutions run two to five times faster on channels-last maps (PP-OCRv4's
        # recogniser: a forward pass 3.5 s -> 1.8 s, with backward 7.3 s -> 4.8 s on 64 lines);
        # elementwise ops keep the layout, so the copy is made once per run of convolutions.
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _run_layer(layer: nn.Module, x: Tensor, attrs: dict) -> Tensor:
    return layer(_layer_argument(x, attrs))


def load_onnx(path: str | os.PathLike, fixed: Mapping[str, np.ndarray] | None = None,
              probe: Tensor | None = None, packing: Packing | None = None) -> OnnxModule:
    """Read an ONNX file into an OnnxModule (see the module docstring). Raises RankfoldError.

    `fixed`: inputs given once (rankfold.data.graph_data), by name. They become constants, so that
    what depends on them alone folds (an If on the sample rate takes its branch), and the module
    (and every result made from it) takes the other inputs only.

    `probe`: samples of the per-sample input (two or more). An If whose condition is computed from
    shapes alone (Shape -> Gather -> Equal) is then decided on them, at batch 1 and at batch 2; it
    becomes the branch it takes when both agree, and the result keeps the probe's size.

    `packing`: inputs that differ per sample beside each other, read as one packed input
    (rankfold.frontends.packing; `probe` is then packed too)."""
    model = read_onnx(path)
    if packing is not None:
        model = packed_model(model, packing)
    try:
        module = _Converter(model, fixed or {}, probe).convert()
    except RankfoldError:
        raise
    except Exception as exc:  # a malformed graph must end in one clear line, whatever broke
        raise RankfoldError(f"{path}: cannot convert the ONNX graph: {type(exc).__name__}: {first_line(exc)}") from None
    module.packing = packing
    module.source_path = os.path.abspath(os.fspath(path))
    module.given_values = {name: np.asarray(value) for name, value in (fixed or {}).items()}
    if module.fixed_batch is None and probe is not None and len(probe) > 1 and (
            _runs_only_alone(module, probe) or _onnxruntime_runs_only_alone(model, fixed or {}, probe)):
        # The file declares an open batch that its steps do not keep (a shape baked at 1 by the
        # exporter, khmersm's Reshape(x, [48, 1, 3, 192])): onnxruntime fails at 2 samples as well.
        # Or onnxruntime alone fails there: AECMOS's GRU state is given at batch 1, which
        # onnxruntime's GRU does not broadcast (torch's does), and its output Squeeze drops the batch.
        module.fixed_batch = module.runs_at_batch = 1
        module.size_note = ("the graph declares an open batch but runs one sample at a time (a shape or a state "
                            "in it is baked at 1): a traced result declares a batch of 1; one written into "
                            "the file's own graph keeps its declarations")
    if module.fixed_batch == 1 and probe is not None and len(probe) > 1:
        batch_free_steps(module, probe)
    return module


def _onnxruntime_runs_only_alone(model: onnx.ModelProto, fixed: Mapping[str, np.ndarray], probe: Tensor) -> bool:
    """Whether onnxruntime runs the file (its inputs given once bound) on one sample of the probe
    and fails on all of them; False where it runs both or neither (nothing to learn)."""
    from rankfold.runtime import as_declared, session

    try:
        runner = session(bind_inputs(model, fixed))
        declared = runner.get_inputs()[0]
        x = probe.detach().cpu().numpy()
    except Exception:  # noqa: BLE001 - a file onnxruntime cannot load says nothing about its batch
        return False

    def runs(samples: np.ndarray) -> bool:
        try:
            runner.run(None, {declared.name: as_declared(declared, samples)})
            return True
        except Exception:  # noqa: BLE001 - onnxruntime raises its own types for shapes it refuses
            return False

    return not runs(x) and runs(x[:1])


def _runs_only_alone(module: OnnxModule, probe: Tensor) -> bool:
    """Whether the module runs on one sample and fails on the probe's several."""
    with torch.no_grad():
        try:
            module(probe[:1])
        except Exception:  # failing alone too: the load's own check reports it
            return False
        try:
            module(probe)
        except Exception:
            return True
    return False


def batch_free_steps(module: OnnxModule, probe: Tensor) -> bool:
    """Let a graph exported at batch 1 run its steps on many samples at once, where that computes
    exactly what it computes on each sample alone: calibration then runs in batches, not one sample
    at a time (Inception v1 of the ONNX zoo: 10 minutes and more). A Reshape whose constant shape
    leads with the 1 of the batch is read as keeping the batch; `probe` (two samples or more) shows
    that the steps agree, on every output, run together and one by one, with and without that
    reading. Sets module.runs_at_batch to None and says True where they do; changes nothing else."""
    if len(module.input_names) != 1:
        return False
    alone = _one_by_one(module, probe)
    if alone is None:
        return False
    leads = [s for s in module.steps if s.op == "Reshape" and _leads_with_one(module, s)]
    for candidates in ([leads, []] if leads else [[]]):
        for step in candidates:
            step.attrs["batch_lead"] = True
        if _same_outputs(_one_by_one(module, probe), alone) and _same_outputs(_stacked(module, probe, alone), alone):
            module.runs_at_batch = None
            return True
        for step in candidates:
            step.attrs.pop("batch_lead", None)
    return False


def _leads_with_one(module: OnnxModule, step: Step) -> bool:
    """A Reshape to a constant shape that starts with 1 (the batch, where the graph's batch is 1)."""
    shape = step.baked.get(1)
    if shape is None and step.inputs[1] in module.buffer_of:
        shape = getattr(module, module.buffer_of[step.inputs[1]]).tolist()
    return isinstance(shape, list) and len(shape) > 1 and shape[0] == 1 and not step.attrs.get("allowzero", 0)


def _one_by_one(module: OnnxModule, probe: Tensor) -> list[list[Tensor]] | None:
    """Each output on each sample alone; None where the steps cannot run (a Reshape's leading 1
    read as a batch it is not)."""
    try:
        with torch.no_grad():
            parts = [_as_tuple(module(probe[i : i + 1])) for i in range(len(probe))]
    except Exception:
        return None
    return [[p[k] for p in parts] for k in range(len(parts[0]))]


def _stacked(module: OnnxModule, probe: Tensor, alone: list[list[Tensor]]) -> list[list[Tensor]] | None:
    """Each output of one run on all samples, split into samples along its sample axis: where one
    sample's output (in `alone`) has 1 and this run as many as the probe, every other axis equal
    (the batch, or axis 1 of a sequence-first output)."""
    try:
        with torch.no_grad():
            outputs = _as_tuple(module(probe))
    except Exception:  # a shape baked at batch 1 (a state, a constant to concatenate): not batch-free
        return None
    return [_split_samples(v, tuple(parts[0].shape), len(probe)) for v, parts in zip(outputs, alone)]


def _split_samples(value, one: tuple[int, ...], samples: int) -> list:
    shape = tuple(getattr(value, "shape", ()))
    axes = [i for i in range(len(one)) if len(shape) == len(one) and one[i] == 1 and shape[i] == samples
            and shape[:i] + shape[i + 1 :] == one[:i] + one[i + 1 :]]
    return list(value.split(1, axes[0])) if axes else [value]


def _as_tuple(outputs) -> tuple:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def _same_outputs(got: list[list[Tensor]] | None, wanted: list[list[Tensor]] | None) -> bool:
    """The same samples' outputs, equal but for float rounding (a batched convolution sums in
    another order)."""
    from rankfold.export.onnx import relative_error

    if got is None or wanted is None or len(got) != len(wanted):
        return False
    for g_parts, w_parts in zip(got, wanted):
        if len(g_parts) != len(w_parts):
            return False
        for g, w in zip(g_parts, w_parts):
            if not isinstance(g, Tensor) or not isinstance(w, Tensor) or g.shape != w.shape or g.dtype != w.dtype:
                return False
            if not g.is_floating_point() and not torch.equal(g, w):
                return False
            if g.is_floating_point() and relative_error(g.double().cpu().numpy(), w.double().cpu().numpy()) > 1e-4:
                return False
    return True


def read_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Load and check an ONNX file, with one-line errors for every way it can be bad."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise RankfoldError(f"{path}: no such file")
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise RankfoldError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        model = onnx.load_model_from_string(data)
    except Exception:
        raise RankfoldError(f"{path}: not an ONNX model (the file does not parse)") from None
    if not model.HasField("graph") or not model.graph.node:
        raise RankfoldError(f"{path}: not an ONNX model (no graph nodes)")
    try:
        onnx.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
    except Exception as exc:
        raise RankfoldError(f"{path}: external weight data cannot be read: {exc}") from None
    model = _in_topological_order(model)
    try:
        onnx.checker.check_model(as_onnx_checks_it(model))
    except Exception as exc:
        raise RankfoldError(f"{path}: invalid ONNX model: {first_line(exc)}") from None
    return _widened(_upgraded(model, path))


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """The values a node's subgraphs (an If's branches, a Loop's body) read, outer ones among them."""
    names: set[str] = set()
    for attr in node.attribute:
        for graph in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            for inner in graph.node:
                names.update(inner.input)
                names.update(_subgraph_reads(inner))
    return names


def _in_topological_order(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model`, or a copy whose nodes are put in an order where each follows what it reads: tools
    write graphs that are not (onnxruntime's own float16 converter with keep_io_types appends the
    input Casts last) and onnxruntime runs them, so they are read, not refused. A graph with a
    cycle is left as it is (the checker refuses it)."""
    nodes = list(model.graph.node)
    producer = {out: index for index, node in enumerate(nodes) for out in node.output if out}
    needs = [{producer[name] for name in set(node.input) | _subgraph_reads(node) if name in producer} - {index}
             for index, node in enumerate(nodes)]
    if all(max(deps, default=-1) < index for index, deps in enumerate(needs)):
        return model
    readers: dict[int, list[int]] = {}
    for index, deps in enumerate(needs):
        for dep in deps:
            readers.setdefault(dep, []).append(index)
    waiting = [len(deps) for deps in needs]
    ready = [index for index, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)  # the file's own order wherever it is free to be kept
    order: list[int] = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for reader in readers.get(index, []):
            waiting[reader] -= 1
            if waiting[reader] == 0:
                heapq.heappush(ready, reader)
    if len(order) < len(nodes):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.node[:]
    copy.graph.node.extend(nodes[index] for index in order)
    return copy


# onnxruntime's own ops that its optimizer writes in the default domain (LLaMA's RMS norm), which
# onnx's checker does not know
ONNXRUNTIME_DEFAULT_DOMAIN_OPS = {"SimplifiedLayerNormalization"}


def as_onnx_checks_it(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model`, or a copy with onnxruntime's default-domain ops moved to its own domain (which the
    checker leaves alone), so that files onnxruntime wrote and runs are not refused as invalid."""
    if not any(n.op_type in ONNXRUNTIME_DEFAULT_DOMAIN_OPS and n.domain in ("", "ai.onnx") for n in model.graph.node):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if node.op_type in ONNXRUNTIME_DEFAULT_DOMAIN_OPS and node.domain in ("", "ai.onnx"):
            node.domain = "com.microsoft"
    if not any(o.domain == "com.microsoft" for o in copy.opset_import):
        copy.opset_import.add(domain="com.microsoft", version=1)
    return copy


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _upgraded(model: onnx.ModelProto, path: str) -> onnx.ModelProto:
    """`model` as it is, or rewritten at MIN_OPSET by onnx's version converter when it is older
    (the file itself is not touched); the metadata then keeps the opset the file declares."""
    opset = default_opset(model)
    if not MIN_UPGRADABLE_OPSET <= opset < MIN_OPSET:
        return model
    from onnx import version_converter

    try:
        upgraded = version_converter.convert_version(model, MIN_OPSET)
        onnx.checker.check_model(upgraded)
    except Exception as exc:
        raise RankfoldError(f"{path}: ONNX opset {opset} could not be upgraded to {MIN_OPSET} by onnx's version "
                            f"converter ({first_line(exc)}); re-export the model at opset {MIN_OPSET} to "
                            f"{MAX_OPSET}") from None
    upgraded.metadata_props.add(key=UPGRADED_FROM, value=str(opset))
    return upgraded


def _widened(model: onnx.ModelProto) -> onnx.ModelProto:
    """A graph that computes in float16 (or bfloat16), rewritten in memory to compute in float32:
    its weights and constants widened, its casts to half made casts to float32, its half inputs
    and outputs declared float32 (the metadata names them). Everything after reading (calibration,
    planning, quantization, export) then sees an ordinary float32 graph; the file is not touched."""
    graphs = [model.graph]
    for graph in graphs:  # subgraphs (If branches) too
        graphs += [a.g for node in graph.node for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
    halves = [i.name for i in [*model.graph.input, *model.graph.output] if i.type.tensor_type.elem_type in HALF_TYPES]
    found = bool(halves)
    for graph in graphs:
        for index, tensor in enumerate(graph.initializer):
            if tensor.data_type in HALF_TYPES:
                graph.initializer[index].CopyFrom(_float32_tensor(tensor))
                found = True
        for value in [*graph.input, *graph.output, *graph.value_info]:
            if value.type.tensor_type.elem_type in HALF_TYPES:
                value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        for node in graph.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in HALF_TYPES:
                    a.t.CopyFrom(_float32_tensor(a.t))
                    found = True
                elif a.name in ("to", "dtype") and a.type == onnx.AttributeProto.INT and a.i in HALF_TYPES:
                    a.i = onnx.TensorProto.FLOAT
                    found = True
    if found:
        model.metadata_props.add(key=WIDENED, value=", ".join(halves))
    return model


def _float32_tensor(tensor: onnx.TensorProto) -> onnx.TensorProto:
    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)


def _module_name(raw: str, taken: set[str]) -> str:
    name = re.sub(r"\W+", "_", raw).strip("_") or "node"
    if name[0].isdigit():
        name = "n_" + name
    base, i = name, 1
    while name in taken or hasattr(nn.Module, name) or name in OWN_ATTRIBUTES:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    for a in node.attribute:
        value = onnx.helper.get_attribute_value(a)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, onnx.TensorProto):
            value = _tensor_of(value)
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode() for v in value]
        attrs[a.name] = value
    return attrs


def _tensor_of(t: onnx.TensorProto) -> Tensor:
    """An ONNX tensor as torch; int4 / uint4 (numpy's ml_dtypes, which torch does not take) as int8 / uint8."""
    array = numpy_helper.to_array(t)
    if t.data_type in PACKED_BITS:
        array = array.astype(np.int8 if t.data_type == onnx.TensorProto.INT4 else np.uint8)
    return torch.from_numpy(array.copy())


def _check_tensor_size(t: onnx.TensorProto) -> None:
    count = int(np.prod(t.dims)) if len(t.dims) else 1
    if any(d < 0 for d in t.dims) or count > 2**31:
        raise RankfoldError(f"initializer {t.name!r} has impossible dims {list(t.dims)}")
    if t.raw_data:
        if t.data_type in PACKED_BITS:  # int4 / uint4: two values a byte
            expected = -(-count * PACKED_BITS[t.data_type] // 8)
        else:
            expected = count * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        if len(t.raw_data) != expected:
            raise RankfoldError(f"initializer {t.name!r}: {len(t.raw_data)} bytes for dims {list(t.dims)}")


def bind_inputs(model: onnx.ModelProto, fixed: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `model` whose inputs given once are initializers: onnxruntime then runs it on the
    per-sample input alone, as rankfold's results are run (and folds what depends on them). A value
    given with size 1 on the axis the graph names like the per-sample input's batch (a recurrent
    state (2, 1, 128) for [2, batch, 128]) is expanded to the batch, as onnxruntime's LSTM wants."""
    bound = onnx.ModelProto()
    bound.CopyFrom(model)
    sample = next((v for v in bound.graph.input if v.name not in fixed
                   and v.name not in {i.name for i in bound.graph.initializer}), None)
    kept = [value for value in bound.graph.input if value.name not in fixed]
    declared = {value.name: value for value in bound.graph.input}
    del bound.graph.input[:]
    bound.graph.input.extend(kept)
    batch_name = _batch_name(sample)
    nodes = []
    for name, value in fixed.items():
        value = np.asarray(value)
        axes = [axis for axis, dim in enumerate(declared[name].type.tensor_type.shape.dim)
                if not dim.HasField("dim_value") and dim.dim_param == batch_name and value.shape[axis] == 1]
        if sample is None or batch_name is None or not axes:
            bound.graph.initializer.append(numpy_helper.from_array(value, name))
            continue
        nodes += _expanded_to_batch(name, value, axes[0], sample.name, bound.graph.initializer)
    for node in reversed(nodes):
        bound.graph.node.insert(0, node)
    return bound


def onnxruntime_disagreement(path: str | os.PathLike, module: nn.Module, x: Tensor,
                             fixed: Mapping[str, np.ndarray] | None = None) -> tuple[str, float] | None:
    """(output, relative error) of the output where `module` (the file as rankfold reads it) is
    farthest from onnxruntime's run of the file itself on the samples `x` (float outputs; an error
    on the scale of the output, or of a near-zero one's unit noise floor); None where onnxruntime
    cannot run the file as given (nothing to compare with)."""
    from rankfold.export.onnx import relative_error
    from rankfold.runtime import optimized_is_faithful, run_batched, session

    # Where onnxruntime's fused int8 kernels saturate on this CPU (x86 without VNNI), an already
    # quantized file is compared with onnxruntime's reference arithmetic (each node as written),
    # which is what the file computes; the fused kernels' error is not the conversion's.
    try:
        original = onnx.load(os.fspath(path))
        if getattr(module, "packing", None) is not None:
            original = packed_model(original, module.packing)
        declared = {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
                    for v in original.graph.input}
        bound = bind_inputs(original, {name: np.asarray(value).astype(declared.get(name, np.asarray(value).dtype))
                                       for name, value in (fixed or {}).items()})
        runner = session(bound, optimized=optimized_is_faithful(original))
        sample = next(i.name for i in runner.get_inputs())
        expected = run_batched(runner, None, sample, x.detach().cpu().numpy())
    except Exception:  # a file onnxruntime cannot run as given: the conversion has no reference here
        return None
    step = getattr(module, "runs_at_batch", None) or len(x)  # a graph fixed at batch 1 runs sample by sample
    with torch.no_grad():
        parts = [module(x[i : i + step]) for i in range(0, len(x), step)]
    parts = [p if isinstance(p, tuple) else (p,) for p in parts]
    got = tuple(torch.cat([p[k] for p in parts]) if parts[0][k].ndim else parts[0][k] for k in range(len(parts[0])))
    worst: tuple[str, float] | None = None
    for name, mine, theirs in zip(getattr(module, "output_names", []), got, expected):
        if not isinstance(mine, Tensor) or not np.issubdtype(theirs.dtype, np.floating) or mine.shape != theirs.shape:
            continue
        error = relative_error(mine.detach().double().cpu().numpy(), theirs.astype(np.float64))
        if worst is None or error > worst[1]:
            worst = (name, error)
    return worst


def _batch_name(value) -> str | None:
    """The name the per-sample input gives its batch axis ('' when open and unnamed), else None."""
    dims = value.type.tensor_type.shape.dim if value is not None else []
    return dims[0].dim_param if dims and not dims[0].HasField("dim_value") else None


def _expanded_to_batch(name: str, value: np.ndarray, axis: int, sample: str, initializers) -> list:
    """Nodes that make `name` from `value` with `axis` expanded to the batch of input `sample`."""
    stem = f"rankfold_bound_{name}"
    before, after = np.array(value.shape[:axis], np.int64), np.array(value.shape[axis + 1:], np.int64)
    initializers.extend([numpy_helper.from_array(value, f"{stem}_value"),
                         numpy_helper.from_array(before, f"{stem}_before"),
                         numpy_helper.from_array(after, f"{stem}_after"),
                         numpy_helper.from_array(np.array([0], np.int64), f"{stem}_first")])
    return [onnx.helper.make_node("Shape", [sample], [f"{stem}_dims"]),
            onnx.helper.make_node("Gather", [f"{stem}_dims", f"{stem}_first"], [f"{stem}_batch"], axis=0),
            onnx.helper.make_node("Concat", [f"{stem}_before", f"{stem}_batch", f"{stem}_after"], [f"{stem}_shape"],
                                  axis=0),
            onnx.helper.make_node("Expand", [f"{stem}_value", f"{stem}_shape"], [name])]


def graph_inputs(model: onnx.ModelProto) -> list[GraphInput]:
    """The inputs a graph is called with (initializers excluded), as declared."""
    inits = {i.name for i in model.graph.initializer}
    found = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor.shape.dim]
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        except Exception:
            dtype = np.dtype(np.float32)
        symbols = tuple(d.dim_param or None for d in tensor.shape.dim)
        found.append(GraphInput(value.name, dims, dtype, symbols))
    return found


class _Converter:
    def __init__(self, model: onnx.ModelProto, fixed: Mapping[str, np.ndarray] | None = None,
                 probe: Tensor | None = None) -> None:
        self.probe = probe
        self.shape_only: set[str] = set()  # values computed from shapes (and constants) alone
        self.model = model
        self._ranks: dict[str, int] | None = None  # value -> rank, inferred on first use (_rank)
        self.graph = model.graph
        self.opset = default_opset(model)
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise RankfoldError(f"ONNX opset {self.opset} is not supported (supported: {MIN_UPGRADABLE_OPSET} to "
                                f"{MAX_OPSET}; below {MIN_OPSET} through onnx's version converter)")
        self.consts: dict[str, Tensor] = {}
        for t in self.graph.initializer:
            _check_tensor_size(t)
            self.consts[t.name] = _tensor_of(t)
        for name, value in (fixed or {}).items():
            self.consts[name] = torch.from_numpy(np.ascontiguousarray(value))
        inputs = [i.name for i in self.graph.input if i.name not in self.consts]
        if not inputs:
            raise RankfoldError("the ONNX graph has no inputs")
        self.module = OnnxModule(inputs, [o.name for o in self.graph.output])
        self.module.fixed_inputs = sorted(fixed or {})
        self.module.declared_outputs = {value.name: [d.dim_value if d.HasField("dim_value") else None
                                                     for d in value.type.tensor_type.shape.dim]
                                        for value in self.graph.output}
        declared = {p.key: p.value for p in model.metadata_props}.get(UPGRADED_FROM)
        if declared:
            self.module.opset_note = (f"the file's ONNX opset {declared} was read as opset {self.opset} "
                                      "(onnx's version converter, in memory; the file is not changed)")
        halves = {p.key: p.value for p in model.metadata_props}.get(WIDENED)
        if halves is not None:
            self.module.widened_note = (
                "float16 weights read in float32: the result computes in float32"
                + (f" and takes and returns float32 where the file has float16 ({halves})" if halves else "")
                + "; byte budgets are of the bytes the file holds")
        found = {op: sum(n.op_type == op for n in self.graph.node) for op in QUANTIZED_OPS}
        if any(found.values()):
            listed = ", ".join(f"{op} x{count}" for op, count in found.items() if count)
            self.module.quantized_note = (f"already quantized ({listed}): computed in float from the integer weights, "
                                          "then compressed and quantized again like a float graph")
        graph_inputs = [i for i in self.graph.input if i.name in inputs]
        self.module.dynamic_axes = symbolic_axes(graph_inputs + list(self.graph.output))
        self.module.fixed_batch = self.module.runs_at_batch = fixed_batch_of(graph_inputs)
        # Sizes computed from the input stay open only where the written file computes at other
        # sizes as the model does (checked by the export, which fixes the others)
        self.module.size_reason = _size_dependence(self.graph.node) if self.module.dynamic_axes else None
        self.taken: set[str] = set()
        # onnxruntime's fused and quantized ops as the standard nodes they compute (onnx_contrib)
        self.nodes, added = onnx_contrib.standard_nodes(list(self.graph.node), self.consts,
                                                        set(self.module.output_names))
        self.consts.update(added)
        # activations written as several elementwise nodes, as the one torch op (activations.py)
        self.nodes = fused_activations(self.nodes, self.consts, set(self.module.output_names))
        self.shared_layers: dict[tuple, str] = {}  # (op, weight inputs, attributes) -> the layer built for them
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.graph_outputs = set(self.module.output_names)
        self.alias: dict[str, str] = {}  # value name -> the name that carries it after a fold
        self.absorbed: set[int] = set()  # ids of nodes folded into a layer

    def convert(self) -> OnnxModule:
        _refuse_unsupported(self.graph.node)
        for node in self.nodes:
            if id(node) in self.absorbed:
                continue
            self._node(node)
        known = set(self.module.input_names) | set(self.consts) | {o for s in self.module.steps for o in s.outputs}
        for name in self.module.output_names:
            if name in self.alias:
                self._rename_output(name)
            elif name not in known:
                raise RankfoldError(f"graph output {name!r} is produced by no node")
        for name in self.module.output_names:
            if name in self.consts and not any(name in s.outputs for s in self.module.steps):
                self.module.steps.append(Step("Identity", [name], [name]))
                self._need_buffer(name)
        _tie_tables_to_heads(self.module)
        kinds = tuple(e or d for e, d in zip(embedding_outputs(self.graph),
                                             decoder_outputs(self.graph, set(self.module.fixed_inputs))))
        if any(kinds):  # the self-check, the planner and distillation read these as declared
            self.module.output_kinds = kinds
        return self.module.eval()

    # -- helpers --------------------------------------------------------------------------
    def _name(self, value: str) -> str:
        while value in self.alias:
            value = self.alias[value]
        return value

    def _rename_output(self, name: str) -> None:
        source = self._name(name)
        self.module.steps.append(Step("Identity", [source], [name]))

    def _need_buffer(self, value: str) -> None:
        if value not in self.module.buffer_of:
            buffer = _module_name("const_" + value, self.taken)
            self.module.register_buffer(buffer, self.consts[value])
            self.module.buffer_of[value] = buffer

    def _sole_consumer(self, value: str) -> onnx.NodeProto | None:
        users = self.consumers.get(value, [])
        if len(users) == 1 and value not in self.graph_outputs:
            return users[0]
        return None

    def _node(self, node: onnx.NodeProto) -> None:
        where = f"node {node.name or node.output[0]!r}"
        attrs = _attributes(node)
        attrs["_opset"], attrs["_op"], attrs["_outputs"] = self.opset, node.op_type, len(node.output)
        inputs = [self._name(i) if i else "" for i in node.input]
        if node.op_type == "Constant":
            self.consts[node.output[0]] = _constant_value(attrs, where)
            return
        if node.op_type == "If":
            self._inline_branch(node, inputs, where)
            return
        if node.op_type in INTEGER_LAYER_OPS and self._integer_layer(node, inputs):
            return
        if node.op_type in LAYER_OPS and self._layer(node, inputs, attrs, where):
            return
        if node.op_type == "Gather" and self._table(node, inputs, attrs):
            return
        if node.op_type in RECURRENT_GATES and self._recurrent(node, inputs, attrs):
            return
        if inputs and all(i == "" or i in self.consts for i in inputs) and node.op_type != "Shape":
            self._fold(node, inputs, attrs, where)
            return
        step = Step(node.op_type, inputs, list(node.output), attrs)
        if node.op_type == "QuantizeLinear" and self._read_dequantized(node.output[0]):
            # a QDQ pair: its codes stay float and its rounding passes gradients straight through, so
            # the planner sees the layers before it (integer codes cut the gradient: all looked free)
            step.op = STRAIGHT_THROUGH
        if node.op_type in ("Shape", "Size") or all(i == "" or i in self.consts or i in self.shape_only
                                                     for i in inputs):
            self.shape_only.update(node.output)
        for index, name in enumerate(inputs):
            if name in self.consts:
                value = self.consts[name]
                if value.dtype == torch.int64 and value.ndim <= 1:
                    # small integer constants feed shape arithmetic as Python values
                    step.baked[index] = value.item() if value.ndim == 0 else value.tolist()
                else:  # weights, and the integer tensors of already-quantized graphs
                    self._need_buffer(name)
        self.module.steps.append(step)

    def _read_dequantized(self, value: str) -> bool:
        """Whether `value` (integer codes) reaches only DequantizeLinear nodes, directly or through ops
        that move values without arithmetic (a Flatten before onnxruntime's QGemm, a MaxPool on codes):
        float codes then compute the same everywhere."""
        users = self.consumers.get(value, [])
        return bool(users) and value not in self.graph_outputs and all(
            u.op_type == "DequantizeLinear"
            or _moves_codes(u) and all(self._read_dequantized(out) for out in u.output if out)
            for u in users)

    def _inline_branch(self, node, inputs, where) -> None:
        """An If whose condition folds to a constant is the branch it takes, inlined."""
        if inputs[0] in self.consts:
            condition = bool(self.consts[inputs[0]].reshape(-1)[0])
        else:
            condition = self._condition_from_shapes(inputs[0], where)
        taken = "then_branch" if condition else "else_branch"
        branch = next(a.g for a in node.attribute if a.name == taken)
        _refuse_unsupported(branch.node)
        for t in branch.initializer:
            _check_tensor_size(t)
            self.consts[t.name] = _tensor_of(t)
        for sub in branch.node:
            for name in sub.input:
                self.consumers.setdefault(name, []).append(sub)
            self._node(sub)
        for outer, inner in zip(node.output, branch.output):
            if inner.name in self.consts:
                self.consts[outer] = self.consts[self._name(inner.name)]
            else:
                self.alias[outer] = inner.name

    def _condition_from_shapes(self, value: str, where: str) -> bool:
        """An If condition computed from shapes alone, decided on the probe at batch 1 and 2."""
        if value not in self.shape_only or self.probe is None or len(self.probe) < 2:
            raise RankfoldError(f"If whose condition depends on the input is not supported ({where}); only "
                                "conditions that fold to a constant, or that shapes alone decide (given --calib)")
        if len(self.module.input_names) != 1:
            raise RankfoldError(f"If on shapes ({where}) is decided on one per-sample input; the graph has "
                                f"{len(self.module.input_names)} ({', '.join(self.module.input_names)})")
        outcomes = set()
        with torch.no_grad():
            for batch in (self.probe[:1], self.probe[:2]):
                env = self.module.start(batch)
                self.module.advance(env, 0, len(self.module.steps), keep_all=True)
                outcomes.add(bool(torch.as_tensor(env[value]).reshape(-1)[0]))
        if len(outcomes) > 1:
            raise RankfoldError(f"If whose condition depends on the batch size is not supported ({where})")
        self.module.dynamic_axes = {}  # decided at the probe's size: the result keeps it
        self.module.size_note = (f"an If on shapes ({where}) was decided at the calibration samples' size: the "
                                 "result takes inputs of that size only")
        return outcomes.pop()

    def _fold(self, node, inputs, attrs, where) -> None:
        """A node whose inputs are all constants is computed once, here."""
        vals = [None if i == "" else self.consts[i] for i in inputs]
        try:
            outs = OPS[node.op_type](vals, attrs)
        except Exception as exc:
            raise RankfoldError(f"{node.op_type} ({where}) on constant inputs failed: {exc}") from None
        for name, value in zip(node.output, outs):
            self.consts[name] = value if isinstance(value, Tensor) else torch.tensor(value, dtype=torch.int64)

    # -- layers ---------------------------------------------------------------------------
    def _layer(self, node, inputs, attrs, where) -> bool:
        builder = {"Conv": self._conv, "ConvTranspose": self._conv_transpose, "Gemm": self._gemm,
                   "MatMul": self._matmul}[node.op_type]
        built = builder(node, inputs, attrs, where)
        if built is None:
            return False
        layer, out_name, extra = built
        # Nodes that read the same weights (an LSTM unrolled into a Gemm per time step, a detector's
        # head shared by its pyramid levels) call one layer: compressed once, stored once.
        key = (node.op_type, tuple(inputs[1:]), tuple(sorted((k, repr(v)) for k, v in attrs.items())))
        name = self.shared_layers.get(key)
        if name is None:
            name = _module_name(node.name or node.output[0], self.taken)
            self.module.add_module(name, layer)
            self.shared_layers[key] = name
        self.module.steps.append(Step(node.op_type, [inputs[0]], [out_name], extra, module=name))
        return True

    def _table(self, node, inputs, attrs) -> bool:
        """A Gather of rows of a constant table (a word or position embedding) is a table layer
        (GatheredTable): priced and quantized like a language model's embedding. Integer codes
        count too (a weight-only file gathers its rows' codes, then scales them): they are exact
        in float. A small table, or one another node reads too (an LM head tied to it), stays a
        constant."""
        if len(inputs) != 2 or inputs[0] not in self.consts or inputs[1] in self.consts or attrs.get("axis", 0) != 0:
            return False
        table = self.consts[inputs[0]]
        exact = table.dtype.is_floating_point or table.dtype in (torch.int8, torch.uint8, torch.int16)
        if table.ndim != 2 or not exact or table.shape[0] < MIN_TABLE_ROWS or \
                len(self.consumers.get(node.input[0], [])) != 1:
            return False
        layer = GatheredTable(*table.shape)
        with torch.no_grad():
            layer.weight.copy_(table.float())
        name = _module_name(node.name or node.output[0], self.taken)
        self.module.add_module(name, layer)
        self.module.steps.append(Step("Gather", [inputs[1]], [node.output[0]], {}, module=name))
        return True

    def _integer_layer(self, node, inputs) -> bool:
        """ConvInteger / MatMulInteger with constant integer weights as the float layer that computes
        the same integers: Conv (MatMul) of (x_q - x_zero) with (W - W_zero) as float weights, so an
        already-quantized graph's convolutions are layers (counted, planned, quantized again), and
        the scales the graph multiplies by afterwards apply as before (exact below 2^24)."""
        padded = list(inputs) + [""] * (4 - len(inputs))
        x_q, w_name, x_zero, w_zero = padded[:4]
        if x_q in self.consts or w_name not in self.consts or (w_zero and w_zero not in self.consts):
            return False
        w = self.consts[w_name].float()
        if node.op_type == "ConvInteger" and w.ndim < 3 or node.op_type == "MatMulInteger" and w.ndim != 2:
            return False
        if w_zero:
            zero = self.consts[w_zero].float()  # a scalar, or one per output channel (Conv axis 0, MatMul axis 1)
            w = w - (zero.reshape(-1, *[1] * (w.ndim - 1)) if node.op_type == "ConvInteger" and zero.numel() > 1
                     else zero)
        stem = node.name or node.output[0]
        self.consts[f"{stem}:weight"] = w
        x = f"{stem}:x"
        self._node(onnx.helper.make_node("Cast", [x_q], [x], name=f"{stem}:cast", to=onnx.TensorProto.FLOAT))
        if x_zero:
            self._node(onnx.helper.make_node("Cast", [x_zero], [f"{stem}:x_zero"], name=f"{stem}:cast_zero",
                                             to=onnx.TensorProto.FLOAT))
            self._node(onnx.helper.make_node("Sub", [x, f"{stem}:x_zero"], [f"{stem}:x_centred"], name=f"{stem}:sub"))
            x = f"{stem}:x_centred"
        layer = onnx.NodeProto()
        layer.CopyFrom(node)
        layer.op_type, layer.domain = INTEGER_LAYER_OPS[node.op_type], ""
        del layer.input[:]
        layer.input.extend([x, f"{stem}:weight"])
        self._node(layer)
        return True


    def _recurrent(self, node, inputs, attrs) -> bool:
        """An LSTM or GRU with constant weights: its input projection x W^T (+ the biases that add to
        it) becomes a Linear layer, counted, priced, factorized and quantized like any other, and the
        recurrence an op on that layer's output (LSTMProjected / GRUProjected). The recurrent
        weights R of each direction become a Linear layer too (h R^T, no bias), which the recurrence
        calls at every step: counted, priced and quantized like the others."""
        padded = list(inputs) + [""] * (8 - len(inputs))
        x, w_name, r_name, b_name = padded[:4]
        if x in self.consts or w_name not in self.consts or r_name not in self.consts or \
                (b_name and b_name not in self.consts):
            return False
        gates = RECURRENT_GATES[node.op_type]
        w = self.consts[w_name].float()  # (directions, gates * hidden, inputs)
        directions, rows, width = w.shape
        bias = self.consts[b_name].float() if b_name else torch.zeros(directions, 2 * rows)
        input_bias, recurrent_bias = bias[:, :rows], bias[:, rows:]
        layer = _linear(w.reshape(directions * rows, width),
                        (input_bias + recurrent_bias if gates == 4 else input_bias).reshape(-1))
        name = _module_name((node.name or node.output[0]) + "_input", self.taken)
        self.module.add_module(name, layer)
        projected = f"{name}:projected"
        self.module.steps.append(Step("MatMul", [x], [projected], {}, module=name))
        recurrent = self.consts[r_name].float()  # (directions, gates * hidden, hidden)
        layers = []
        for d in range(directions):
            suffix = "_recurrent" if d == 0 else "_recurrent_reverse"
            layers.append(_module_name((node.name or node.output[0]) + suffix, self.taken))
            self.module.add_module(layers[-1], _linear(recurrent[d], None))
        attrs = {**attrs, "_layers": layers, "hidden_size": recurrent.shape[-1]}
        rest = padded[2:]
        rest[0] = ""  # R: in the layers
        if gates == 4:
            rest[1] = ""  # both biases are in the layer
        else:  # the GRU's recurrent bias acts inside its reset gate: it stays with the recurrence
            rest[1] = f"{name}:recurrent_bias"
            self.consts[rest[1]] = recurrent_bias.contiguous()
        step = Step(node.op_type + "Projected", [projected, "", *rest], list(node.output), attrs)
        for value in rest:
            if value in self.consts:
                self._need_buffer(value)
        self.module.steps.append(step)
        return True

    def _conv(self, node, inputs, attrs, where):
        if len(inputs) < 2 or inputs[1] not in self.consts:
            raise RankfoldError(f"Conv with a non-constant weight is not supported ({where})")
        weight = self.consts[inputs[1]].float()
        nd = weight.ndim - 2
        if nd not in (1, 2):
            raise RankfoldError(f"Conv{nd}d is not supported, only 1-D and 2-D convolutions ({where})")
        bias = self.consts.get(inputs[2]) if len(inputs) > 2 and inputs[2] else None
        if len(inputs) > 2 and inputs[2] and bias is None:
            raise RankfoldError(f"Conv with a non-constant bias is not supported ({where})")
        kernel = list(attrs.get("kernel_shape", weight.shape[2:]))
        strides = list(attrs.get("strides", [1] * nd))
        dilations = list(attrs.get("dilations", [1] * nd))
        pads = list(attrs.get("pads", [0] * 2 * nd))
        groups = attrs.get("group", 1)
        extra: dict[str, Any] = {"channels_last": nd == 2}
        auto_pad = attrs.get("auto_pad", "NOTSET")
        padding = pads[:nd]
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            extra["same_pad"] = {"kernel": kernel, "strides": strides, "dilations": dilations,
                                 "upper": auto_pad == "SAME_UPPER"}
            padding = [0] * nd
        elif auto_pad == "VALID":
            padding = [0] * nd
        elif pads[:nd] != pads[nd:]:
            extra["pre_pad"] = torch_pad_order(pads[:nd], pads[nd:])
            padding = [0] * nd
        out_name = node.output[0]
        weight, bias, out_name = self._fold_batch_norm(out_name, weight, bias)
        weight, bias, out_name = self._fold_channel_affine(out_name, weight, bias)
        conv_cls = nn.Conv1d if nd == 1 else nn.Conv2d
        layer = conv_cls(weight.shape[1] * groups, weight.shape[0], kernel, stride=strides, padding=padding,
                         dilation=dilations, groups=groups, bias=bias is not None)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias.float())
        return layer, out_name, extra

    def _conv_transpose(self, node, inputs, attrs, where):
        """A 1-D or 2-D ConvTranspose with constant weights: an nn.ConvTranspose submodule, so its
        weights are counted, quantized and reported like every other layer's."""
        if len(inputs) < 2 or inputs[1] not in self.consts:
            return None  # run as an op on whatever feeds it
        weight = self.consts[inputs[1]].float()
        nd = weight.ndim - 2
        bias = self.consts.get(inputs[2]) if len(inputs) > 2 and inputs[2] else None
        if nd not in (1, 2) or (len(inputs) > 2 and inputs[2] and bias is None):
            return None
        if "output_shape" in attrs or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return None
        pads = list(attrs.get("pads", [0] * 2 * nd))
        if pads[:nd] != pads[nd:]:
            return None
        groups = attrs.get("group", 1)
        cls = nn.ConvTranspose1d if nd == 1 else nn.ConvTranspose2d
        layer = cls(weight.shape[0], weight.shape[1] * groups, list(weight.shape[2:]),
                    stride=list(attrs.get("strides", [1] * nd)), padding=pads[:nd],
                    output_padding=list(attrs.get("output_padding", [0] * nd)), groups=groups,
                    dilation=list(attrs.get("dilations", [1] * nd)), bias=bias is not None)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias.float())
        return layer, node.output[0], {}

    def _fold_batch_norm(self, out_name: str, weight: Tensor, bias: Tensor | None):
        """Fold a BatchNormalization that alone consumes the conv's output into the conv."""
        bn = self._sole_consumer(out_name)
        if bn is None or bn.op_type != "BatchNormalization" or len(bn.output) > 1:
            return weight, bias, out_name
        params = [self.consts.get(i) for i in bn.input[1:5]]
        if any(p is None for p in params) or _attributes(bn).get("training_mode", 0):
            return weight, bias, out_name
        scale, shift, mean, var = (p.double() for p in params)
        eps = _attributes(bn).get("epsilon", 1e-5)
        factor = scale / torch.sqrt(var + eps)
        new_weight = (weight.double() * factor.reshape(-1, *[1] * (weight.ndim - 1))).float()
        base = bias.double() if bias is not None else torch.zeros_like(mean)
        new_bias = ((base - mean) * factor + shift).float()
        self.absorbed.add(id(bn))
        return new_weight, new_bias, bn.output[0]

    def _fold_channel_affine(self, out_name: str, weight: Tensor, bias: Tensor | None):
        """Fold a Mul and an Add by constants per output channel that alone read the conv's output
        into the conv: Paddle2ONNX writes PP-LCNetV3's learnable affine blocks (PP-OCRv4's
        recogniser: 28 of them) and some exporters a conv's bias so. Each was a pass over the map in
        every run on calibration data, and stays one in the written file unless folded."""
        for _ in range(2):  # a Mul then an Add, or the two as one (activations.FUSED_SCALE_SHIFT)
            node = self._sole_consumer(out_name)
            affine = self._channel_affine(node, out_name, weight) if node is not None else None
            if affine is None:
                break
            scale, shift = affine
            if scale is not None:
                weight = (weight.double() * scale.reshape(-1, *[1] * (weight.ndim - 1))).float()
                bias = None if bias is None else (bias.double() * scale).float()
            if shift is not None:
                bias = (shift if bias is None else bias.double() + shift).float()
            out_name = node.output[0]
            self.absorbed.add(id(node))
        return weight, bias, out_name

    def _channel_affine(self, node: onnx.NodeProto, value: str, weight: Tensor
                        ) -> tuple[Tensor | None, Tensor | None] | None:
        """(scale, shift) per output channel that `node` applies to the conv's output `value` (a
        Mul's, an Add's, both of a fused Mul-then-Add; None for the other); None where it is not
        per channel."""
        def per_channel(name: str) -> Tensor | None:
            return _per_channel(self.consts.get(self._name(name)), weight.shape[0], weight.ndim)

        if node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == FUSED_SCALE_SHIFT and node.input[0] == value:
            scale, shift = per_channel(node.input[1]), per_channel(node.input[2])
            return None if scale is None or shift is None else (scale, shift)
        others = [i for i in node.input if i != value]
        if node.op_type not in ("Mul", "Add") or len(node.input) != 2 or len(others) != 1:
            return None
        factor = per_channel(others[0])
        if factor is None:
            return None
        return (factor, None) if node.op_type == "Mul" else (None, factor)

    def _gemm(self, node, inputs, attrs, where):
        if attrs.get("transA", 0) or len(inputs) < 2 or inputs[1] not in self.consts or inputs[0] in self.consts:
            return None
        b = self.consts[inputs[1]].float()
        if b.ndim != 2:
            return None
        weight = attrs.get("alpha", 1.0) * (b if attrs.get("transB", 0) else b.T)
        bias = None
        if len(inputs) > 2 and inputs[2]:
            c = self.consts.get(inputs[2])
            if c is None or c.numel() not in (1, weight.shape[0]):
                return None
            bias = (attrs.get("beta", 1.0) * c.float()).reshape(-1).expand(weight.shape[0])
        return _linear(weight, bias), node.output[0], {}

    def _matmul(self, node, inputs, attrs, where):
        if len(inputs) < 2 or inputs[1] not in self.consts or inputs[0] in self.consts:
            return None
        b = self.consts[inputs[1]].float()
        if b.ndim != 2:
            return None
        out_name, bias = node.output[0], None
        add = self._sole_consumer(out_name)
        if add is not None and add.op_type == "Add":
            other = [i for i in add.input if i != out_name]
            c = self.consts.get(self._name(other[0])) if len(other) == 1 else None
            if c is not None and c.numel() == b.shape[1] and c.shape[-1:] == (b.shape[1],) and c.ndim <= 1:
                bias, out_name = c.float(), add.output[0]
                self.absorbed.add(id(add))
        layer = _linear(b.T, bias)
        widths = self._column_blocks(out_name, layer.out_features)
        return (_split_columns(layer, widths) if widths else layer), out_name, {}

    def _column_blocks(self, value: str, width: int) -> list[int] | None:
        """The widths of the column blocks that the readers of a layer's output take apart, when
        they read nothing else of it: GroupQueryAttention's packed q, k, v (onnx_contrib unpacks
        them). Factorized together, q, k and v share one basis: SmolLM2 as onnxruntime-genai
        writes it lost x1.120 in perplexity at a tenth fewer block parameters, x1.058 where its
        Hugging Face directory has them apart."""
        readers = self.consumers.get(value, [])
        if value in self.graph_outputs or not readers:
            return None
        if len(readers) == 1 and readers[0].op_type == "Split" and readers[0].input[0] == value:
            return self._split_widths(readers[0], value, width)
        if not all(r.op_type == "GroupQueryAttention:unpack" for r in readers):
            return None
        attrs = _attributes(readers[0])
        heads, kv_heads = int(attrs["num_heads"]), int(attrs["kv_num_heads"])
        size, rest = divmod(width, heads + 2 * kv_heads)
        if rest or sorted(int(_attributes(r)["part"]) for r in readers) != [0, 1, 2]:
            return None
        return [heads * size, kv_heads * size, kv_heads * size]

    def _split_widths(self, split: onnx.NodeProto, value: str, width: int) -> list[int] | None:
        """The widths of the blocks a Split takes a layer's output apart into along its last axis:
        GPT-2's c_attn as torch.onnx exports it (q, k and v from one MatMul, then Split), a gated
        unit's gate and up projections packed in one."""
        attrs = _attributes(split)
        axis = attrs.get("axis", 0)
        if axis != -1 and axis != self._rank(value) - 1:
            return None
        if len(split.input) > 1 and split.input[1]:
            given = self._constant(split.input[1])
            sizes = None if given is None else [int(v) for v in given.reshape(-1)]
        elif "split" in attrs:
            sizes = [int(v) for v in attrs["split"]]
        else:  # equal parts, the last one smaller where the width does not divide
            parts = int(attrs.get("num_outputs") or len(split.output))
            chunk = -(-width // parts)
            sizes = [min(chunk, width - chunk * i) for i in range(parts)]
        if not sizes or len(sizes) < 2 or sum(sizes) != width or min(sizes) <= 0:
            return None
        return sizes

    def _constant(self, value: str) -> Tensor | None:
        """A constant's value ahead of the node order: an initializer, or a Constant node's value
        (torch.onnx writes a Split's sizes as a Constant node after the MatMul it splits)."""
        known = self.consts.get(self._name(value))
        if known is not None:
            return known
        node = next((n for n in self.graph.node if n.op_type == "Constant" and value in n.output), None)
        found = _attributes(node).get("value") if node is not None else None
        return found if isinstance(found, Tensor) else None

    def _rank(self, value: str) -> int:
        """The rank ONNX's shape inference gives `value` (0 where it gives none): inferred once."""
        if self._ranks is None:
            inferred = onnx.shape_inference.infer_shapes(self.model).graph
            self._ranks = {v.name: len(v.type.tensor_type.shape.dim)
                           for v in [*inferred.value_info, *inferred.input, *inferred.output]
                           if v.type.tensor_type.HasField("shape")}
        return self._ranks.get(value, 0)


# A Gather of a constant table with fewer rows (token types, a small lookup) stays a constant.
MIN_TABLE_ROWS = 16


def _per_channel(value: Tensor | None, channels: int, rank: int) -> Tensor | None:
    """A constant that broadcasts over a conv's output (rank `rank`) one number per channel, as
    (channels,) float64; None for anything else (a map, a wider rank, a non-finite number)."""
    if value is None or not value.is_floating_point() or value.ndim > rank or not torch.isfinite(value).all():
        return None
    full = value.reshape((1,) * (rank - value.ndim) + tuple(value.shape))
    if any(size != 1 for axis, size in enumerate(full.shape) if axis != 1) or full.shape[1] not in (1, channels):
        return None
    return full.reshape(-1).double().expand(channels).clone()


def _tie_tables_to_heads(module: nn.Module) -> None:
    """A table and a Linear layer that hold the same matrix (a language model's LM head, whose
    transpose the graph gathers the token embeddings from) share one parameter, as the tied
    weights of the model it was exported from did: the planner then keeps the tie (the head is
    left alone, the table priced with it) and the result stores the matrix once, not twice."""
    linears: dict[tuple, list[nn.Linear]] = {}
    for layer in module.modules():
        if type(layer) is nn.Linear:
            linears.setdefault(tuple(layer.weight.shape), []).append(layer)
    for table in (m for m in module.modules() if isinstance(m, GatheredTable)):
        for linear in linears.get(tuple(table.weight.shape), []):
            if torch.equal(linear.weight, table.weight):
                linear.weight = table.weight
                break


class GatheredTable(nn.Embedding):
    """An ONNX Gather of a constant table's rows: an embedding whose negative indices count from
    the end, as ONNX's do."""

    def forward(self, ids: Tensor) -> Tensor:
        ids = ids.long()
        return super().forward(torch.where(ids < 0, ids + self.num_embeddings, ids))


# Ops between a value and the norm it is divided by (F.normalize: ReduceL2 -> Clip -> Expand -> Div)
_NORM_PATH = {"Clip", "Max", "Add", "Expand", "Unsqueeze", "Reshape", "Cast", "Sqrt", "Identity", "ReduceL2",
              "ReduceSum", "ReduceSumSquare", "Mul", "Pow", "Reciprocal"}


def embedding_outputs(graph: onnx.GraphProto) -> tuple[str | None, ...]:
    """"embedding" for each graph output that is a vector the data cannot tell from class scores:
    one the graph divides by its own L2 norm (LpNormalization p=2, a Div or Mul by a ReduceL2 or
    Sqrt(ReduceSum(x * x)) of it, as sentence and face encoders end), a 2-D output a
    BatchNormalization makes (ArcFace's and MobileFaceNet's face embeddings end so; a classifier's
    scores come from a Gemm or a softmax), or a 2-D output named as one ("sentence_embedding",
    "image_embeds"). None for the others: their kind is read from the data."""
    producer = {out: node for node in graph.node for out in node.output}

    def through_passthrough(name: str, ops: tuple[str, ...] = ("Identity", "Cast")) -> onnx.NodeProto | None:
        node = producer.get(name)
        while node is not None and node.op_type in ops and node.input[0] in producer:
            node = producer[node.input[0]]
        return node

    def norm_of(name: str, depth: int = 6) -> bool:
        node = producer.get(name)
        if node is None or depth == 0 or node.op_type not in _NORM_PATH:
            return False
        if node.op_type in ("ReduceL2", "Sqrt"):
            return True
        return any(norm_of(i, depth - 1) for i in node.input if i)

    kinds: list[str | None] = []
    for value in graph.output:
        dims = value.type.tensor_type.shape.dim if value.type.tensor_type.HasField("shape") else None
        node = through_passthrough(value.name)
        p = next((a.i for a in node.attribute if a.name == "p"), 2) if node is not None else 0
        normalized = node is not None and (
            (node.op_type == "LpNormalization" and p == 2)
            or (node.op_type == "Div" and norm_of(node.input[1]))
            or (node.op_type == "Mul" and any(producer.get(i) is not None and producer[i].op_type in
                                              ("Reciprocal", "Div") and norm_of(producer[i].input[-1])
                                              for i in node.input)))
        named = "embed" in value.name.lower() and (dims is None or len(dims) == 2)
        reshaped = through_passthrough(value.name, ("Identity", "Cast", "Flatten", "Reshape", "Squeeze"))
        batch_normed = dims is not None and len(dims) == 2 and reshaped is not None and \
            reshaped.op_type == "BatchNormalization"
        kinds.append("embedding" if normalized or named or batch_normed else None)
    return tuple(kinds)


CAUSAL_MARKS = {"GroupQueryAttention": ("causal", 1), "Attention": ("is_causal", 0),
                "MultiHeadAttention": ("unidirectional", 0)}


def decoder_outputs(graph: onnx.GraphProto, fixed: set[str]) -> tuple[str | None, ...]:
    """A causal language model's outputs, by kind: "next_token" for its logits, a 3-D output
    (batch, tokens, vocabulary) whose first two axes are those of the token ids (the one integer
    input that differs per sample, named like ids), in a graph that attends causally (an attention
    marked causal or unidirectional, a Trilu mask, or past key / value inputs), so the self-check
    compares perplexity on the ids and the planner the token KL; "cache" for its present keys and
    values, which the logits judge (the result's own queries read them: their distance to the
    original's caches says nothing of its quality). None elsewhere, and for other graphs."""
    none = (None,) * len(graph.output)
    inits = {i.name for i in graph.initializer}
    varying = [v for v in graph.input if v.name not in inits and v.name not in fixed]
    if len(varying) != 1 or "ids" not in varying[0].name.lower():
        return none
    ids = varying[0].type.tensor_type
    if ids.elem_type not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) or len(ids.shape.dim) != 2:
        return none

    def axes(dims) -> list:
        return [d.dim_param or d.dim_value or None for d in dims]

    def causal(node: onnx.NodeProto) -> bool:
        mark = CAUSAL_MARKS.get(node.op_type)
        value = next((a.i for a in node.attribute if mark and a.name == mark[0]), mark[1] if mark else 0)
        return node.op_type == "Trilu" or bool(value)

    if not (any(causal(node) for node in graph.node) or any("past" in v.name.lower() for v in graph.input)):
        return none
    token_axes = axes(ids.shape.dim)
    kinds: list[str | None] = []
    for value in graph.output:
        dims = value.type.tensor_type.shape.dim
        logits = len(dims) == 3 and axes(dims)[:2] == token_axes and None not in token_axes and dims[2].dim_value > 1
        cache = "present" in value.name.lower() and len(dims) in (3, 4)
        kinds.append("next_token" if logits else "cache" if cache else None)
    return tuple(kinds) if "next_token" in kinds else none


def _size_dependence(nodes) -> str | None:
    """Why the graph's results depend on its input's size beyond the batch, when they do: a Shape
    read, or padding that follows the input size (auto_pad SAME)."""
    for node in nodes:
        if node.op_type == "Shape":
            return f"Shape node {node.name or node.output[0]!r}"
        for a in node.attribute:
            if a.name == "auto_pad" and onnx.helper.get_attribute_value(a) in (b"SAME_UPPER", b"SAME_LOWER"):
                return f"{node.op_type} node {node.name or node.output[0]!r} pads by the input size (auto_pad SAME)"
    return None


def _moves_codes(node: onnx.NodeProto) -> bool:
    """Whether `node` only moves integer codes (a QOperator file upsamples its codes by a nearest Resize)."""
    if node.op_type == "Resize":
        mode = next((a.s for a in node.attribute if a.name == "mode"), b"nearest")
        return mode == b"nearest"
    return node.op_type in CODE_MOVING_OPS


def qualified_op(node: onnx.NodeProto) -> str:
    """A node's op as SUPPORTED_OPS names it: the default domain's bare, others domain-qualified."""
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def unsupported_ops(nodes) -> dict[str, int]:
    """Every op of `nodes` that the converter cannot run, with how often it occurs."""
    counts: dict[str, int] = {}
    for node in nodes:
        name = qualified_op(node)
        if name not in SUPPORTED_OPS:
            counts[name] = counts.get(name, 0) + 1
    return counts


def _refuse_unsupported(nodes) -> None:
    """One error naming every unsupported op of the graph and its count, before any work, so a
    user sees at once how far the graph is from loading."""
    counts = unsupported_ops(nodes)
    if not counts:
        return
    first = next(n for n in nodes if qualified_op(n) in counts)
    listed = ", ".join(f"{op} x{count}" for op, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    plural = "s" if len(counts) > 1 else ""
    raise RankfoldError(
        f"unsupported ONNX op{plural}: {listed} (first at node {first.name or first.output[0]!r}); "
        f"supported: {', '.join(SUPPORTED_OPS)}")


def _split_columns(layer: nn.Linear, widths: list[int]) -> ColumnBlocks:
    """`layer` as one Linear per block of its output columns (ColumnBlocks)."""
    weights, biases = layer.weight.detach().split(widths), \
        (layer.bias.detach().split(widths) if layer.bias is not None else [None] * len(widths))
    return ColumnBlocks(*(_linear(w, b) for w, b in zip(weights, biases)))


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _constant_value(attrs: dict, where: str) -> Tensor:
    if "value" in attrs:
        return attrs["value"]
    for key, dtype in (("value_float", torch.float32), ("value_int", torch.int64),
                       ("value_floats", torch.float32), ("value_ints", torch.int64)):
        if key in attrs:
            return torch.tensor(attrs[key], dtype=dtype)
    raise RankfoldError(f"Constant without a supported value attribute ({where})")


__all__ = ["OnnxModule", "load_onnx", "read_onnx", "SUPPORTED_OPS"]
