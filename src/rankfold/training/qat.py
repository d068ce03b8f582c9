"""Quantization-aware training of the weights the plan quantizes: during training each such weight
is seen through a per-output-channel symmetric quantizer with straight-through gradients, one of
WEIGHT_STEPS:

- "max-abs": the exporter's own rule, the largest magnitude on the top code;
- "lsq": a learned step size per channel (LSQ, Esser et al. 2020), started at the clipping that
  minimises the channel's squared quantization error and trained with the weights. The step is
  kept at or below the max-abs step, so the largest weight always lands on the top code.

When training ends the weights are left on their grid. Either way the largest magnitude of each
channel is then the top code times the (learned) step, so the QDQ export's max-abs rule, applied
with no equalization, data-aware rounding or bias correction to move the weights, finds exactly
the trained steps and holds exactly the trained weights (to float rounding)."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from rankfold.quantize.core import weight_qmax
from rankfold.quantize.weights import per_tensor_leaves, quantized_leaves


def _rows(weight: Tensor, per_tensor: bool) -> Tensor:
    """The weight as (scales, elements per scale): one row per output channel, or one row."""
    return weight.reshape(1 if per_tensor else weight.shape[0], -1)


class PerChannelFakeQuant(nn.Module):
    """w -> its per-output-channel (or `per_tensor`) symmetric quantization (values), gradients
    passed straight through."""

    def __init__(self, qmax: int, per_tensor: bool = False):
        super().__init__()
        self.qmax, self.per_tensor = qmax, per_tensor

    def forward(self, weight: Tensor) -> Tensor:
        flat = _rows(weight, self.per_tensor)
        scale = flat.detach().abs().amax(dim=1, keepdim=True) / self.qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        on_grid = (torch.clamp(torch.round(flat / scale), -self.qmax, self.qmax) * scale).reshape(weight.shape)
        return weight + (on_grid - weight).detach()


# The smallest learned step, as a fraction of the max-abs step: below it a channel would clip most
# of its weights, which no error-minimising start comes near.
MIN_STEP_RATIO = 0.3


def best_clipping_ratio(flat: Tensor, qmax: int, ratios: Tensor | None = None) -> Tensor:
    """Per row of `flat`, the step (as a fraction of the max-abs step) among `ratios` that gives
    the smallest squared error of round-to-nearest with clipping; (rows, 1)."""
    ratios = torch.linspace(MIN_STEP_RATIO, 1.0, 36) if ratios is None else ratios
    top = flat.abs().amax(dim=1, keepdim=True) / qmax
    top = torch.where(top > 0, top, torch.ones_like(top))
    errors = torch.stack([((torch.clamp(torch.round(flat / (r * top)), -qmax, qmax) * r * top - flat) ** 2).sum(1)
                          for r in ratios], dim=1)
    return ratios[errors.argmin(dim=1)].unsqueeze(1)


class LearnedStepFakeQuant(nn.Module):
    """w -> its per-output-channel symmetric quantization with a learned step (LSQ): the step is
    ratio * max|w| / qmax, ratio in [MIN_STEP_RATIO, 1] learned with the weights; the rounding
    passes gradients straight through, clipped weights get none, and the step gets LSQ's gradient
    (round(w/s) - w/s inside the range, the top code outside)."""

    def __init__(self, qmax: int, weight: Tensor, per_tensor: bool = False):
        super().__init__()
        self.qmax, self.per_tensor = qmax, per_tensor
        self.ratio = nn.Parameter(best_clipping_ratio(_rows(weight.detach(), per_tensor), qmax))

    def step(self, flat: Tensor) -> Tensor:
        top = flat.detach().abs().amax(dim=1, keepdim=True) / self.qmax
        top = torch.where(top > 0, top, torch.ones_like(top))
        return self.ratio.clamp(MIN_STEP_RATIO, 1.0) * top

    def forward(self, weight: Tensor) -> Tensor:
        flat = _rows(weight, self.per_tensor)
        step = self.step(flat)
        clipped = torch.clamp(flat / step, -self.qmax, self.qmax)
        codes = clipped + (torch.round(clipped) - clipped).detach()
        return (codes * step).reshape(weight.shape)


WEIGHT_STEPS = {"max-abs": lambda qmax, _weight, per_tensor: PerChannelFakeQuant(qmax, per_tensor),
                "lsq": LearnedStepFakeQuant}


def attach_fake_quant(module: nn.Module, bits: Mapping[str, int], *, reduce_range: bool,
                      steps: str = "max-abs", per_tensor: Collection[str] = ()) -> list[str]:
    """Parametrize, in place, every quantized leaf's weight through WEIGHT_STEPS[steps] (one step
    per tensor for the leaves of the layers in `per_tensor`); returns their names."""
    make = WEIGHT_STEPS[steps]
    leaves = quantized_leaves(module, bits)
    whole = per_tensor_leaves(module, per_tensor)
    modules = dict(module.named_modules())
    for name, b in leaves.items():
        leaf = modules[name]
        parametrize.register_parametrization(leaf, "weight",
                                             make(weight_qmax(b, reduce_range), leaf.weight, name in whole))
    return list(leaves)


def detach_fake_quant(module: nn.Module) -> None:
    """Remove the parametrizations, leaving each weight at its quantized value (on the grid)."""
    for leaf in module.modules():
        if parametrize.is_parametrized(leaf, "weight"):
            parametrize.remove_parametrizations(leaf, "weight", leave_parametrized=True)
