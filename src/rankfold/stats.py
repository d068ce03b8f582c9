"""One definition of each size number: parameters, MACs and weight bytes, per layer and in total."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class LayerCost:
    name: str
    kind: str
    params: int
    macs: int  # multiply-accumulates for one input sample
    weight_bytes: int  # bytes of the parameters at their stored dtype


@dataclass
class ModelCost:
    layers: list[LayerCost] = field(default_factory=list)
    params: int = 0
    macs: int = 0
    weight_bytes: int = 0

    def to_dict(self) -> dict:
        return {
            "params": self.params,
            "macs": self.macs,
            "weight_bytes": self.weight_bytes,
            "layers": [layer.__dict__ for layer in self.layers],
        }


def layer_macs(module: nn.Module, output: Tensor) -> int:
    """MACs of one sample through a Linear / ConvNd layer, given its (batched) output."""
    per_sample_out = output[0].numel() if output.ndim > 1 else output.numel()
    if isinstance(module, nn.Linear):
        return per_sample_out * module.in_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        taps = int(torch.Size(module.kernel_size).numel())
        return per_sample_out * (module.in_channels // module.groups) * taps
    return 0


def model_cost(model: nn.Module, example_input: Tensor) -> ModelCost:
    """Per-layer and total parameters, MACs (one sample) and weight bytes of `model`.

    Totals count every parameter and buffer-free weight of the model, not only conv/linear ones.
    """
    macs: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            def hook(mod, _inp, out, name=name):
                macs[name] = macs.get(name, 0) + layer_macs(mod, out)

            handles.append(module.register_forward_hook(hook))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example_input[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    cost = ModelCost()
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        params = sum(p.numel() for p in own)
        nbytes = sum(p.numel() * p.element_size() for p in own)
        cost.layers.append(LayerCost(name, type(module).__name__, params, macs.get(name, 0), nbytes))
    cost.params = sum(p.numel() for p in model.parameters())
    cost.weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cost.macs = sum(macs.values())
    return cost
