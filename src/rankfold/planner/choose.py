"""From a priced network to a Plan: the least-loss option per layer under the budgets and the
target's limits, with the losses of the factorizations it picks measured in the network, and on
a measured target the chosen network timed itself."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from rankfold.layers import layer_spec
from rankfold.planner.options import Option
from rankfold.planner.plan import LayerPlan, Plan, Progress, scales_name
from rankfold.planner.solver import Solution, solve
from rankfold.target import Budget

# Measured latency varies by a few percent from run to run: plans aim this much under a latency
# limit so that a later measurement of the result still meets it.
LATENCY_MARGIN = 0.95
REFINE_ROUNDS = 6
MEASURE_ATTEMPTS = 4


def choose_plan(pricing, budgets: Mapping[str, str | float | Budget], *, progress: Progress | None = None,
                measure: bool = True) -> Plan:
    """The least-loss plan within `budgets` and the target's limits (`pricing`: a Pricing).
    `measure`: on a measured target, time the chosen network itself (and choose again while it
    misses a latency limit)."""
    say = progress or (lambda _m: None)
    limits = pricing.limits(budgets)
    ram_limit = limits.get("ram_bytes")
    losses, costs = [], {q: [] for q in pricing.fixed}
    feasible_ram = ram_limit is None or pricing.activations.fixed_peak * pricing.act_bytes <= ram_limit
    for n in pricing.layer_names:
        loss = np.array([o.loss for o in pricing.options[n]], dtype=float)
        if ram_limit is not None:
            too_big = np.array([o.ram_elements * pricing.act_bytes > ram_limit for o in pricing.options[n]])
            if too_big.all():
                feasible_ram = False
            else:
                loss[too_big] = np.inf
        losses.append(loss)
        for q in pricing.fixed:
            costs[q].append(np.array([pricing.quantity(o, q) for o in pricing.options[n]], dtype=float))
    layer_limits = {q: limits[q] - pricing.fixed[q] for q in limits if q in pricing.fixed}
    measured_target = pricing.timing is not None
    if "latency_ms" in layer_limits and measured_target:
        layer_limits["latency_ms"] -= (1 - LATENCY_MARGIN) * limits["latency_ms"]
    # One weight scale per tensor saves 8 bytes per output channel and rounds coarser: it is
    # offered only when the budgets cannot be met with a scale per channel.
    per_channel = [np.where([o.per_tensor for o in pricing.options[n]], np.inf, loss)
                   for n, loss in zip(pricing.layer_names, losses)]
    solution = _solve_measured(pricing, per_channel, costs, layer_limits, say)
    if not solution.feasible and any(o.per_tensor for n in pricing.layer_names for o in pricing.options[n]):
        say("the budgets cannot be met with a weight scale per output channel: planning again with one scale "
            "per tensor allowed")
        solution = _solve_measured(pricing, losses, costs, layer_limits, say)
    else:
        losses = per_channel
    chosen = _chosen(pricing, solution)
    after = pricing.totals(chosen)
    if measured_target and measure:
        # Closed loop: time the chosen network itself; while it misses a latency limit that the
        # estimate said it meets, tighten the limit by the miss and solve again.
        for attempt in range(MEASURE_ATTEMPTS):
            measured = pricing.timing.measure(chosen)
            say(f"plan timed in onnxruntime: {measured:.3f} ms (estimated {after['latency_ms']:.3f} ms)")
            after["latency_ms_estimated"], after["latency_ms"] = after["latency_ms"], measured
            limit = limits.get("latency_ms")
            if limit is None or measured <= LATENCY_MARGIN * limit or not solution.feasible \
                    or attempt == MEASURE_ATTEMPTS - 1:
                break
            layer_limits["latency_ms"] -= measured - LATENCY_MARGIN * limit
            solution = _solve_measured(pricing, losses, costs, layer_limits, say)
            chosen = _chosen(pricing, solution)
            after = pricing.totals(chosen)
    target = pricing.target
    return Plan(target.name, target.default_weight_bits, target.activation_bits, pricing.data_aware,
                pricing.latency_source, limits, dict(pricing.before), after,
                float(sum(pricing.loss(n, o) for n, o in chosen.items())), solution.feasible and feasible_ram,
                _layer_plans(pricing, chosen), _messages(pricing, limits, after, solution), target.reduce_range,
                target.runtime, exact_rows={name: list(rows) for name, rows in pricing.exact_rows.items()})


def _chosen(pricing, solution: Solution) -> dict[str, Option]:
    return {n: pricing.options[n][j] for n, j in zip(pricing.layer_names, solution.choice)}


def _solve_measured(pricing, losses, costs, layer_limits, say) -> Solution:
    """Solve on the estimated losses; then measure the factorizations the solution picked (one
    layer at a time, in the real network) and solve again, until it picks none unmeasured.
    The closed-form estimate is second order: right for small errors, far too low where a rank
    is too small for the layer (measured: up to 100x on MobileNetV2's projections)."""
    probe = pricing.probe
    for round_ in range(REFINE_ROUNDS):
        refined = [np.where(np.isfinite(loss), [pricing.loss(n, o) for o in pricing.options[n]], np.inf)
                   for n, loss in zip(pricing.layer_names, losses)]
        solution = solve(refined, costs, layer_limits)
        if probe is None:
            return solution
        todo = [(n, o) for n, o in _chosen(pricing, solution).items()
                if o.method != "none" and not probe.measured(n, o.key)]
        if not todo:
            return solution
        say(f"measuring {len(todo)} factorization(s) in the network (round {round_ + 1})")
        probe.measure_all((n, o.key, o.loss - o.quant_loss) for n, o in todo)
    return solution


def _amount(quantity: str, value: float) -> str:
    """A budget quantity as the message shows it: counts and bytes whole, with thousands separators
    (5,406,460, not 5.40646e+06); a latency to 4 significant digits."""
    return f"{value:.4g}" if quantity == "latency_ms" else f"{value:,.0f}"


def _messages(pricing, limits, after, solution: Solution) -> list[str]:
    messages = []
    for q, limit in limits.items():
        if after[q] > limit * (1 + 1e-9):
            if q == "ram_bytes":
                best = max([pricing.activations.fixed_peak] + [min(o.ram_elements for o in pricing.options[n])
                                                               for n in pricing.layer_names]) * pricing.act_bytes
            else:
                best = solution.best_reachable.get(q, 0.0) + pricing.fixed.get(q, 0.0)
            messages.append(f"{q} cannot be met: limit {_amount(q, limit)}, the plan reaches {_amount(q, after[q])} "
                            f"(over by {_amount(q, after[q] - limit)}); the smallest reachable is {_amount(q, best)}")
    before = pricing.before.get("macs", 0)
    if "macs" not in limits and "latency_ms" not in limits and before and after.get("macs", 0) > before * 1.001:
        # A size budget alone may pick factorizations that compute more (a 1x1 conv before a stride,
        # a rank above the MAC break-even where bytes are what is short): said, not silent.
        messages.append(f"this plan computes {after['macs'] / before:.0%} of the original's MACs: no MAC or latency "
                        "budget was given (--max-macs 100% keeps them from rising)")
    if not pricing.activations.graph_wide:
        messages.append("activation memory counts layer inputs and outputs only (residual branches are not "
                        "tracked outside ONNX-loaded models)")
    if pricing.timing is not None and any(o.bits < 32 for n in pricing.layer_names for o in pricing.options[n]):
        messages.append("latency is measured on float layers; quantized layers run onnxruntime's int8 kernels "
                        "(int4 weights are dequantized at run time)")
    return messages


def _layer_plans(pricing, chosen: Mapping[str, Option]) -> list[LayerPlan]:
    layers = []
    for n in pricing.names:
        described = layer_spec(pricing.modules[n]).describe()
        if n not in chosen:
            layers.append(LayerPlan(n, described, "none", note="not reached by the forward pass"))
            continue
        opt = chosen[n]
        note = pricing.notes[n] if opt.method == "none" else ""
        if opt.method == "none" and not note:
            note = "kept: no option's saving was worth its loss under the budgets"
        layers.append(LayerPlan(
            n, described, opt.method, list(opt.ranks), float(pricing.loss(n, opt)), int(opt.profile.params),
            int(round(opt.weight_bytes)), int(opt.profile.macs),
            round(float(pricing.latency_scale * opt.latency_ms), 5), int(round(opt.ram_elements * pricing.act_bytes)),
            note, opt.bits, scales_name(opt.per_tensor, opt.group_size)))
    return layers
