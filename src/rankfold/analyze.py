"""Calibration statistics: layer inputs of the original and the partly compressed network."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from rankfold.errors import RankfoldError

COMPRESSIBLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
# Modules that read a child layer's weight directly instead of calling it: replacing that child
# would break them (nn.MultiheadAttention hands out_proj.weight to F.multi_head_attention_forward).
WEIGHT_READERS = (nn.MultiheadAttention,)


def untouchable_layers(model: nn.Module) -> dict[str, str]:
    """Compressible layers that must stay as they are, by name, with the reason."""
    found = {}
    for parent_name, parent in model.named_modules():
        if isinstance(parent, WEIGHT_READERS):
            for child_name, child in parent.named_children():
                if isinstance(child, COMPRESSIBLE):
                    name = f"{parent_name}.{child_name}" if parent_name else child_name
                    found[name] = f"its {type(parent).__name__} reads .weight directly: not replaceable"
    return found

# Channel rows kept per layer for the moments: beyond this the estimates do not change, but the
# cost (and memory) of the moment products would keep growing with the data.
MAX_ROWS = 131072


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


def run_hooked(model: nn.Module, x: Tensor, handles: list) -> None:
    """One forward pass without gradients for the hooks in `handles`, which are removed afterwards."""
    try:
        with torch.no_grad():
            run_checked(model, x)
    finally:
        for h in handles:
            h.remove()


def sampled_rows(rows: int, limit: int, seed: int = 1) -> Tensor | None:
    """A fixed random subset of row indices (None: keep all), so two passes pick the same rows."""
    if rows <= limit:
        return None
    return torch.randperm(rows, generator=torch.Generator().manual_seed(seed))[:limit]


def capture_input_rows(
    model: nn.Module, names: Iterable[str], calib: Tensor, *, max_rows: int = MAX_ROWS
) -> dict[str, Tensor]:
    """Each named layer's input on `calib` as channel rows (a fixed subset of at most `max_rows`);
    layers the forward pass does not reach are absent."""
    modules = dict(model.named_modules())
    captured: dict[str, Tensor] = {}

    def hook(module, inputs, name):
        if name not in captured:
            rows = channels_last_rows(module, inputs[0].detach())
            index = sampled_rows(rows.shape[0], max_rows)
            captured[name] = rows if index is None else rows[index]

    run_hooked(model, calib, [modules[n].register_forward_pre_hook(lambda m, i, n=n: hook(m, i, n)) for n in names])
    return captured


ReplaceFn = Callable[[str, nn.Module, Tensor], "nn.Module | None"]


def replace_in_one_pass(model: nn.Module, names: Iterable[str], calib: Tensor, replace: ReplaceFn) -> list[str]:
    """Run `model` once on `calib`; when a named layer is reached, `replace(name, layer, rows)` may
    return its replacement (rows: the input it sees now, sampled as in capture_input_rows), which
    is installed and produces the output that the rest of the pass sees. So each layer is replaced
    knowing the inputs that the already-replaced layers before it produce: one forward pass in
    all, not one per layer. Returns the names in the order they were reached."""
    modules = dict(model.named_modules())
    reached: list[str] = []

    def hook(module, inputs, output, name):
        if name in reached:
            return None
        reached.append(name)
        rows = channels_last_rows(module, inputs[0].detach())
        index = sampled_rows(rows.shape[0], MAX_ROWS)
        new = replace(name, module, rows if index is None else rows[index])
        if new is None:
            return None
        set_submodule(model, name, new)
        return new(*inputs)

    run_hooked(model, calib, [modules[n].register_forward_hook(lambda m, i, o, n=n: hook(m, i, o, n)) for n in names])
    return reached


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
