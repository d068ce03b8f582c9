"""The planner's expensive half: measure the network once (statistics, sensitivity, latency) and
price every option of every layer; Pricing.plan (choose.py) then picks one per layer, cheaply."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from torch import Tensor, nn

from rankfold.analyze import COMPRESSIBLE, TABLES, as_input, tied_names, untouchable_layers
from rankfold.errors import RankfoldError, first_line
from rankfold.exact_rows import read_rows, split_stats, with_exact_rows
from rankfold.planner.choose import choose_plan
from rankfold.planner.costs import ChainProfile, LatencyCache, modelled_latency_ms
from rankfold.planner.latency import WholeNetworkTiming
from rankfold.planner.memory import activation_profile
from rankfold.planner.options import (
    Option,
    bit_choices,
    data_free_stats,
    edge_bits,
    noise_units,
    options_for_layer,
    stored_bytes,
    table_options,
    with_bits,
)
from rankfold.planner.plan import Plan, Progress
from rankfold.planner.probe import LossProbe
from rankfold.planner.sensitivity import layer_statistics
from rankfold.settings import DEFAULT_MIN_RANK
from rankfold.target import Budget, Target, load_target, parse_budget


def make_plan(
    model: nn.Module,
    *,
    calib: Tensor | None = None,
    example_input: Tensor | None = None,
    target: str | Target = "host",
    budgets: Mapping[str, str | float | Budget] | None = None,
    min_rank: int = DEFAULT_MIN_RANK,
    onnx_path: str | None = None,
    bits: str | int = "auto",
    progress: Progress | None = None,
) -> Plan:
    """Plan the compression of `model` for `target` under `budgets` ({quantity: "10%" | "2MB" | ...},
    quantities: params, weight_bytes, macs, latency_ms, ram_bytes). `onnx_path`: the model's own
    ONNX file, timed for the host's whole-network latency (else the model is exported to time it)."""
    pricing = price_model(model, calib=calib, example_input=example_input, target=target, min_rank=min_rank,
                          onnx_path=onnx_path, bits=bits, progress=progress)
    return pricing.plan(budgets or {}, progress=progress)


def price_model(
    model: nn.Module,
    *,
    calib: Tensor | None = None,
    example_input: Tensor | None = None,
    target: str | Target = "host",
    min_rank: int = DEFAULT_MIN_RANK,
    onnx_path: str | None = None,
    bits: str | int = "auto",
    progress: Progress | None = None,
) -> Pricing:
    """The expensive half of planning: statistics, every layer's options with loss and costs."""
    say = progress or (lambda _m: None)
    target = load_target(target) if isinstance(target, str) else target
    choices = bit_choices(target, bits)  # a bad bit-width fails here, before any work
    if calib is None and example_input is None:
        raise RankfoldError("planning needs calibration data (calib) or an example_input")
    example = as_input((calib if calib is not None else example_input)[:1])
    given, was_training = model, model.training
    model.eval()
    try:
        untouchable, names, tables, heads = _layers_to_price(model, choices)
        if not names:
            raise RankfoldError("the model has no Linear / Conv1d / Conv2d layer to compress")
        if calib is not None:
            stats = layer_statistics(model, tables + names + list(heads.values()), as_input(calib),
                                     progress=say)
        else:
            stats = data_free_stats(model, names, example)
        exact_rows = read_rows(model, {n: s.class_tally for n, s in stats.items() if s.class_tally is not None})
        if exact_rows:  # priced, planned and applied as two layers each (rankfold.exact_rows)
            model, stats = with_exact_rows(model, exact_rows), split_stats(stats, exact_rows)
            untouchable, names, tables, heads = _layers_to_price(model, choices)
            for name, rows in exact_rows.items():
                say(f"{name}: the {len(rows)} of its {model.get_submodule(name).rest.out_features} classes the "
                    "calibration data predicts are held as a layer of their own, the rest as another")
        for name, reason in untouchable.items():
            say(f"left alone: {name} ({reason})")
        activations = activation_profile(model, example)
        cache = LatencyCache() if target.latency == "measured" else None

        def latency_of(profile: ChainProfile, input_shape) -> float:
            return cache.latency_ms(profile, input_shape) if cache else modelled_latency_ms(profile, target)

        modules = dict(model.named_modules())
        compressible = [n for n in names if n in stats]
        options, notes = {}, {}
        for name in tables:
            if name in stats:
                options[name] = with_bits(table_options(modules[name], stats[name], activations.base.get(name, 0)),
                                          choices, noise_units(modules[name], stats[name], target,
                                                               _head(modules, stats, heads.get(name))),
                                          runtime=target.runtime)
                notes[name] = "embedding table: quantized where that pays, never factorized"
        for i, name in enumerate(compressible, 1):
            say(f"pricing [{i}/{len(compressible)}] {name}")
            structural, notes[name] = options_for_layer(
                name, modules[name], stats[name], target, min_rank, activations.base.get(name, 0),
                activations.input_kept.get(name, False), latency_of)
            edge = i in (1, len(compressible))
            options[name] = with_bits(structural, edge_bits(target, bits) if edge else choices,
                                      noise_units(modules[name], stats[name], target), target.reduce_range,
                                      target.runtime)
        if cache:
            say(f"latency: {cache.measured} new shape(s) timed in onnxruntime, cache {cache.path}")
            cache.save()
    finally:
        given.train(was_training)
        model.train(was_training)
    probe = LossProbe.for_model(model, calib, stats) if calib is not None else None
    layer_names = [n for n in tables if n in options] + compressible
    return Pricing(model, example, target, options, notes, activations, calib is not None,
                   [n for n in tables if n in options] + names, layer_names,
                   onnx_path, say, probe, exact_rows)


def _layers_to_price(model: nn.Module, choices) -> tuple[dict[str, str], list[str], list[str], dict[str, str]]:
    """The layers left alone (with why), the compressible ones, the embedding tables (quantized,
    never factorized: only where a bit-width below 32 is among `choices`) and the heads tied to them
    (measured with them)."""
    untouchable = untouchable_layers(model)
    names = [n for n, m in model.named_modules() if isinstance(m, COMPRESSIBLE) and n not in untouchable]
    tables = [n for n, m in model.named_modules() if isinstance(m, TABLES)] if len(choices) > 1 or \
        choices[0] < 32 else []
    return untouchable, names, tables, tied_heads(model, tables)


def tied_heads(model: nn.Module, tables: list[str]) -> dict[str, str]:
    """Each table's Linear partner whose weight is the table itself (a language model's head)."""
    modules = dict(model.named_modules())
    heads = {}
    for name, first in tied_names(model).items():
        for layer, other in ((name, first), (first, name)):
            owner, partner = layer.rpartition(".")[0], other.rpartition(".")[0]
            if owner in tables and isinstance(modules.get(partner), nn.Linear):
                heads[owner] = partner
    return heads


def _head(modules, stats, name: str | None):
    return (modules[name], stats[name]) if name is not None and name in stats else None


class Pricing:
    """Every layer's options, priced; solve() turns budgets into a Plan (cheap, repeatable)."""

    def _whole_network_timing(self, layer_names, onnx_path, say) -> WholeNetworkTiming | None:
        """The measured latency model; None, said, where the model does not export to ONNX (a
        language model with ops the exporter lacks): its latency is then its layers' own, summed."""
        if onnx_path is None and not getattr(self.model, "exports_to_onnx", True):
            say("latency not measured: the model does not export to ONNX (it says so: exports_to_onnx); it is "
                "the sum of its layers' own measured latencies")
            return None
        try:
            timed = [n for n in layer_names if not isinstance(self.modules[n], TABLES)]  # a table's read: not timed
            return WholeNetworkTiming(self.model, self.example, {n: self.options[n] for n in timed},
                                      onnx_path, say)
        except Exception as exc:  # the exporter raises many kinds; none of them ends the planning
            if onnx_path is not None:
                raise
            say(f"latency not measured: the model does not export to ONNX here ({first_line(exc)}); it is "
                "estimated from its layers' own latencies instead")
            return None

    def __init__(self, model, example, target, options, notes, activations, data_aware, names, layer_names,
                 onnx_path, say, probe: LossProbe | None = None, exact_rows: dict | None = None) -> None:
        self.model, self.example, self.target, self.probe = model, example, target, probe
        self.exact_rows = exact_rows or {}  # the plans' (rankfold.exact_rows): `model` holds them split
        self.options, self.notes, self.activations = options, notes, activations
        self.data_aware, self.names, self.layer_names = data_aware, names, layer_names
        self.modules = dict(model.named_modules())
        self.weight_bytes_per = 4 if 32 in target.weight_bits else 1  # bytes per parameter outside layers
        self.act_bytes = target.activation_bytes
        total_params = sum(p.numel() for p in model.parameters()) + sum(
            b.numel() for b in model.buffers() if b.is_floating_point())
        layer_params = sum(options[n][0].profile.params for n in layer_names)
        self.timing = self._whole_network_timing(layer_names, onnx_path, say) if target.latency == "measured" else None
        if self.timing is not None:
            self.latency_scale, fixed_latency = self.timing.scale, self.timing.fixed_ms
            self.latency_source = "onnxruntime (measured)"
        else:
            self.latency_scale = 1.0
            self.latency_source = "model (cycles per MAC)"
            if target.clock_hz:
                fixed_latency = 1000.0 * activations.other_elements * target.cycles_per_element / target.clock_hz
            else:  # a measured target whose whole-network timing could not run: the layers' own sum
                fixed_latency, self.latency_source = 0.0, "sum of the layers' measured latencies"
        # A quantized export adds a float32 scale and an int8 zero point per activation tensor.
        quantizable = any(o.bits < 32 for n in layer_names for o in options[n])
        activation_params_bytes = 5 * (len(getattr(model, "steps", [])) or 3 * len(layer_names)) if quantizable else 0
        self.fixed = {
            "params": total_params - layer_params,
            "weight_bytes": (total_params - layer_params) * self.weight_bytes_per + activation_params_bytes,
            "macs": 0,
            "latency_ms": fixed_latency,
        }
        # "before" is the float original, whatever bit-widths the options use (budgets in % are of it)
        self.before = self.totals({n: dataclasses.replace(options[n][0], bits=32,
                                                          weight_bytes=stored_bytes(options[n][0].profile, 32))
                                   for n in layer_names})
        self.before["weight_bytes"] -= activation_params_bytes
        if self.timing is not None:
            self.before["latency_ms"] = self.timing.whole_ms

    def quantity(self, opt: Option, q: str) -> float:
        return {"params": opt.profile.params, "weight_bytes": opt.weight_bytes,
                "macs": opt.profile.macs, "latency_ms": self.latency_scale * opt.latency_ms}[q]

    def totals(self, choice: Mapping[str, Option]) -> dict[str, float]:
        out = {q: self.fixed[q] + sum(self.quantity(choice[n], q) for n in self.layer_names) for q in self.fixed}
        peak = max([self.activations.fixed_peak] + [choice[n].ram_elements for n in self.layer_names])
        out["ram_bytes"] = peak * self.act_bytes
        return out

    def limits(self, budgets: Mapping[str, str | float | Budget]) -> dict[str, float]:
        parsed = {q: b if isinstance(b, Budget) else parse_budget(q, b) for q, b in budgets.items()}
        limits = {q: b.limit(self.before[q]) for q, b in parsed.items()}
        if self.target.flash_bytes is not None:
            limits["weight_bytes"] = min(limits.get("weight_bytes", float("inf")), float(self.target.flash_bytes))
        if self.target.ram_bytes is not None:
            limits["ram_bytes"] = min(limits.get("ram_bytes", float("inf")), float(self.target.ram_bytes))
        return limits

    def loss(self, name: str, option: Option) -> float:
        """The option's loss: measured in the network where the probe has measured it."""
        if self.probe is None or option.method == "none":
            return option.loss
        return self.probe.structural_loss(name, option.key, option.loss - option.quant_loss) + option.quant_loss

    def plan(self, budgets: Mapping[str, str | float | Budget], *, progress: Progress | None = None,
             measure: bool = True) -> Plan:
        """The least-loss plan within `budgets` and the target's limits (see choose.choose_plan)."""
        return choose_plan(self, budgets, progress=progress, measure=measure)
