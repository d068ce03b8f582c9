"""How much a recogniser's wide output layer costs its plan: the head as the planner factorizes
it, against its rows for the classes the data reads kept exact and the rest at a low rank.

    python -m bench.wide_head

PP-OCRv4's recogniser ends in a Linear of 120 -> 6,625 characters (801,625 parameters, 30 % of
the network); English lines read 67 of those characters. First the head forms below in the
original network alone. Then plans the recogniser at half its parameters (`compress_to_budget`, no
check, 256 calibration lines; since 51b276e the planner splits the head itself, see
rankfold/exact_rows.py), measures the lines read alike on 128 fresh ones, then puts back, in that
compressed network, a head whose active rows (the classes the original predicts at some
calibration position, or above probability 1e-4) are the original's and whose other rows are an
input-weighted rank-k approximation (weighted by the inputs the compressed network gives the
head), and measures again with its parameter count. Last, plans again with the neck's last
convolution held out of the plan (its weights kept, counted in the budget).
Writes bench/results/wide-head.json.
"""

from __future__ import annotations

import copy
import json
import os
import time

import numpy as np
import torch
from torch import nn

from bench import field_inputs, realworld
from rankfold.analyze import set_submodule
from rankfold.decompose import sqrt_psd
from rankfold.frontends.onnx import load_onnx
from rankfold.planner.pipeline import compress_to_budget

HEAD = "p2o_MatMul_24"
NECK = "p2o_Conv_36"  # the neck's last convolution (1 x 3, 960 -> 60)
RANKS = (0, 4, 16)
BATCH = 32


def outputs(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([model(x[i : i + BATCH]).numpy() for i in range(0, len(x), BATCH)])


def head_inputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows the head of `model` reads on `x` (float64)."""
    rows = []
    handle = model.get_submodule(HEAD).register_forward_pre_hook(
        lambda _m, i: rows.append(i[0].reshape(-1, i[0].shape[-1]).double()))
    try:
        outputs(model, x)
    finally:
        handle.remove()
    return torch.cat(rows)


def split_head(original: nn.Linear, active: np.ndarray, rank: int, rows: torch.Tensor) -> tuple[nn.Linear, int]:
    """The head with `active` rows exact and the rest at `rank` under the rows' second moment, and
    what that form holds in parameters (active rows, two factors, the bias)."""
    weight = original.weight.detach().double()
    rest = torch.ones(weight.shape[0], dtype=torch.bool)
    rest[torch.from_numpy(active)] = False
    root = sqrt_psd(rows.T @ rows / rows.shape[0])
    u, s, vt = torch.linalg.svd(weight[rest] @ root, full_matrices=False)
    approximated = weight.clone()
    approximated[rest] = (u[:, :rank] * s[:rank]) @ vt[:rank] @ torch.linalg.pinv(root)
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(approximated.float())
        head.bias.copy_(original.bias.detach())
    params = len(active) * weight.shape[1] + rank * (int(rest.sum()) + weight.shape[1]) + weight.shape[0]
    return head, params


class _HeldOut(nn.Module):
    """A convolution whose weights are constants (buffers): no plan touches it."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.register_buffer("weight", conv.weight.detach().clone())
        self.register_buffer("bias", conv.bias.detach().clone())
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(self, x):
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def with_layer_held_out(model: nn.Module, name: str) -> nn.Module:
    held = copy.deepcopy(model)
    set_submodule(held, name, _HeldOut(held.get_submodule(name)))
    return held


def measure_heads(network: nn.Module, original_head: nn.Linear, actives: dict, rows: torch.Tensor,
                  fresh: torch.Tensor, reference: np.ndarray) -> list[dict]:
    held = network.get_submodule(HEAD)
    found = []
    try:
        for label, active in actives.items():
            for rank in RANKS:
                head, params = split_head(original_head, active, rank, rows)
                set_submodule(network, HEAD, head)
                alike = realworld.lines_read_alike([reference], [outputs(network, fresh)])
                found.append({"active": label, "active_rows": len(active), "rest_rank": rank, "params": params,
                              "lines_read_alike": alike})
                print(f"  {label} ({len(active)} rows exact), the rest at rank {rank}: {params:,} parameters, "
                      f"lines read alike {alike:.3f}", flush=True)
    finally:
        set_submodule(network, HEAD, held)
    return found


def main() -> int:
    model = next(m for m in realworld.MODELS if m.name == "ppocr-rec")
    original = load_onnx(realworld.fetch(model, os.path.join(os.path.expanduser("~"), ".cache", "rankfold-field")))
    original.eval()
    calib = torch.from_numpy(field_inputs.text_lines(np.random.default_rng(1), 256)).float()
    fresh = torch.from_numpy(field_inputs.text_lines(np.random.default_rng(2), 128)).float()
    reference = outputs(original, fresh)
    head = original.get_submodule(HEAD)
    probs = outputs(original, calib).reshape(-1, head.weight.shape[0])
    actives = {"predicted": np.unique(probs.argmax(-1)), "p > 1e-4": np.nonzero(probs.max(0) > 1e-4)[0]}
    results = {"original network": measure_heads(original, head, actives, head_inputs(original, calib), fresh,
                                                 reference)}
    total = sum(p.numel() for p in original.parameters())
    start = time.perf_counter()
    planned = compress_to_budget(original, calib=calib, budgets={"params": total // 2}, check=False).module.eval()
    planned_head = sum(p.numel() for p in planned.get_submodule(HEAD).parameters())  # split by the planner now
    alike = realworld.lines_read_alike([reference], [outputs(planned, fresh)])
    print(f"planned at half the parameters ({time.perf_counter() - start:.0f} s): head {planned_head:,} parameters, "
          f"lines read alike {alike:.3f}", flush=True)
    results["planned"] = {"head_params": planned_head, "lines_read_alike": alike}
    results["planned network"] = measure_heads(planned, head, actives, head_inputs(planned, calib), fresh, reference)
    # The neck's last convolution, which costs the plan 9.3 times its estimate (bench/layer_damage.py),
    # held out of the plan: its weights as constants, counted in the same budget
    start = time.perf_counter()
    held_out = with_layer_held_out(original, NECK)
    kept = compress_to_budget(held_out, calib=calib, budgets={"params": total // 2}, check=False).module.eval()
    alike = realworld.lines_read_alike([reference], [outputs(kept, fresh)])
    counted = sum(p.numel() for p in kept.parameters()) + sum(b.numel() for b in kept.get_submodule(NECK).buffers())
    print(f"planned at half the parameters with {NECK} held out whole ({time.perf_counter() - start:.0f} s, "
          f"{counted:,} parameters with it): lines read alike {alike:.3f}", flush=True)
    results["planned, neck held out"] = {"params": counted, "lines_read_alike": alike}
    path = os.path.join(realworld.RESULTS, "wide-head.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
