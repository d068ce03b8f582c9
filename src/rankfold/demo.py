"""`rankfold demo`: the product's story in one run, on an embedded default.

Train (or reuse) a small CNN; plan it for a microcontroller with rank and bit-width chosen
together under one weight-byte budget; compare with uniform Tucker-2 at the same size; draw the
front and say how large a network the target could hold; export the plan as C and run it
against the golden model (and under qemu when the Arm toolchain is there). Every figure printed
is measured in the run.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
from torch import nn

from rankfold.apply import compress_with_report
from rankfold.demo_data import demo_dataset
from rankfold.evaluate import evaluate
from rankfold.export.onnx import export_onnx
from rankfold.frontends.onnx import load_onnx
from rankfold.io import write_json_atomic
from rankfold.report import human, plan_table

STEPS = 7


def small_cnn(in_ch: int = 1, classes: int = 10) -> nn.Module:
    """A VGG-style CNN small enough to train on two CPU cores in about a minute."""

    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(in_ch, 32, 1), *block(32, 64, 2), *block(64, 64, 1), *block(64, 128, 2), *block(128, 128, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, classes),
    )


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, log, batch_size: int = 128) -> None:
    gen = torch.Generator().manual_seed(0)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    steps = epochs * int(np.ceil(len(x) / batch_size))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        t0, total = time.time(), 0.0
        for i, start in enumerate(range(0, len(x), batch_size)):
            idx = order[start : start + batch_size]
            loss = loss_fn(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
            if i % 50 == 0:
                log(f"  epoch {epoch + 1}/{epochs}  step {i}/{len(x) // batch_size}  loss {total / (i + 1):.3f}")
        log(f"  epoch {epoch + 1}/{epochs} done in {time.time() - t0:.0f}s, loss {total / (i + 1):.3f}")
    model.eval()


def trained_model(out_dir: str, data, *, epochs: int, train_limit: int, log) -> tuple[str, bool]:
    """The trained CNN's ONNX file in `out_dir`, reused when an earlier demo trained it with the
    same settings (its recipe lies beside it); (path, reused)."""
    path, recipe_path = os.path.join(out_dir, "original.onnx"), os.path.join(out_dir, "original.json")
    recipe = {"dataset": data.name, "epochs": epochs, "train_limit": train_limit, "seed": 0,
              "torch": torch.__version__}
    if os.path.isfile(path) and os.path.isfile(recipe_path):
        with open(recipe_path) as handle:
            if json.load(handle) == recipe:
                return path, True
    torch.manual_seed(0)
    model = small_cnn(classes=int(data.y_train.max()) + 1)
    train(model, data.x_train[:train_limit], data.y_train[:train_limit], epochs=epochs, log=log)
    export_onnx(model, path, example_input=torch.from_numpy(data.x_train[:2]))
    write_json_atomic(recipe_path, recipe)
    return path, False


def comparison(rows: list[tuple[str, dict]]) -> str:
    """Top-1, weight bytes, MACs and host latency of each measured file, against the first."""
    base = rows[0][1]
    head = f"{'model':36} {'top-1':>6} {'Δ pt':>6}  {'weight B':>8} {'':>6}  {'MACs':>7} {'':>6}  host latency b1"
    lines = [head, "-" * len(head)]
    for label, m in rows:
        lines.append(f"{label:36} {m['accuracy']:.4f} {100 * (m['accuracy'] - base['accuracy']):+6.2f}  "
                     f"{human(m['weight_bytes']):>8} {m['weight_bytes'] / base['weight_bytes']:6.1%}  "
                     f"{human(m['macs']):>7} {m['macs'] / base['macs']:6.1%}  {m['latency_ms_b1']:.3f} ms")
    return "\n".join(lines)


def run_demo(out_dir: str, *, epochs: int = 2, train_limit: int = 24000, target: str = "cortex-m4",
             max_weight_bytes: str = "8%", method: str = "tucker2", c_samples: int = 300, log=print) -> dict:
    """The whole story; returns what it measured (also written to DIR/demo.json)."""
    from rankfold.cexport.run import BOARDS, export_c, qemu_tools_missing, run_c
    from rankfold.frontends.onnx import read_onnx
    from rankfold.io import check_output_directory
    from rankfold.planner.pareto import front, front_lines, plot_front, quantized_accuracy, target_fit
    from rankfold.planner.pipeline import apply_and_check
    from rankfold.planner.plan import apply_plan
    from rankfold.planner.pricing import price_model
    from rankfold.selfcheck import split_holdout
    from rankfold.settings import batches_of
    from rankfold.target import load_target, parse_budget

    t_start = time.time()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    profile = load_target(target)  # bad settings fail here, before any work
    parse_budget("weight_bytes", max_weight_bytes)
    os.makedirs(out_dir, exist_ok=True)
    c_dir = os.path.join(out_dir, "c")
    check_output_directory(c_dir, {}, force=True)  # only a directory export-c wrote is replaced
    data = demo_dataset()

    log(f"[1/{STEPS}] a small CNN trained on {data.name} ({min(train_limit, len(data.x_train))} images, "
        f"{epochs} epochs)")
    original_path, reused = trained_model(out_dir, data, epochs=epochs, train_limit=train_limit, log=log)
    if reused:
        log(f"  reusing {original_path} (trained by an earlier demo with the same settings; delete it to retrain)")
    calib = torch.from_numpy(data.x_train[np.random.default_rng(0).choice(len(data.x_train), 512, replace=False)])
    model = load_onnx(original_path)  # what a user brings: the ONNX file, BatchNorm folded

    log(f"[2/{STEPS}] planning for {profile.name} ({profile.description}): rank and bit-width per layer, "
        f"together, under {max_weight_bytes} of the float weight bytes")
    pricing = price_model(model, calib=split_holdout(calib)[0], target=profile, onnx_path=original_path,
                          progress=lambda m: log("  " + m))
    plan = pricing.plan({"weight_bytes": max_weight_bytes}, progress=lambda m: log("  " + m))
    log(plan_table(plan))

    log(f"[3/{STEPS}] applying the plan and writing the int8/int4 QDQ file, checked on held-back samples")
    planned_path = os.path.join(out_dir, "planned.onnx")
    with batches_of(64):
        result = apply_and_check(model, plan, calib=calib, min_agreement=0.8, progress=lambda m: log("  " + m))
        result.save(planned_path, force=True, progress=lambda m: log("  " + m))  # the demo's own file

    planned_bytes = plan.after["weight_bytes"]
    keep = planned_bytes / plan.before["weight_bytes"]
    log(f"[4/{STEPS}] for comparison: uniform {method} at the same weight bytes (keep {keep:.3f} of every layer, "
        "float)")
    uniform, _report = compress_with_report(model, method=method, keep=keep, calib=calib, min_rank=1)
    uniform_path = os.path.join(out_dir, "uniform.onnx")
    export_onnx(uniform, uniform_path, example_input=calib[:2])

    log(f"[5/{STEPS}] measuring the three files in onnxruntime on the {len(data.x_test)} test images")
    measured = [(label, evaluate(path, data.x_test, data.y_test, runs=10).to_dict())
                for label, path in (("original (float)", original_path),
                                    (f"planned for {profile.name} (int8/int4)", planned_path),
                                    (f"uniform {method}, same bytes (float)", uniform_path))]
    log(comparison(measured))
    for label, m in measured:
        if m["accuracy_default_session"] is not None:  # x86 without VNNI: say what users' default session gets
            log(f"  {label}: top-1 in {m['arithmetic']}, which is what {profile.name} computes; onnxruntime's "
                f"default session gets {m['accuracy_default_session']:.4f} here (--target host gives such CPUs "
                "7-bit int8 weights)")
    log(f"  on {profile.name} ({profile.clock_hz / 1e6:.0f} MHz, latency modelled): {plan.before['latency_ms']:.1f} ms "
        f"-> {plan.after['latency_ms']:.1f} ms a sample; peak live activations {plan.after['ram_bytes']:,.0f} B of "
        f"{profile.ram_bytes:,}")

    log(f"[6/{STEPS}] the front: estimated loss against weight bytes, one pricing, many budgets")
    fractions = [0.02, 0.03, 0.05, 0.1, 0.2, 0.5]
    points, plans = front(pricing, fractions)
    fit = split_holdout(calib)[0]
    for i in (0, 3):  # two more points measured as written (QDQ in onnxruntime), to set the estimates against
        if plans[i].feasible:
            log(f"  measuring the {fractions[i]:.0%} point on the test set")
            module, _ = apply_plan(model, plans[i], calib=fit)
            points[i]["accuracy"] = quantized_accuracy(module, plans[i], fit, calib[:2],
                                                       (data.x_test, data.y_test))
    front_result = {"model": original_path, "target": profile.name, "before": pricing.before,
                    "original_accuracy": measured[0][1]["accuracy"], "points": points,
                    "target_fit": target_fit(pricing)}
    planned_point = {"budget": keep, "feasible": True, "est_loss": plan.est_loss,
                     "accuracy": measured[1][1]["accuracy"],
                     **{k: plan.after[k] for k in ("params", "weight_bytes", "latency_ms", "ram_bytes")}}
    front_result["points"] = sorted(points + [planned_point], key=lambda p: p["budget"])
    front_png = os.path.join(out_dir, "front.png")
    plot_front(front_result, front_png)
    log("\n".join(front_lines(front_result, profile)))

    log(f"[7/{STEPS}] C99 for {profile.name}: export, build on this host, run against the golden model")
    info = export_c(read_onnx(planned_path), c_dir, target=profile)
    log(f"  wrote {c_dir}: {info['ops']} ops, flash (weights) {info['weight_bytes']:,} B of "
        f"{profile.flash_bytes:,}, RAM (arena) {info['arena_bytes']:,} B of {profile.ram_bytes:,}")
    missing = qemu_tools_missing()
    board = None if missing else next((b for b, cpu in BOARDS.items() if cpu == profile.name), None)
    c_result = run_c(c_dir, data.x_test[:c_samples], data.y_test[:c_samples], qemu=board, qemu_samples=3,
                     progress=lambda m: log("  " + m))
    log(f"  C on this host: top-1 {c_result['accuracy']:.4f} on the first {c_result['samples']} test images (the "
        f"QDQ file in onnxruntime: {c_result['onnx_accuracy']:.4f}); {c_result['golden_mismatches']} output values "
        "differ from the golden model")
    if board:
        log(f"  under qemu ({board}): outputs identical to the host's: {c_result['qemu_matches_host']}; "
            f"{c_result['instructions_per_mac']:.2f} instructions per MAC; flash (code + weights) "
            f"{c_result['flash_bytes']:,} B, RAM (static + stack) {c_result['ram_bytes']:,} B")
    else:
        log(f"  not run under qemu: {missing}; then run the demo again to see it on an emulated Cortex-M")

    seconds = time.time() - t_start
    summary = {"dataset": data.name, "target": profile.name, "max_weight_bytes": max_weight_bytes,
               "seconds": seconds, "reused_training": reused, "models": dict(measured), "plan": plan.to_dict(),
               "uniform_keep": keep, "front": front_result, "c": c_result, "files": {
                   "original": original_path, "planned": planned_path, "uniform": uniform_path,
                   "front": front_png, "c": c_dir}}
    write_json_atomic(os.path.join(out_dir, "demo.json"), summary)
    base, planned, flat = (m for _label, m in measured)
    log(f"done in {seconds:.0f}s. planned: {100 * (planned['accuracy'] - base['accuracy']):+.2f} pt at "
        f"{planned['weight_bytes'] / base['weight_bytes']:.1%} of the weight bytes; uniform at the same bytes: "
        f"{100 * (flat['accuracy'] - base['accuracy']):+.2f} pt. Files in {out_dir}: original.onnx, planned.onnx, "
        "uniform.onnx, front.png, c/, demo.json")
    return summary
