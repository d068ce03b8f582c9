"""Whole-network latency on a measured target: layers timed alone miss what the network adds
(weights out of cache, Add/Relu/pooling), so whole networks timed in onnxruntime calibrate the sum
of layer latencies into a network latency, and a chosen plan can be timed itself."""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable, Mapping

from torch import Tensor, nn

from rankfold.analyze import set_submodule
from rankfold.methods import method_named
from rankfold.planner.costs import time_onnx_ms, time_onnx_pair_ms
from rankfold.planner.options import Option


def onnx_of(model: nn.Module, example: Tensor, onnx_path: str | None = None):
    """The model as an ONNX proto: its own file when given and it takes the module's one input,
    else exported (for timing only; timing feeds one input, and a graph with inputs given once or
    packed takes others)."""
    import onnx

    from rankfold.export.onnx import export_onnx

    if onnx_path is not None and not getattr(model, "fixed_inputs", None) and getattr(model, "packing", None) is None:
        return onnx.load(onnx_path)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        export_onnx(model, path, example_input=example, verify=False)
        return onnx.load(path)


def timing_variant(model: nn.Module, modules: dict, choice: Mapping[str, Option]) -> nn.Module:
    """`model` with each layer replaced as `choice` says (random weights: for timing only)."""
    variant = copy.deepcopy(model)
    for name, option in choice.items():
        if option.method != "none":
            set_submodule(variant, name, method_named(option.method).skeleton(modules[name], option.ranks))
    return variant


class WholeNetworkTiming:
    """whole = fixed_ms + scale * (sum of the layers' own latencies), from two whole networks timed
    at both ends of the range: every layer kept, and every layer at its cheapest option."""

    def __init__(self, model: nn.Module, example: Tensor, options: Mapping[str, list[Option]],
                 onnx_path: str | None, say: Callable[[str], None]) -> None:
        say("timing the whole network in onnxruntime, as it is and at its cheapest options")
        self.model, self.example, self.modules = model, example, dict(model.named_modules())
        self.original_onnx = onnx_of(model, example, onnx_path)
        self.whole_ms = time_onnx_ms(self.original_onnx, tuple(example.shape[1:]), repeats=15)
        kept_sum = sum(layer_options[0].latency_ms for layer_options in options.values())
        cheapest = {n: min(layer_options, key=lambda o: o.latency_ms) for n, layer_options in options.items()}
        cheap_sum = sum(o.latency_ms for o in cheapest.values())
        cheap_whole = self.measure(cheapest)
        self.scale = 1.0
        if kept_sum - cheap_sum > 1e-3 * kept_sum:
            self.scale = max(0.1, (self.whole_ms - cheap_whole) / (kept_sum - cheap_sum))
        self.fixed_ms = self.whole_ms - self.scale * kept_sum

    def measure(self, choice: Mapping[str, Option]) -> float:
        """The network built as `choice` says, timed in turn with the original (drift cancels in
        the ratio) and scaled to the original's latency measured at the start."""
        candidate = onnx_of(timing_variant(self.model, self.modules, choice), self.example)
        reference_ms, candidate_ms = time_onnx_pair_ms(self.original_onnx, candidate, tuple(self.example.shape[1:]))
        return self.whole_ms * candidate_ms / reference_ms
