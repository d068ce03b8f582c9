"""Multiple-choice knapsack: one option per layer, least total loss under several budgets.

Lagrangian relaxation: with a price per unit of each budgeted cost, every layer picks its
cheapest option in loss + price * cost independently; prices are raised by bisection until every
budget holds. What the relaxation leaves unspent is then handed out greedily, always to the
upgrade that buys the most loss per unit of the scarcest budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Solution:
    choice: list[int]  # option index per layer
    feasible: bool
    totals: dict[str, float]
    best_reachable: dict[str, float]  # per budget: the smallest total any choice reaches


def solve(
    losses: list[np.ndarray],
    costs: dict[str, list[np.ndarray]],
    limits: dict[str, float],
    *,
    iterations: int = 60,
) -> Solution:
    """`losses[l][j]`, `costs[k][l][j]`: option j of layer l; `limits[k]`: the most that budget k's
    total may reach (only keys in `limits` are constrained)."""
    n_layers = len(losses)
    keys = [k for k in limits if k in costs]
    scale = {k: max(abs(limits[k]), 1e-12) for k in keys}
    best_reachable = {k: float(sum(c.min() for c in costs[k])) for k in keys}

    def pick(prices: dict[str, float]) -> list[int]:
        choice = []
        for layer in range(n_layers):
            score = losses[layer].astype(float).copy()
            for k, price in prices.items():
                score += price * costs[k][layer] / scale[k]
            choice.append(int(np.argmin(score)))
        return choice

    def totals(choice: list[int]) -> dict[str, float]:
        return {k: float(sum(costs[k][layer][j] for layer, j in enumerate(choice))) for k in costs}

    def over(choice: list[int]) -> list[str]:
        t = totals(choice)
        return [k for k in keys if t[k] > limits[k] * (1 + 1e-9)]

    if any(best_reachable[k] > limits[k] * (1 + 1e-9) for k in keys):
        cheapest = pick({k: 1e12 for k in keys})
        return Solution(cheapest, False, totals(cheapest), best_reachable)

    prices = dict.fromkeys(keys, 0.0)
    choice = pick(prices)
    loss_span = max(float(sum(np.ptp(row[np.isfinite(row)]) for row in losses)), 1e-12)
    for _ in range(20):  # coordinate rounds: one budget's price moves, the others hold
        violated = over(choice)
        if not violated:
            break
        for k in violated:
            low, high = prices[k], max(prices[k], 1.0) * 2
            while k in over(pick({**prices, k: high})) and high < 1e9 * loss_span:
                high *= 4
            for _ in range(iterations):
                mid = 0.5 * (low + high)
                if k in over(pick({**prices, k: mid})):
                    low = mid
                else:
                    high = mid
            prices[k] = high
            choice = pick(prices)
    feasible = not over(choice)
    if feasible:
        choice = _spend_slack(choice, losses, costs, limits, keys)
    return Solution(choice, feasible, totals(choice), best_reachable)


def _spend_slack(choice, losses, costs, limits, keys) -> list[int]:
    """Greedy upgrades (lower loss) that keep every budget, best loss saved per cost first."""
    choice = list(choice)
    spent = {k: float(sum(costs[k][layer][j] for layer, j in enumerate(choice))) for k in keys}
    while True:
        best = None
        for layer, j in enumerate(choice):
            for option in range(len(losses[layer])):
                gain = losses[layer][j] - losses[layer][option]
                if gain <= 0:
                    continue
                extra = {k: costs[k][layer][option] - costs[k][layer][j] for k in keys}
                if any(spent[k] + extra[k] > limits[k] * (1 + 1e-9) for k in keys):
                    continue
                use = max([extra[k] / max(limits[k] - spent[k], 1e-12) for k in keys] + [1e-12])
                ratio = gain / use
                if best is None or ratio > best[0]:
                    best = (ratio, layer, option, extra)
        if best is None:
            return choice
        _, layer, option, extra = best
        choice[layer] = option
        for k in keys:
            spent[k] += extra[k]
