"""The estimated loss vs weight bytes / latency front, and what a target can hold."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from rankfold.analyze import model_outputs
from rankfold.errors import RankfoldError
from rankfold.io import make_public, write_json_atomic
from rankfold.planner.plan import apply_plan
from rankfold.planner.pricing import price_model
from rankfold.selfcheck import split_holdout
from rankfold.settings import DEFAULT_MIN_RANK
from rankfold.target import Budget


def _accuracy(module: nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 256) -> float:
    correct = 0
    with torch.no_grad():
        for start in range(0, len(x), batch):
            out = model_outputs(module(torch.from_numpy(x[start : start + batch])))[0]
            correct += int((out.argmax(1).numpy() == y[start : start + batch]).sum())
    return correct / max(len(x), 1)


def quantized_accuracy(module, plan, calib, example, data) -> float:
    from rankfold.evaluate import accuracy
    from rankfold.quantize.export import export_quantized

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "q.onnx")
        export_quantized(module, plan.layer_bits(), path, calib=calib, example_input=example,
                         reduce_range=plan.reduce_range, per_tensor=plan.per_tensor_layers(),
                         groups=plan.grouped_layers(), float_outputs=plan.runtime == "onnxruntime")
        return accuracy(path, *data)


def run_pareto(
    model: nn.Module,
    model_path: str,
    *,
    calib: Tensor | None,
    example: Tensor,
    target: str,
    fractions: list[float],
    data: tuple[np.ndarray, np.ndarray] | None = None,
    measure_points: int = 3,
    plot: str | None = None,
    json_out: str | None = None,
    min_rank: int = DEFAULT_MIN_RANK,
    progress: Callable[[str], None] | None = None,
) -> dict:
    say = progress or (lambda _m: None)
    fit = split_holdout(calib)[0] if calib is not None else None
    pricing = price_model(model, calib=fit, example_input=example, target=target, min_rank=min_rank,
                          onnx_path=model_path, progress=lambda m: say("  " + m))
    points, plans = front(pricing, fractions, say)
    if data is not None:
        feasible = [i for i, p in enumerate(points) if p["feasible"]]
        chosen = sorted({feasible[int(round(k))] for k in np.linspace(0, len(feasible) - 1, max(1, measure_points))}
                        ) if feasible else []
        say(f"measuring top-1 of the original and of {len(chosen)} point(s) on {len(data[0])} samples")
        original_accuracy = _accuracy(model, *data)
        for i in chosen:
            module, _ = apply_plan(model, plans[i], calib=fit)
            if plans[i].quantized:  # measure what would be written: the QDQ file, in onnxruntime
                points[i]["accuracy"] = quantized_accuracy(module, plans[i], fit, example, data)
            else:
                points[i]["accuracy"] = _accuracy(module, *data)
    else:
        original_accuracy = None
    result = {"model": model_path, "target": pricing.target.name, "before": pricing.before,
              "original_accuracy": original_accuracy, "points": points, "target_fit": target_fit(pricing)}
    result["lines"] = front_lines(result, pricing.target)  # the CLI prints them; the API returns them
    if json_out:
        write_json_atomic(json_out, result)
    if plot:
        plot_front(result, plot)
    return result


def front(pricing, fractions: list[float], say: Callable[[str], None] = lambda _m: None) -> tuple[list, list]:
    """One plan per weight-byte fraction, solved on one pricing (cheap: no new measurement), and
    its point on the front: (points, plans)."""
    points, plans = [], []
    for fraction in sorted(fractions):
        say(f"solving at {fraction:.0%} of the weight bytes")
        plan = pricing.plan({"weight_bytes": Budget("weight_bytes", fraction, relative=True)})
        plans.append(plan)
        points.append({"budget": fraction, "feasible": plan.feasible, "est_loss": plan.est_loss,
                       "params": plan.after["params"], "weight_bytes": plan.after["weight_bytes"],
                       "latency_ms": plan.after["latency_ms"], "ram_bytes": plan.after["ram_bytes"],
                       "accuracy": None})
    return points, plans


def target_fit(pricing) -> dict:
    """The least-loss plan under the target's own limits only: how it holds this network."""
    fits = pricing.plan({})
    return {"feasible": fits.feasible, "after": fits.after, "est_loss": fits.est_loss, "messages": fits.messages}


def front_lines(result: dict, target) -> list[str]:
    """The front as a table, then what the target holds."""
    before = result["before"]
    lines = [f"{'budget':>7} {'est.loss':>10} {'params':>11} {'weight B':>12} {'latency ms':>11} {'RAM B':>9} "
             f"{'top-1':>7}"]
    if result["original_accuracy"] is not None:
        lines.append(f"{'orig.':>7} {0:>10.2e} {before['params']:>11,.0f} {before['weight_bytes']:>12,.0f} "
                     f"{before['latency_ms']:>11.3f} {before['ram_bytes']:>9,.0f} {result['original_accuracy']:>7.4f}")
    for p in result["points"]:
        acc = "" if p["accuracy"] is None else f"{p['accuracy']:.4f}"
        flag = "" if p["feasible"] else "  (budget not reachable)"
        lines.append(f"{p['budget']:>7.0%} {p['est_loss']:>10.2e} {p['params']:>11,.0f} {p['weight_bytes']:>12,.0f} "
                     f"{p['latency_ms']:>11.3f} {p['ram_bytes']:>9,.0f} {acc:>7}{flag}")
    fit = result["target_fit"]
    if target.flash_bytes is None and target.ram_bytes is None:
        lines.append(f"target {target.name} sets no memory limits: the whole network fits")
    elif fit["feasible"]:
        after = fit["after"]
        lines.append(f"target {target.name} holds this network at {after['weight_bytes']:,.0f} weight bytes "
                     f"({after['params'] / before['params']:.1%} of its parameters, flash {target.flash_bytes:,}) "
                     f"and {after['ram_bytes']:,.0f} B peak RAM (of {target.ram_bytes:,}); estimated loss "
                     f"{fit['est_loss']:.2e}")
    else:
        lines.append(f"target {target.name} cannot hold this network: " + "; ".join(fit["messages"]))
    if target.flash_bytes:
        lines.append(f"its {target.flash_bytes:,} B of flash hold at most {capacity_params(target.flash_bytes, 8):,} "
                     f"int8 parameters ({capacity_params(target.flash_bytes, 8) / before['params']:.1f}x this "
                     f"network's) or {capacity_params(target.flash_bytes, 4):,} at int4")
    return lines


def capacity_params(flash_bytes: int, bits: int) -> int:
    """Weights a flash of `flash_bytes` holds at `bits` per weight: an upper bound, before the
    per-channel scales and int32 biases that come with them (a few bytes per output channel)."""
    return flash_bytes * 8 // bits


def plot_front(result: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RankfoldError("--plot needs matplotlib: pip install 'rankfold[plot]'") from None
    points = [p for p in result["points"] if p["feasible"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "weight_bytes", "weight bytes"), (axes[1], "latency_ms", "latency (ms)")):
        ax.plot([p[key] for p in points], [p["est_loss"] for p in points], "o-", label="estimated loss (KL)")
        ax.set_xlabel(label)
        ax.set_ylabel("estimated loss (nats)")
        ax.set_yscale("symlog", linthresh=1e-6)
        ax.axvline(result["before"][key], color="grey", linestyle=":", label="original")
        measured = [p for p in points if p["accuracy"] is not None]
        if measured and result["original_accuracy"] is not None:
            twin = ax.twinx()
            twin.plot([p[key] for p in measured],
                      [100 * (result["original_accuracy"] - p["accuracy"]) for p in measured], "s--", color="C3")
            twin.set_ylabel("measured top-1 loss (points)", color="C3")
        ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(f"{os.path.basename(result['model'])} on {result['target']}")
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=directory)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        make_public(tmp)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
