"""Calibration statistics: layer inputs of the original and the partly compressed network."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from rankfold.errors import RankfoldError

COMPRESSIBLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


def channels_last_rows(module: nn.Module, x: Tensor) -> Tensor:
    """The layer input as rows of channel vectors: (N * positions, C_in)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def run_checked(model: nn.Module, x: Tensor) -> Tensor:
    """Run `model` on `x`, turning a shape mismatch into a RankfoldError that says so."""
    try:
        return model(x)
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RankfoldError(
            f"calibration/example data of shape {tuple(x.shape)} does not fit the model: {first_line}"
        ) from None


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted layer has been seen."""


def execution_order(model: nn.Module, example: Tensor, layer_names: Iterable[str]) -> list[str]:
    """The named layers in the order the forward pass reaches them (layers not reached last)."""
    wanted = list(layer_names)
    modules = dict(model.named_modules())
    seen: list[str] = []
    handles = [
        modules[name].register_forward_hook(lambda _m, _i, _o, name=name: seen.append(name))
        for name in wanted
    ]
    try:
        with torch.no_grad():
            run_checked(model, example)
    finally:
        for h in handles:
            h.remove()
    order = list(dict.fromkeys(seen))
    return order + [n for n in wanted if n not in order]


def _layer_inputs(model: nn.Module, name: str, batch: Tensor) -> Tensor:
    """The input of layer `name` for `batch`; the forward pass stops right after it."""
    captured: list[Tensor] = []

    def hook(module, inputs):
        captured.append(channels_last_rows(module, inputs[0].detach()))
        raise _StopForward

    handle = model.get_submodule(name).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(batch)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RankfoldError(f"layer {name!r} is not reached by the forward pass")
    return captured[0]


def paired_moments(
    original: nn.Module,
    current: nn.Module,
    name: str,
    calib: Tensor,
    *,
    batch_size: int = 64,
    max_rows_per_batch: int = 16384,
) -> tuple[Tensor, Tensor]:
    """(E[x x^T_hat], E[x_hat x_hat^T]) for layer `name`: x from the original network, x_hat from
    the partly compressed one, on the same calibration rows (float64)."""
    cross = auto = None
    count = 0
    gen = torch.Generator().manual_seed(1)
    for start in range(0, calib.shape[0], batch_size):
        batch = calib[start : start + batch_size]
        x = _layer_inputs(original, name, batch).to(torch.float64)
        x_hat = _layer_inputs(current, name, batch).to(torch.float64)
        if x.shape[0] > max_rows_per_batch:
            keep = torch.randperm(x.shape[0], generator=gen)[:max_rows_per_batch]
            x, x_hat = x[keep], x_hat[keep]
        cross = x.T @ x_hat if cross is None else cross + x.T @ x_hat
        auto = x_hat.T @ x_hat if auto is None else auto + x_hat.T @ x_hat
        count += x.shape[0]
    return cross / count, auto / count
