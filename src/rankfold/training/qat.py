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

from rankfold.quantize.core import ACT_QMAX, ACT_QMIN, ActivationParams, weight_qmax
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
    # On the weights' device: the pick below indexes the ratios with a tensor made there (a GPU).
    ratios = (torch.linspace(MIN_STEP_RATIO, 1.0, 36) if ratios is None else ratios).to(flat.device)
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


# Learned activation steps: the int8 step of each quantized layer's input, as a multiple of the
# calibrated step, kept within these bounds (a step 4x off the calibrated range clips or wastes
# most of the 256 levels; nothing useful lies beyond).
ACTIVATION_RATIO_RANGE = (0.25, 4.0)


class LearnedActivationQuant(nn.Module):
    """x -> its asymmetric int8 quantization (values) with a learned step (LSQ) and the calibrated
    zero point: step = ratio * calibrated step, the ratio learned from 1. Rounding passes gradients
    straight through, clipped inputs get none, the step gets LSQ's gradient."""

    def __init__(self, calibrated: ActivationParams):
        super().__init__()
        self.calibrated_step, self.zero_point = float(calibrated.scale), int(calibrated.zero_point)
        self.ratio = nn.Parameter(torch.ones(()))

    def step(self) -> Tensor:
        return self.calibrated_step * self.ratio.clamp(*ACTIVATION_RATIO_RANGE)

    def forward(self, x: Tensor) -> Tensor:
        step = self.step()
        level = torch.clamp(x / step + self.zero_point, ACT_QMIN, ACT_QMAX)
        codes = level + (torch.round(level) - level).detach()
        return (codes - self.zero_point) * step

    def params(self) -> ActivationParams:
        return ActivationParams(float(self.step().detach()), self.zero_point)


ACTIVATION_STEPS = ("calibrated", "lsq")  # how QAT treats activation steps (FinetuneConfig.activation_steps)
# The submodule of each reading layer that holds its input's quantizer while training (on the layer,
# not the network: a Sequential network would run an added child as a step).
_INPUT_QUANT = "rankfold_input_step"


def attach_activation_quant(module: nn.Module, leaves: Collection[str], calib: Tensor) -> list:
    """Put a LearnedActivationQuant, started from the exporter's own calibration on `calib`, on the
    input of every named leaf layer (one per ONNX tensor: layers that read the same tensor share
    it, as the file has one scale for it). Returns the hook handles (detach_activation_quant)."""
    import copy
    import os
    import tempfile

    import onnx

    from rankfold.export.onnx import export_onnx
    from rankfold.quantize.export import module_of_node
    from rankfold.quantize.onnx_qdq import WEIGHTED_OPS, calibrate

    # Exported and calibrated on the CPU, where onnxruntime runs; the quantizers then join the
    # module on its training device.
    exported = module if calib.device.type == "cpu" else copy.deepcopy(module).cpu()
    with tempfile.TemporaryDirectory(prefix="rankfold-") as scratch:
        path = os.path.join(scratch, "student.onnx")
        export_onnx(exported, path, example_input=calib[:1].cpu())
        proto = onnx.load(path)
    wanted = dict.fromkeys(leaves, 0)
    reader_of: dict[str, list[str]] = {}  # input tensor -> the leaves that read it
    for node in proto.graph.node:
        leaf = module_of_node(node.name, wanted) if node.op_type in WEIGHTED_OPS else None
        if leaf is not None:
            reader_of.setdefault(node.input[0], []).append(leaf)
    calibrated = calibrate(proto, calib.cpu().numpy())
    modules = dict(module.named_modules())
    handles = []
    for tensor, readers in reader_of.items():
        if tensor not in calibrated:
            continue
        quant = LearnedActivationQuant(calibrated[tensor]).to(calib.device)  # shared: its parameter counts once
        for leaf in readers:
            modules[leaf].add_module(_INPUT_QUANT, quant)
            handles.append(modules[leaf].register_forward_pre_hook(
                lambda _m, args, q=quant: (q(args[0]), *args[1:])))
    return handles


def detach_activation_quant(module: nn.Module, handles: list) -> dict[str, ActivationParams]:
    """Remove the input quantizers; returns each leaf's learned input parameters, by full name."""
    for handle in handles:
        handle.remove()
    learned = {}
    for name, leaf in list(module.named_modules(remove_duplicate=False)):
        quant = leaf._modules.pop(_INPUT_QUANT, None)
        if quant is not None:
            learned[name] = quant.params()
    return learned
