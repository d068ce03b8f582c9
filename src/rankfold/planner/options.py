"""A layer's options for the planner: every (method, ranks) of the target's methods with its
estimated loss, latency and memory, each at every weight bit-width the target allows, and the
rules that pick those bit-widths."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from rankfold.analyze import TABLES, per_sample_shapes, run_hooked, takes_weight_groups
from rankfold.errors import RankfoldError
from rankfold.layers import layer_spec
from rankfold.methods import method_named
from rankfold.planner.candidates import FACTORIZED_POINTS, candidate_ranks, factorized_losses, input_weighting
from rankfold.planner.costs import ChainProfile, SubLayer, chain_profile
from rankfold.target import Target, offers_groups


@dataclass
class Option:
    method: str
    ranks: tuple[int, ...]
    loss: float
    profile: ChainProfile
    latency_ms: float
    ram_elements: int
    bits: int = 32
    weight_bytes: float = 0.0
    quant_loss: float = 0.0  # the share of `loss` that weight rounding adds
    per_tensor: bool = False  # one weight scale for each (sub-)layer instead of one per output channel
    group_size: int | None = None  # int4 with one scale per this many input elements of each channel

    @property
    def key(self) -> tuple[str, tuple[int, ...]]:
        return self.method, self.ranks


def quantized_layer_bytes(weights: int, out_ch: int, bias: bool, bits: int, per_tensor: bool = False,
                          group_size: int | None = None, runtime: str = "onnxruntime") -> int:
    """One (sub-)layer's bytes as the QDQ export stores it below 32 bits: packed integers, a
    float32 scale per output channel, and int32 biases, whose scales (the input's times the
    weight's) the file computes by a Mul that onnxruntime folds at load; `per_tensor`: one float32
    scale for the weights; `group_size`: a float32 scale per group of that many input elements of
    each channel, and float32 biases (a bias scale per group does not exist). The C back-end
    (`runtime` "c") stores, for every convolution of its program, an int32 bias (zeros where the
    layer has none), an int32 requantization multiplier and an int8 shift per channel (cexport/ir.py)."""
    if runtime == "c":
        return -(-weights * bits // 8) + (4 + 4 + 1) * out_ch
    if group_size is not None:
        groups = out_ch * -(-(weights // max(out_ch, 1)) // group_size)
        return -(-weights * bits // 8) + 4 * groups + (4 * out_ch if bias else 0)
    scales = 1 if per_tensor else out_ch
    return -(-weights * bits // 8) + 4 * scales + (4 * out_ch if bias else 0)


def stored_bytes(profile: ChainProfile, bits: int, per_tensor: bool = False, group_size: int | None = None,
                 runtime: str = "onnxruntime") -> float:
    """Weight bytes of a chain at `bits` as exported (float32 at 32 bits). Below 32 bits the last
    (sub-)layer always has a bias, an embedding table excepted: bias correction gives one to a layer
    that had none (PP-LCNet's squeeze-excitation convolutions: priced without theirs, its file came
    out at 10.4 % of the float bytes under a 10 % budget)."""
    if bits >= 32:
        return 4.0 * profile.params
    last = len(profile.sub_layers) - 1
    return float(sum(quantized_layer_bytes(s.out_ch * (s.in_ch // s.groups) * int(np.prod(s.kernel or (1,))),
                                           s.out_ch, s.bias or (i == last and s.kind != "embedding"), bits,
                                           per_tensor, group_size, runtime)
                     for i, s in enumerate(profile.sub_layers)))


@dataclass(frozen=True)
class NoiseUnits:
    """A layer's estimated loss from int8 rounding noise on its weights, per scale layout: one
    scale per output channel, one per tensor (None: not offered), one per group (int4 only)."""

    channel: float
    tensor: float | None = None
    group: float | None = None
    group_size: int | None = None


def with_bits(options: list[Option], bits_choices: tuple[int, ...], units: NoiseUnits,
              reduce_range: bool = False, runtime: str = "onnxruntime") -> list[Option]:
    """Every structural option at every allowed bit-width. Quantizing adds rounding noise to each
    factor: its estimated loss is the unit (the layer's loss at int8) x factors x (127/qmax)^2,
    qmax 63 for int8 on a target that needs 7-bit weights (four times the int8 noise, same bytes).
    With a tensor unit, every quantized option comes also with one weight scale per (sub-)layer
    (4 bytes fewer per output channel); with a group unit, int4 comes also with one scale per
    `group_size` input elements of each channel (the factors priced with the layer's own groups)."""
    from rankfold.quantize.core import weight_qmax

    layouts = [(False, None, units.channel)] + ([(True, None, units.tensor)] if units.tensor is not None else [])
    grouped = [(False, units.group_size, units.group)] if units.group is not None else []
    expanded = []
    for opt in options:
        for bits in bits_choices:
            if bits >= 32:
                expanded.append(dataclasses.replace(opt, bits=bits, weight_bytes=stored_bytes(opt.profile, 32)))
                continue
            for per_tensor, group, unit in layouts + (grouped if bits == 4 else []):
                extra = unit * len(opt.profile.sub_layers) * (127 / weight_qmax(bits, reduce_range)) ** 2
                expanded.append(dataclasses.replace(opt, loss=opt.loss + extra, bits=bits, quant_loss=extra,
                                                    weight_bytes=stored_bytes(opt.profile, bits, per_tensor, group,
                                                                              runtime),
                                                    per_tensor=per_tensor, group_size=group))
    return expanded


def rounding_costs(module: nn.Module, stats) -> Tensor | None:
    """Per column of the layer's flattened weight, what a unit of rounding error there costs its
    output where the export rounds data-aware (quantize/gptq.py: dense Linear and Conv2d layers,
    with calibration data): the error left once the later inputs compensate it
    (gptq.error_feedback_weights). A k x k convolution's im2col moment is taken as its channel
    moment (x) its taps' correlation, whose factors multiply: neighbouring pixels are correlated,
    and the rounding uses that (YOLOv8n's 3x3 convolutions: measured 0.07 of plain rounding's
    error, 0.21 estimated from the channel moment alone, 0.09 from the im2col moment).
    None where the weights are rounded plainly (E[x_i^2] then)."""
    from rankfold.quantize import gptq

    spec = layer_spec(module)
    moment = stats.input_moment
    if moment is None or not gptq.supports(module) or moment.shape != (spec.in_ch, spec.in_ch):
        return None
    channels = gptq.error_feedback_weights(moment)
    taps = stats.tap_correlation
    if taps is None or taps.shape[0] != spec.spatial:
        return channels.repeat_interleave(spec.spatial)  # the weight's column order: channel, then tap
    return (channels[:, None] * gptq.error_feedback_weights(taps)[None, :]).reshape(-1)


def int8_noise_loss(module: nn.Module, stats, per_tensor: bool = False, group_size: int | None = None,
                    costs: Tensor | None = None) -> float:
    """1/2 sum_c G_c E[dy_c^2] for int8 rounding noise on the layer's weights (independent noise of
    variance (max|w_c| / 127)^2 / 12 per weight, or with the range of the whole tensor, or of each
    group). Plain rounding: E[x^2] summed over the taps = taps * tr(Sigma). With `costs`
    (rounding_costs: the export rounds data-aware), each column's cost instead: otherwise int4
    looked about three times dearer than it turns out, against float, int8 and ranks, and plainly
    rounded tables (and depthwise convolutions) looked as cheap."""
    from rankfold.quantize.weights import group_quant_noise, weight_quant_noise

    spec = layer_spec(module)
    if costs is not None:
        noise = group_quant_noise(module.weight, 8, per_tensor=per_tensor, group_size=group_size)
        size = group_size or costs.numel()
        per_group = torch.nn.functional.pad(costs, (0, noise.shape[1] * size - costs.numel())) \
            .reshape(noise.shape[1], size).sum(1)
        return 0.5 * float(stats.sensitivity.double() @ (noise @ per_group))
    noise = torch.from_numpy(weight_quant_noise(module.weight, 8, per_tensor=per_tensor, group_size=group_size))
    trace = float(torch.trace(stats.input_moment)) if stats.input_moment is not None else float(spec.in_ch)
    per_group = spec.in_ch // spec.groups
    return 0.5 * float(stats.sensitivity @ noise) * spec.spatial * trace * per_group / spec.in_ch


def table_noise_loss(table: nn.Module, stats, group_size: int | None = None,
                     head: tuple[nn.Module, object] | None = None) -> float:
    """int8 rounding noise on an embedding table: a position reading row v gets that row's noise,
    so the loss is 1/2 sum_d G_d sum_v p_v var_v (p_v: how often row v is read; var_v per row, or
    per group). `head`: a Linear whose weight is this table (tied) and its statistics; its outputs
    take the same noise."""
    from rankfold.quantize.weights import weight_quant_noise

    variance = torch.from_numpy(weight_quant_noise(table.weight, 8, group_size=group_size))
    frequency = stats.input_moment / stats.input_moment.sum().clamp_min(1e-30)
    loss = 0.5 * float(stats.sensitivity.sum()) * float(frequency @ variance)
    if head is not None:
        loss += int8_noise_loss(head[0], head[1], group_size=group_size)  # rounded as the table: plainly
    return loss


def table_options(module: nn.Module, stats, base_elements: int) -> list[Option]:
    """An embedding table's one structure: kept as it is (its bit-widths come from with_bits)."""
    spec = layer_spec(module)
    inputs, outputs = int(np.prod(stats.input_shape or (1,))), int(np.prod(stats.output_shape))
    table = SubLayer("embedding", spec.in_ch, spec.out_ch, (), (), (), (), 1, False, 0)
    profile = ChainProfile(spec.weight_params, 0, (inputs, outputs), (table,))
    return [Option("none", (), 0.0, profile, 0.0, base_elements + inputs + outputs)]


def noise_units(module: nn.Module, stats, target: Target, head: tuple[nn.Module, object] | None = None
                ) -> NoiseUnits:
    """The layouts the target's runtime offers: one scale per tensor saves bytes in the QDQ file
    only (the C export keeps a multiplier and shift per output channel whatever the scales), and
    so do int4 groups (DequantizeLinear's block_size), offered for Linear layers, pointwise
    convolutions and tables."""
    onnx_runtime = target.runtime == "onnxruntime"
    # Groups along one input axis (DequantizeLinear's blocks): Linear layers and pointwise
    # convolutions (their factors are too), tables.
    group = target.weight_group_size if takes_weight_groups(module) and \
        offers_groups(target.runtime, target.weight_bits) else None
    if isinstance(module, TABLES):
        return NoiseUnits(table_noise_loss(module, stats, head=head), None,
                          table_noise_loss(module, stats, group, head) if group else None, group)
    costs = rounding_costs(module, stats)
    return NoiseUnits(int8_noise_loss(module, stats, costs=costs),
                      int8_noise_loss(module, stats, per_tensor=True, costs=costs) if onnx_runtime else None,
                      int8_noise_loss(module, stats, group_size=group, costs=costs) if group else None, group)


def options_for_layer(
    name, module, stats, target, min_rank, base_elements, keep_input, latency_of
) -> tuple[list[Option], str]:
    spec = layer_spec(module)
    input_shape = stats.input_shape
    original = chain_profile([module], input_shape)
    options = [Option("none", (), 0.0, original, latency_of(original, input_shape),
                       base_elements + original.working_elements(keep_input))]
    if spec.groups > 1:
        return options, f"grouped convolution (groups={spec.groups}): not factorized"
    weighting = input_weighting(stats.input_moment, spec.in_ch)
    notes = []
    for method_name in target.methods:
        method = method_named(method_name)
        if method.unsupported(spec, module) is not None:
            continue
        # Without a closed form each candidate is factorized to price it: fewer candidates.
        points = 16 if method.estimate_losses is not None else FACTORIZED_POINTS
        ranks = candidate_ranks(method, spec, multiple=target.rank_multiple, min_rank=min_rank, points=points)
        if not ranks:
            continue
        if method.estimate_losses is not None:
            losses = method.estimate_losses(module.weight, weighting, stats.sensitivity, ranks)
        else:
            losses = factorized_losses(method, module, weighting, stats.sensitivity, ranks)
        for rank, loss in zip(ranks, losses):
            profile = chain_profile(list(method.skeleton(module, rank)), input_shape)
            options.append(Option(method_name, tuple(rank), loss, profile, latency_of(profile, input_shape),
                                   base_elements + profile.working_elements(keep_input)))
    if len(options) == 1:
        notes.append(f"no rank of {', '.join(target.methods)} at or above min_rank={min_rank} saves parameters")
    return options, "; ".join(notes)


def data_free_stats(model: nn.Module, names: list[str], example: Tensor):
    """Shapes from one forward pass; identity input weighting; each layer's error relative to its
    own weight norm (no data: no sensitivity)."""
    from rankfold.planner.sensitivity import LayerStats

    modules = dict(model.named_modules())
    shapes: dict[str, tuple] = {}
    def record(name: str, inputs, output) -> None:  # a forward hook that returned a value would replace the output
        if name not in shapes:
            shapes[name] = per_sample_shapes(inputs[0].shape, output.shape, example.shape[0])

    run_hooked(model, example, [modules[n].register_forward_hook(lambda m, i, o, n=n: record(n, i, o))
                                for n in names])
    stats = {}
    for n in names:
        if n in shapes:
            w = modules[n].weight.detach().to(torch.float64)
            sens = torch.full((w.shape[0],), 1.0 / float((w * w).sum().clamp_min(1e-30)), dtype=torch.float64)
            stats[n] = LayerStats(n, None, sens, *shapes[n])
    return stats


def bit_choices(target: Target, bits: str | int) -> tuple[int, ...]:
    """The weight bit-widths the planner may pick from: the target's set ("auto"), or one of them."""
    if bits == "auto":
        return tuple(target.weight_bits)
    try:
        value = int(bits)
    except (TypeError, ValueError):
        raise RankfoldError(f"bits must be auto, 32, 8 or 4, got {bits!r}") from None
    if value not in target.weight_bits:
        raise RankfoldError(f"target {target.name} runs weights at {', '.join(map(str, target.weight_bits))} "
                            f"bits, not {value}")
    return (value,)


def edge_bits(target: Target, bits: str | int) -> tuple[int, ...]:
    """Bit-widths for the first and last layer, the most sensitive to rounding and the cheapest in
    bytes: never int4 where the target runs float. With "auto" the planner weighs float against
    int8 (int8 saves bytes a tight budget needs); a fixed --bits keeps them float."""
    choices = bit_choices(target, bits)
    if 32 not in target.weight_bits:
        return choices
    return (32, 8) if bits == "auto" and 8 in choices else (32,)
