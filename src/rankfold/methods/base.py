"""What every factorization method is: the Method protocol, the built result, and the helpers
the methods share (rank for a keep fraction, the data-weighted error, the closed-form tails)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from rankfold.decompose._weighting import mode_product
from rankfold.layers import LayerSpec, LowRank

Rank = tuple[int, ...]


@dataclass
class Factorized:
    """A built replacement and the weight it approximates (for error measurement)."""

    module: LowRank
    approx_weight: Tensor


LossFn = Callable[[Tensor, Tensor, Tensor, list[Rank]], list[float]]


class Method(Protocol):
    """A factorization method. Registered once (rankfold.methods.register), everything else (the
    CLI's names, target validation, uniform and `auto` compression, the planner's options and
    prices, plan files) is derived from these fields."""

    name: str  # as on the command line, in targets and in plan files
    config_type: type  # its per-layer config (e.g. SVDConfig)
    rank_count: int  # how many ranks a choice has: 1, or 2 for Tucker-2's (r_in, r_out)
    auto_max_work: float | None  # `auto` tries it only where weight params x largest rank stays below; None: always
    estimate_losses: LossFn | None  # closed-form planner losses; None: priced by factorizing each candidate

    def config(self, ranks: Sequence[int]) -> object: ...  # the config that builds exactly these ranks
    def unsupported(self, spec: LayerSpec, layer: nn.Module) -> str | None: ...
    def rank_ladder(self, spec: LayerSpec) -> list[Rank]: ...
    def factor_params(self, spec: LayerSpec, rank: Rank) -> int: ...
    def config_rank(self, config: object) -> Rank | str | None: ...
    def skeleton(self, layer: nn.Module, rank: Rank) -> LowRank: ...
    def factorize(self, layer: nn.Module, rank: Rank, input_sqrt: Tensor | None, config: object) -> Factorized: ...


def copy_bias(target: nn.Module, layer: nn.Module) -> None:
    if layer.bias is not None:
        target.bias.data.copy_(layer.bias.detach())


def is_conv(layer: nn.Module) -> bool:
    return isinstance(layer, (nn.Conv1d, nn.Conv2d))


def rank_for_keep(method: Method, spec: LayerSpec, keep: float) -> Rank | None:
    """The largest rank whose factors hold at most `keep` of the layer's weights and are smaller
    than the layer; None when no rank saves anything."""
    budget = keep * spec.weight_params
    best = None
    for rank in method.rank_ladder(spec):
        cost = method.factor_params(spec, rank)
        if cost <= budget and cost < spec.weight_params:
            best = rank
    return best


def weighted_relative_error(weight: Tensor, approx: Tensor, input_sqrt: Tensor | None) -> float:
    """||(W - W~) x_1 S|| / ||W x_1 S|| (S = identity without calibration data)."""
    w = weight.detach().to(torch.float64)
    diff = w - approx.detach().to(torch.float64)
    if input_sqrt is not None:
        w = torch.movedim(torch.movedim(w, 1, -1) @ input_sqrt, -1, 1)
        diff = torch.movedim(torch.movedim(diff, 1, -1) @ input_sqrt, -1, 1)
    return float(diff.norm() / w.norm().clamp_min(1e-30))


def weighted_weight(weight: Tensor, input_sqrt: Tensor) -> Tensor:
    """W S as (O, I, taps): the weight weighted by the input's second moment's square root."""
    w = weight.detach().to(torch.float64)
    return mode_product(w.reshape(w.shape[0], w.shape[1], -1), input_sqrt, 1)


def tail_losses(matrix: Tensor, row_weights: Tensor, ranks: list[int]) -> list[float]:
    """1/2 sum_{j >= r} s_j^2 (row_weights . u_j^2) for each r: the row-weighted error of keeping
    the leading r left singular directions of `matrix`."""
    u, s, _ = torch.linalg.svd(matrix, full_matrices=False)
    per_direction = (s * s) * (row_weights @ (u * u))
    tails = torch.flip(torch.cumsum(torch.flip(per_direction, [0]), 0), [0])
    tails = torch.cat([tails, tails.new_zeros(1)])
    return [0.5 * float(tails[min(r, len(s))]) for r in ranks]
