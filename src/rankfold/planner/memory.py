"""Peak activation memory: which tensors are alive at each step of the graph.

For an ONNX-loaded model every value's lifetime is known from the graph, so residual branches
that stay alive across several layers are counted. While a layer runs, the memory in use is its
`base` (everything else alive at that moment) plus the layer's own working set, the largest
input+output pair of its chain; factorizing changes only the working set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from rankfold.analyze import COMPRESSIBLE, run_hooked


@dataclass
class ActivationProfile:
    base: dict[str, int] = field(default_factory=dict)  # layer -> other elements alive while it runs
    input_kept: dict[str, bool] = field(default_factory=dict)  # layer -> its input is needed after it
    fixed_peak: int = 0  # elements at the busiest non-layer step
    other_elements: int = 0  # elements written by non-layer steps (for the cycles-per-element model)
    graph_wide: bool = True  # False: residual branches not tracked (not an ONNX-loaded model)


def _numel(value) -> int:
    return int(value[0].numel()) if isinstance(value, Tensor) and value.ndim > 0 else 0


def activation_profile(model: nn.Module, example: Tensor) -> ActivationProfile:
    """Element counts for one sample (`example` holds one)."""
    from rankfold.frontends.onnx import OnnxModule

    if isinstance(model, OnnxModule):
        return _graph_profile(model, example)
    return _layer_only_profile(model, example)


def _graph_profile(model, example: Tensor) -> ActivationProfile:
    sizes: dict[str, int] = {name: _numel(example) for name in model.input_names}
    produced: dict[str, int] = {name: -1 for name in model.input_names}

    def observe(index, step, outs):
        for name, value in zip(step.outputs, outs):
            sizes[name] = _numel(value)
            produced[name] = index

    with torch.no_grad():
        model.run_graph(example, observe=observe)
    steps = model.steps
    last_use = {name: index for index, step in enumerate(steps) for name in step.inputs if name in produced}
    for name in model.output_names:
        last_use[name] = len(steps)
    profile = ActivationProfile()
    for index, step in enumerate(steps):
        alive = sum(sizes[v] for v, p in produced.items() if p < index and last_use.get(v, p) >= index)
        written = sum(sizes.get(v, 0) for v in step.outputs)
        if step.module is not None and isinstance(getattr(model, step.module), COMPRESSIBLE):
            own = sizes.get(step.inputs[0], 0) + written
            profile.base[step.module] = alive + written - own
            profile.input_kept[step.module] = last_use.get(step.inputs[0], index) > index
        else:
            profile.fixed_peak = max(profile.fixed_peak, alive + written)
            profile.other_elements += written
    return profile


def _layer_only_profile(model: nn.Module, example: Tensor) -> ActivationProfile:
    """Without a graph: every layer's base is 0 and other modules count their input+output."""
    profile = ActivationProfile(graph_wide=False)
    handles = []

    def hook(module, inputs, output, name):
        if isinstance(module, COMPRESSIBLE):
            profile.base[name] = 0
        elif not list(module.children()) and isinstance(output, Tensor):
            profile.fixed_peak = max(profile.fixed_peak, _numel(inputs[0]) + _numel(output) if inputs else 0)
            profile.other_elements += _numel(output)

    for name, module in model.named_modules():
        handles.append(module.register_forward_hook(lambda m, i, o, n=name: hook(m, i, o, n)))
    run_hooked(model, example, handles)
    return profile
