"""The planner's expensive half and its solve: measure the network once (statistics, sensitivity,
latency), price every option of every layer, then pick one option per layer under the budgets."""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from rankfold.analyze import COMPRESSIBLE, set_submodule, untouchable_layers
from rankfold.errors import RankfoldError
from rankfold.layers import layer_spec
from rankfold.methods import method_named
from rankfold.planner.costs import (
    ChainProfile,
    LatencyCache,
    modelled_latency_ms,
    time_onnx_ms,
    time_onnx_pair_ms,
)
from rankfold.planner.memory import activation_profile
from rankfold.planner.options import (
    Option,
    bit_choices,
    data_free_stats,
    edge_bits,
    int8_noise_loss,
    options_for_layer,
    stored_bytes,
    with_bits,
)
from rankfold.planner.plan import LayerPlan, Plan, Progress
from rankfold.planner.probe import PROBE_SAMPLES, LossProbe
from rankfold.planner.sensitivity import layer_statistics
from rankfold.planner.solver import solve
from rankfold.settings import DEFAULT_MIN_RANK
from rankfold.target import Budget, Target, load_target, parse_budget

# Measured latency varies by a few percent from run to run: plans aim this much under a latency
# limit so that a later measurement of the result still meets it.
LATENCY_MARGIN = 0.95  # params, macs, weight_bytes, ram_bytes, latency_ms
REFINE_ROUNDS = 6


def _onnx_of(model: nn.Module, example: Tensor, onnx_path: str | None = None):
    """The model as an ONNX proto: its own file when given, else exported (for timing only)."""
    import onnx

    from rankfold.export.onnx import export_onnx

    if onnx_path is not None:
        return onnx.load(onnx_path)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        export_onnx(model, path, example_input=example, verify=False)
        return onnx.load(path)


def _variant(model: nn.Module, modules: dict, choice: Mapping[str, Option]) -> nn.Module:
    """`model` with each layer replaced as `choice` says (random weights: for timing only)."""
    variant = copy.deepcopy(model)
    for name, option in choice.items():
        if option.method != "none":
            method = method_named(option.method)
            set_submodule(variant, name, method.skeleton(modules[name], option.ranks))
    return variant


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
    return pricing.solve(budgets or {}, progress=progress)


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
    if calib is None and example_input is None:
        raise RankfoldError("planning needs calibration data (calib) or an example_input")
    example = (calib if calib is not None else example_input)[:1].to(torch.float32)
    was_training = model.training
    model.eval()
    try:
        untouchable = untouchable_layers(model)
        names = [n for n, m in model.named_modules() if isinstance(m, COMPRESSIBLE) and n not in untouchable]
        for name, reason in untouchable.items():
            say(f"left alone: {name} ({reason})")
        if not names:
            raise RankfoldError("the model has no Linear / Conv1d / Conv2d layer to compress")
        if calib is not None:
            stats = layer_statistics(model, names, calib.to(torch.float32), progress=say)
        else:
            stats = data_free_stats(model, names, example)
        activations = activation_profile(model, example)
        cache = LatencyCache() if target.latency == "measured" else None

        def latency_of(profile: ChainProfile, input_shape) -> float:
            return cache.latency_ms(profile, input_shape) if cache else modelled_latency_ms(profile, target)

        modules = dict(model.named_modules())
        layer_names = [n for n in names if n in stats]
        options, notes = {}, {}
        choices = bit_choices(target, bits)
        for i, name in enumerate(layer_names, 1):
            say(f"pricing [{i}/{len(layer_names)}] {name}")
            structural, notes[name] = options_for_layer(
                name, modules[name], stats[name], target, min_rank, activations.base.get(name, 0),
                activations.input_kept.get(name, False), latency_of)
            edge = i in (1, len(layer_names))
            options[name] = with_bits(structural, edge_bits(target, bits) if edge else choices,
                                       int8_noise_loss(modules[name], stats[name]), target.reduce_range)
        if cache:
            say(f"latency: {cache.measured} new shape(s) timed in onnxruntime, cache {cache.path}")
            cache.save()
    finally:
        model.train(was_training)
    probe = None
    if calib is not None and LossProbe.applies(model, example):
        probe = LossProbe(model, calib[:PROBE_SAMPLES], stats)
    return Pricing(model, example, target, options, notes, activations, calib is not None, names, layer_names,
                   onnx_path, say, probe)


class Pricing:
    """Every layer's options, priced; solve() turns budgets into a Plan (cheap, repeatable)."""

    def __init__(self, model, example, target, options, notes, activations, data_aware, names, layer_names,
                 onnx_path, say, probe: LossProbe | None = None) -> None:
        self.model, self.example, self.target, self.probe = model, example, target, probe
        self.options, self.notes, self.activations = options, notes, activations
        self.data_aware, self.names, self.layer_names = data_aware, names, layer_names
        self.modules = dict(model.named_modules())
        self.weight_bytes_per = 4 if 32 in target.weight_bits else 1  # bytes per parameter outside layers
        self.act_bytes = target.activation_bytes
        total_params = sum(p.numel() for p in model.parameters()) + sum(
            b.numel() for b in model.buffers() if b.is_floating_point())
        layer_params = sum(options[n][0].profile.params for n in layer_names)
        self.latency_scale = 1.0
        if target.latency == "measured":
            # Layers timed alone run with their weights in cache; inside the network they do not,
            # and Add/Relu/pooling cost extra. Whole networks timed at both ends of the range (every
            # layer kept, every layer at its cheapest option) calibrate whole = fixed + scale * sum.
            say("timing the whole network in onnxruntime, as it is and at its cheapest options")
            kept_sum = sum(options[n][0].latency_ms for n in layer_names)
            cheapest = {n: min(options[n], key=lambda o: o.latency_ms) for n in layer_names}
            cheap_sum = sum(o.latency_ms for o in cheapest.values())
            self.original_onnx = _onnx_of(model, example, onnx_path)
            whole = time_onnx_ms(self.original_onnx, tuple(example.shape[1:]), repeats=15)
            self.whole_ms = whole
            cheap_whole = self.measured_latency_ms(cheapest)
            if kept_sum - cheap_sum > 1e-3 * kept_sum:
                self.latency_scale = max(0.1, (whole - cheap_whole) / (kept_sum - cheap_sum))
            fixed_latency = whole - self.latency_scale * kept_sum
            self.latency_source = "onnxruntime (measured)"
        else:
            fixed_latency = 1000.0 * activations.other_elements * target.cycles_per_element / target.clock_hz
            self.latency_source = "model (cycles per MAC)"
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
        if target.latency == "measured":
            self.before["latency_ms"] = whole

    def quantity(self, opt: Option, q: str) -> float:
        return {"params": opt.profile.params, "weight_bytes": opt.weight_bytes,
                "macs": opt.profile.macs, "latency_ms": self.latency_scale * opt.latency_ms}[q]

    def totals(self, choice: Mapping[str, Option]) -> dict[str, float]:
        out = {q: self.fixed[q] + sum(self.quantity(choice[n], q) for n in self.layer_names) for q in self.fixed}
        peak = max([self.activations.fixed_peak] + [choice[n].ram_elements for n in self.layer_names])
        out["ram_bytes"] = peak * self.act_bytes
        return out

    def measured_latency_ms(self, choice: Mapping[str, Option]) -> float:
        """The network built as `choice` says, timed in turn with the original (drift cancels in
        the ratio) and scaled to the original's latency measured at the start."""
        candidate = _onnx_of(_variant(self.model, self.modules, choice), self.example)
        reference_ms, candidate_ms = time_onnx_pair_ms(self.original_onnx, candidate, tuple(self.example.shape[1:]))
        return self.whole_ms * candidate_ms / reference_ms

    def limits(self, budgets: Mapping[str, str | float | Budget]) -> dict[str, float]:
        parsed = {q: b if isinstance(b, Budget) else parse_budget(q, b) for q, b in budgets.items()}
        limits = {q: b.limit(self.before[q]) for q, b in parsed.items()}
        if self.target.flash_bytes is not None:
            limits["weight_bytes"] = min(limits.get("weight_bytes", float("inf")), float(self.target.flash_bytes))
        if self.target.ram_bytes is not None:
            limits["ram_bytes"] = min(limits.get("ram_bytes", float("inf")), float(self.target.ram_bytes))
        return limits

    def solve(self, budgets: Mapping[str, str | float | Budget], *, progress: Progress | None = None,
              measure: bool = True) -> Plan:
        """The least-loss plan within `budgets` and the target's limits. `measure`: on a measured
        target, time the chosen network itself (and re-solve while it misses a latency limit)."""
        say = progress or (lambda _m: None)
        limits = self.limits(budgets)
        ram_limit = limits.get("ram_bytes")
        losses, costs = [], {q: [] for q in self.fixed}
        feasible_ram = ram_limit is None or self.activations.fixed_peak * self.act_bytes <= ram_limit
        for n in self.layer_names:
            loss = np.array([o.loss for o in self.options[n]], dtype=float)
            if ram_limit is not None:
                too_big = np.array([o.ram_elements * self.act_bytes > ram_limit for o in self.options[n]])
                if too_big.all():
                    feasible_ram = False
                else:
                    loss[too_big] = np.inf
            losses.append(loss)
            for q in self.fixed:
                costs[q].append(np.array([self.quantity(o, q) for o in self.options[n]], dtype=float))
        layer_limits = {q: limits[q] - self.fixed[q] for q in limits if q in self.fixed}
        if "latency_ms" in layer_limits and self.target.latency == "measured":
            layer_limits["latency_ms"] -= (1 - LATENCY_MARGIN) * limits["latency_ms"]
        solution = self._solve_measured(losses, costs, layer_limits, say)
        chosen = {n: self.options[n][j] for n, j in zip(self.layer_names, solution.choice)}
        after = self.totals(chosen)
        if self.target.latency == "measured" and measure:
            # Closed loop: time the chosen network itself; while it misses a latency limit that
            # the estimate said it meets, tighten the limit by the miss and solve again.
            for attempt in range(4):
                measured = self.measured_latency_ms(chosen)
                say(f"plan timed in onnxruntime: {measured:.3f} ms (estimated {after['latency_ms']:.3f} ms)")
                after["latency_ms_estimated"], after["latency_ms"] = after["latency_ms"], measured
                limit = limits.get("latency_ms")
                if limit is None or measured <= LATENCY_MARGIN * limit or not solution.feasible or attempt == 3:
                    break
                layer_limits["latency_ms"] -= measured - LATENCY_MARGIN * limit
                solution = self._solve_measured(losses, costs, layer_limits, say)
                chosen = {n: self.options[n][j] for n, j in zip(self.layer_names, solution.choice)}
                after = self.totals(chosen)
        feasible = solution.feasible and feasible_ram
        messages = self._messages(limits, after, solution)
        return Plan(self.target.name, self.target.default_weight_bits, self.target.activation_bits, self.data_aware,
                    self.latency_source, limits, dict(self.before), after,
                    float(sum(self._loss(n, o) for n, o in chosen.items())), feasible, self._layer_plans(chosen),
                    messages, self.target.reduce_range, self.target.runtime)

    def _loss(self, name: str, option: Option) -> float:
        if self.probe is None or option.method == "none":
            return option.loss
        return self.probe.structural_loss(name, option.key, option.loss - option.quant_loss) + option.quant_loss

    def _solve_measured(self, losses, costs, layer_limits, say):
        """Solve on the estimated losses; then measure the factorizations the solution picked (one
        layer at a time, in the real network) and solve again, until it picks none unmeasured.
        The closed-form estimate is second order: right for small errors, far too low where a
        rank is too small for the layer (measured: up to 100x on MobileNetV2's projections)."""
        for _round in range(REFINE_ROUNDS):
            refined = [np.where(np.isfinite(loss), [self._loss(n, o) for o in self.options[n]], np.inf)
                       for n, loss in zip(self.layer_names, losses)]
            solution = solve(refined, costs, layer_limits)
            if self.probe is None:
                return solution
            picked = [(n, self.options[n][j]) for n, j in zip(self.layer_names, solution.choice)]
            todo = [(n, o) for n, o in picked if o.method != "none" and not self.probe.measured(n, o.key)]
            if not todo:
                return solution
            say(f"measuring {len(todo)} factorization(s) in the network (round {_round + 1})")
            for n, o in todo:
                self.probe.measure(n, o.key, o.loss - o.quant_loss)
        return solution

    def _messages(self, limits, after, solution) -> list[str]:
        messages = []
        for q, limit in limits.items():
            if after[q] > limit * (1 + 1e-9):
                if q == "ram_bytes":
                    best = max([self.activations.fixed_peak] + [min(o.ram_elements for o in self.options[n])
                                                                for n in self.layer_names]) * self.act_bytes
                else:
                    best = solution.best_reachable.get(q, 0.0) + self.fixed.get(q, 0.0)
                messages.append(f"{q} cannot be met: limit {limit:,.6g}, the plan reaches {after[q]:,.6g} "
                                f"(over by {after[q] - limit:,.6g}); the smallest reachable is {best:,.6g}")
        if not self.activations.graph_wide:
            messages.append("activation memory counts layer inputs and outputs only (residual branches are not "
                            "tracked outside ONNX-loaded models)")
        if any(o.bits < 32 for n in self.layer_names for o in self.options[n]) and \
                self.target.latency == "measured":
            messages.append("latency is measured on float layers; quantized layers run onnxruntime's int8 kernels "
                            "(int4 weights are dequantized at run time)")
        return messages

    def _layer_plans(self, chosen: Mapping[str, Option]) -> list[LayerPlan]:
        layers = []
        for n in self.names:
            described = layer_spec(self.modules[n]).describe()
            if n not in chosen:
                layers.append(LayerPlan(n, described, "none", note="not reached by the forward pass"))
                continue
            opt = chosen[n]
            note = self.notes[n] if opt.method == "none" else ""
            if opt.method == "none" and not note:
                note = "kept: no option's saving was worth its loss under the budgets"
            layers.append(LayerPlan(
                n, described, opt.method, list(opt.ranks), float(self._loss(n, opt)), int(opt.profile.params),
                int(round(opt.weight_bytes)), int(opt.profile.macs),
                round(float(self.latency_scale * opt.latency_ms), 5), int(round(opt.ram_elements * self.act_bytes)),
                note, opt.bits))
        return layers
