"""Costs of a layer or of its factorized replacement: parameters, MACs, working activation
memory and latency (modelled from cycles per MAC, or measured in onnxruntime and cached)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from rankfold.io import write_json_atomic
from rankfold.layers import numeric_padding
from rankfold.stats import layer_macs
from rankfold.target import Target


@dataclass(frozen=True)
class SubLayer:
    """One Linear / Conv of a chain, as the latency model and the timing graph need it."""

    kind: str  # conv | pointwise | depthwise | linear
    in_ch: int
    out_ch: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    pads: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    bias: bool
    macs: int


@dataclass(frozen=True)
class ChainProfile:
    params: int
    macs: int
    activations: tuple[int, ...]  # elements of the input, then of each sub-layer's output (one sample)
    sub_layers: tuple[SubLayer, ...]

    def working_elements(self, keep_input: bool = False) -> int:
        """Most elements alive at once while the chain runs: a sub-layer's input and output, plus
        the chain's input throughout when the graph still needs it afterwards (a residual)."""
        acts = self.activations
        held = acts[0] if keep_input else 0
        return max(a + b + (held if k else 0) for k, (a, b) in enumerate(zip(acts, acts[1:])))


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if module.groups > 1 and module.groups == module.in_channels:
        return "depthwise"
    return "pointwise" if all(k == 1 for k in module.kernel_size) else "conv"


def chain_profile(modules: list[nn.Module], input_shape: tuple[int, ...]) -> ChainProfile:
    """Run a zero sample through `modules` in order and record what each costs."""
    x = torch.zeros(1, *input_shape)
    acts, subs, params = [x[0].numel()], [], 0
    with torch.no_grad():
        for module in modules:
            y = module(x)
            macs = layer_macs(module, y)
            params += sum(p.numel() for p in module.parameters())
            if isinstance(module, nn.Linear):
                sub = SubLayer("linear", module.in_features, module.out_features, (), (), (), (), 1,
                               module.bias is not None, macs)
            else:
                pads = numeric_padding(module) or tuple(0 for _ in module.kernel_size)
                sub = SubLayer(_kind(module), module.in_channels, module.out_channels, tuple(module.kernel_size),
                               tuple(module.stride), tuple(pads), tuple(module.dilation), module.groups,
                               module.bias is not None, macs)
            subs.append(sub)
            acts.append(y[0].numel())
            x = y
    return ChainProfile(params, sum(s.macs for s in subs), tuple(acts), tuple(subs))


def modelled_latency_ms(profile: ChainProfile, target: Target) -> float:
    """cycles = sum over sub-layers of MACs * cycles_per_mac[kind] + outputs * cycles_per_output
    + layer_overhead_cycles (the target profile's model, fitted to the C kernels: bench/mcu.py --fit)."""
    cycles = sum(s.macs * target.cycles_per_mac[s.kind] + outputs * target.cycles_per_output
                 + target.layer_overhead_cycles for s, outputs in zip(profile.sub_layers, profile.activations[1:]))
    return 1000.0 * cycles / target.clock_hz


# -- measured latency (host) --------------------------------------------------------------
def _chain_graph(profile: ChainProfile, input_shape: tuple[int, ...]) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    current = "x"
    for i, s in enumerate(profile.sub_layers):
        out = f"y{i}"
        if s.kind == "linear":
            w = rng.standard_normal((s.in_ch, s.out_ch)).astype(np.float32) * 0.05
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [out if not s.bias else f"m{i}"]))
            if s.bias:
                inits.append(numpy_helper.from_array(np.zeros(s.out_ch, np.float32), f"b{i}"))
                nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [out]))
        else:
            w = rng.standard_normal((s.out_ch, s.in_ch // s.groups, *s.kernel)).astype(np.float32) * 0.05
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            inputs = [current, f"w{i}"]
            if s.bias:
                inits.append(numpy_helper.from_array(np.zeros(s.out_ch, np.float32), f"b{i}"))
                inputs.append(f"b{i}")
            nodes.append(helper.make_node("Conv", inputs, [out], kernel_shape=list(s.kernel), strides=list(s.stride),
                                          pads=list(s.pads) * 2, dilations=list(s.dilation), group=s.groups))
        current = out
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, *input_shape])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    # make_model stamps the installed onnx's newest IR (14 with onnx 1.23), which an older
    # onnxruntime refuses to load (1.30 did, on a GPU machine); IR 8 holds opset 17 everywhere.
    model.ir_version = 8
    return model


def time_onnx_ms(model: onnx.ModelProto, input_shape: tuple[int, ...], *, repeats: int = 9) -> float:
    """Median time of one run, onnxruntime CPU, 1 thread; short runs are timed in loops."""
    from rankfold.runtime import timing_sample

    session = _session(model)
    feed = {session.get_inputs()[0].name: timing_sample(session.get_inputs()[0], (1, *input_shape))}
    for _ in range(3):
        session.run(None, feed)
    t0 = time.perf_counter()
    session.run(None, feed)
    single = max(time.perf_counter() - t0, 1e-6)
    loops = max(1, int(0.002 / single))  # each sample spans >= 2 ms so the timer's resolution does not matter
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(loops):
            session.run(None, feed)
        samples.append((time.perf_counter() - t0) / loops)
    return 1000.0 * statistics.median(samples)


def _session(model: onnx.ModelProto):
    from rankfold.runtime import session

    return session(model, threads=1)  # timed on one thread, as the target's latency is modelled


def time_onnx_pair_ms(reference: onnx.ModelProto, candidate: onnx.ModelProto, input_shape: tuple[int, ...],
                      *, rounds: int = 41) -> tuple[float, float]:
    """Median run times of two models, timed in turn so that machine drift hits both alike."""
    sessions = [_session(reference), _session(candidate)]
    from rankfold.runtime import timing_sample

    feeds = [{s.get_inputs()[0].name: timing_sample(s.get_inputs()[0], (1, *input_shape))} for s in sessions]
    for session, feed in zip(sessions, feeds):
        for _ in range(3):
            session.run(None, feed)
    times: list[list[float]] = [[], []]
    for r in range(rounds):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            sessions[i].run(None, feeds[i])
            times[i].append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times[0]), 1000.0 * statistics.median(times[1])


def _machine_key() -> str:
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    return hashlib.sha1(f"{cpu}|{ort.__version__}".encode()).hexdigest()[:12]


class LatencyCache:
    """Measured chain latencies on this machine, kept in a JSON file between runs."""

    def __init__(self, path: str | None = None) -> None:
        default = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "rankfold")
        folder = os.environ.get("RANKFOLD_CACHE_DIR", default)
        self.path = path or os.path.join(folder, f"latency-{_machine_key()}.json")
        self.entries: dict[str, float] = {}
        self.dirty = False
        try:
            with open(self.path) as handle:
                loaded = json.load(handle)
            self.entries = {k: float(v) for k, v in loaded.items()} if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            self.entries = {}
        self.measured = 0

    def latency_ms(self, profile: ChainProfile, input_shape: tuple[int, ...]) -> float:
        key = json.dumps([list(input_shape), [s.__dict__ for s in profile.sub_layers]], sort_keys=True)
        if key not in self.entries:
            self.entries[key] = time_onnx_ms(_chain_graph(profile, input_shape), input_shape)
            self.dirty = True
            self.measured += 1
        return self.entries[key]

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            write_json_atomic(self.path, self.entries)
            self.dirty = False
        except OSError:  # a read-only home must not stop the planner: the cache is an optimisation
            pass
