"""Quantization-aware training of the weights the plan quantizes: during training each such weight
is seen through the exporter's own quantizer (symmetric, one scale per output channel, the largest
magnitude on the top code, round to nearest), with straight-through gradients. When training ends
the weights are left on that grid, so the QDQ export (quantizing them again by the same rule,
with no equalization, data-aware rounding or bias correction to move them) holds exactly the
weights that were trained."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from rankfold.quantize.core import weight_qmax
from rankfold.quantize.weights import quantized_leaves


class PerChannelFakeQuant(nn.Module):
    """w -> its per-output-channel symmetric quantization (values), gradients passed straight through."""

    def __init__(self, qmax: int):
        super().__init__()
        self.qmax = qmax

    def forward(self, weight: Tensor) -> Tensor:
        flat = weight.reshape(weight.shape[0], -1)
        scale = flat.detach().abs().amax(dim=1, keepdim=True) / self.qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        on_grid = (torch.clamp(torch.round(flat / scale), -self.qmax, self.qmax) * scale).reshape(weight.shape)
        return weight + (on_grid - weight).detach()


def attach_fake_quant(module: nn.Module, bits: Mapping[str, int], *, reduce_range: bool) -> list[str]:
    """Parametrize, in place, every quantized leaf's weight; returns their names."""
    leaves = quantized_leaves(module, bits)
    modules = dict(module.named_modules())
    for name, b in leaves.items():
        parametrize.register_parametrization(modules[name], "weight", PerChannelFakeQuant(weight_qmax(b, reduce_range)))
    return list(leaves)


def detach_fake_quant(module: nn.Module) -> None:
    """Remove the parametrizations, leaving each weight at its quantized value (on the grid)."""
    for leaf in module.modules():
        if parametrize.is_parametrized(leaf, "weight"):
            parametrize.remove_parametrizations(leaf, "weight", leave_parametrized=True)
