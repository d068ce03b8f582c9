"""Robustness through compression: clean, PGD, FGSM and transfer top-1 of the original, of plain
rankfold, of rankfold --preserve-robustness (post-training: PGD inputs in the calibration) and,
at --distil-budgets, of --preserve-robustness with --train (adversarial distillation), at several
budgets.

    python -m bench.robustness                                   # ResNet-18, VGG, MobileNetV2 (about 1 h)
    python -m bench.robustness --networks resnet18 --budgets max-params=10% --samples 1000

Each compression runs through the CLI as a user runs it (`rankfold compress ... --report`). Clean
top-1 is on the 10,000 Fashion-MNIST test images; the attacks on the first --samples of them, with
eps in pixel units (the networks' inputs are (pixel - 0.2860) / 0.3530). White-box PGD and FGSM
craft on each model as it runs (a QDQ model through its straight-through twin) and are judged in
onnxruntime on the file; the transfer attack reuses the PGD inputs crafted on the original. Writes
bench/results/robustness.json, .md and a plot.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from bench.finetune import cpu_name

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(BENCH_DIR, "..", "..", "shared")
RESULTS = os.path.join(BENCH_DIR, "results")
NETWORKS = {"resnet18": os.path.join(SHARED, "models", "resnet18-fmnist.onnx"),
            "vgg": os.path.join(BENCH_DIR, "models", "vgg-fmnist.onnx"),
            "mobilenetv2": os.path.join(BENCH_DIR, "models", "mobilenetv2-fmnist.onnx")}
BUDGETS = ("max-params=10%", "max-params=25%", "max-params=50%", "max-weight-bytes=3%")
PIXEL_MEAN, PIXEL_STD = 0.2860, 0.3530


MODES = {"rankfold": [], "preserve": ["--preserve-robustness"],
         "preserve+distil": ["--preserve-robustness", "--train", "TRAIN", "--finetune-steps", "STEPS"]}


def compress(model: str, calib: str, budget: str, out: str, mode: str, eps: float, train: str, steps: int,
             reuse: bool) -> dict:
    """`rankfold compress` as a user runs it (skipped with `reuse` when `out` exists); the size
    ratios measured on the file, and the wall time."""
    from rankfold.evaluate import onnx_size

    flag, value = budget.split("=", 1)
    extra = [{"TRAIN": train, "STEPS": str(steps)}.get(word, word) for word in MODES[mode]]
    if extra:
        extra += ["--eps", str(eps), "--pixel-mean", str(PIXEL_MEAN), "--pixel-std", str(PIXEL_STD)]
    command = [sys.executable, "-m", "rankfold.cli", "compress", model, "--calib", calib, f"--{flag}", value,
               "-o", out, "--force", "-q", *extra]
    t0 = time.time()
    seconds: float | str = "reused"
    if not (reuse and os.path.exists(out)):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else
                    f"exit {done.returncode}"}
        seconds = round(time.time() - t0, 1)
    before, after = onnx_size(model), onnx_size(out)
    return {"seconds": seconds, "params": after.params, "weight_bytes": after.weight_bytes,
            "params_ratio": after.params / before.params,
            "weight_bytes_ratio": after.weight_bytes / before.weight_bytes,
            "command": " ".join(["rankfold", *command[3:]])}


def measure(path: str, test: dict, attack_x: np.ndarray, attack_y: np.ndarray, transfer_x: np.ndarray | None,
            eps: float, original: bool = False) -> dict:
    """Clean top-1 (all test images), white-box PGD and FGSM, transfer (inputs crafted on the original).
    For the original itself, white-box PGD is the transfer set (same model, same seed: the same inputs)."""
    from rankfold.evaluate import accuracy, class_scores
    from rankfold.robustness import AttackConfig, robust_accuracy

    row = {"clean": accuracy(path, test["x"], test["y"])}
    if original:
        row["pgd"] = float((class_scores(path, transfer_x).argmax(1) == attack_y).mean())
        row["pgd_twin_agreement"] = 1.0
    for kind in ("fgsm",) if original else ("pgd", "fgsm"):
        config = AttackConfig(kind, (eps,), pixel_mean=(PIXEL_MEAN,), pixel_std=(PIXEL_STD,))
        [result] = robust_accuracy(path, attack_x, attack_y, config)
        row[kind] = result.adversarial_accuracy
        row[f"{kind}_twin_agreement"] = result.twin_agreement
        row["gradients"] = result.gradients
    if transfer_x is not None:
        row["transfer"] = float((class_scores(path, transfer_x).argmax(1) == attack_y).mean())
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--networks", default=",".join(NETWORKS))
    ap.add_argument("--budgets", default=",".join(BUDGETS))
    ap.add_argument("--eps", type=float, default=0.01, help="attack size in pixel units (default 0.01)")
    ap.add_argument("--samples", type=int, default=1000, help="test images attacked (default 1000)")
    ap.add_argument("--distil-budgets", default="max-params=10%,max-weight-bytes=3%",
                    help="budgets that also get preserve+distil (adversarial distillation; '' for none)")
    ap.add_argument("--distil-networks", default="resnet18")
    ap.add_argument("--finetune-steps", type=int, default=200)
    ap.add_argument("--reuse", action="store_true", help="measure compressed files of an earlier run in --work")
    ap.add_argument("--data", default="/tmp/rankfold-fmnist", help="directory of fmnist-{test,calib}.npz")
    ap.add_argument("--work", default="/tmp/rankfold-bench-robustness")
    ap.add_argument("--out", default=os.path.join(RESULTS, "robustness"))
    ap.add_argument("--keep", default=None,
                    help="an earlier results .json: its rows (same eps and samples) are kept, not measured again")
    args = ap.parse_args(argv)
    from rankfold.robustness import AttackConfig, attack_twin, craft

    if not os.path.exists(os.path.join(args.data, "fmnist-test.npz")):
        subprocess.run([sys.executable, os.path.join(SHARED, "data", "fmnist_npz.py"), args.data], check=True)
    test = dict(np.load(os.path.join(args.data, "fmnist-test.npz")))
    calib, train = (os.path.join(args.data, f"fmnist-{k}.npz") for k in ("calib", "train"))
    attack_x, attack_y = test["x"][: args.samples], test["y"][: args.samples]
    os.makedirs(args.work, exist_ok=True)
    kept = kept_rows(args.keep, args.eps, args.samples)
    rows = []
    for name in args.networks.split(","):
        model = NETWORKS[name]
        t0 = time.time()
        pgd = AttackConfig("pgd", (args.eps,), pixel_mean=(PIXEL_MEAN,), pixel_std=(PIXEL_STD,))
        cached = os.path.join(args.work, f"{name}-pgd-eps{args.eps:g}-n{args.samples}.npy")
        if os.path.exists(cached):
            transfer_x = np.load(cached)
        else:
            transfer_x = craft(attack_twin(model)[0], attack_x, attack_y, pgd, args.eps)
            np.save(cached + ".part.npy", transfer_x)
            os.replace(cached + ".part.npy", cached)
        original = kept.get((name, "original", "original")) or \
            {"network": name, "budget": "original", "mode": "original",
             **measure(model, test, attack_x, attack_y, transfer_x, args.eps, original=True),
             "seconds": round(time.time() - t0, 1)}
        rows.append(original)
        print(json.dumps(original), flush=True)
        distilled = args.distil_budgets.split(",") if name in args.distil_networks.split(",") else []
        for budget in args.budgets.split(","):
            for mode in [m for m in MODES if m != "preserve+distil" or budget in distilled]:
                row = kept.get((name, budget, mode))
                if row is None:
                    out = os.path.join(args.work, f"{name}-{budget.replace('=', '-').rstrip('%')}-{mode}.onnx")
                    row = {"network": name, "budget": budget, "mode": mode,
                           **compress(model, calib, budget, out, mode, args.eps, train, args.finetune_steps,
                                      args.reuse)}
                    if "error" not in row:
                        row.update(measure(out, test, attack_x, attack_y, transfer_x, args.eps))
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta = {"eps": args.eps, "eps_units": "pixels in [0, 1]", "samples": args.samples, "steps": 10,
            "finetune_steps": args.finetune_steps,
            "cpu": cpu_name(), "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    write(args.out, meta, rows)


def kept_rows(path: str | None, eps: float, samples: int) -> dict:
    """Rows of an earlier run, by (network, budget, mode), when it attacked the same way."""
    if path is None:
        return {}
    with open(path) as handle:
        earlier = json.load(handle)
    if (earlier["meta"]["eps"], earlier["meta"]["samples"]) != (eps, samples):
        raise SystemExit(f"--keep {path}: measured at eps {earlier['meta']['eps']} on {earlier['meta']['samples']} "
                         f"samples, this run uses eps {eps} on {samples}")
    return {(r["network"], r["budget"], r["mode"]): {**r, "kept_from": os.path.basename(path)}
            for r in earlier["rows"]}


def write(out: str, meta: dict, rows: list[dict]) -> None:
    with open(out + ".json.part", "w") as handle:
        json.dump({"meta": meta, "rows": rows}, handle, indent=1)
    os.replace(out + ".json.part", out + ".json")
    lines = [f"Clean top-1 on 10,000 test images; PGD (10 steps), FGSM and transfer (PGD inputs crafted on the "
             f"original) on the first {meta['samples']}, eps {meta['eps']} in pixels; {meta['cpu']}, "
             f"{meta['cores']} cores, {meta['date']}.", "",
             "| network | budget | model | params | weight bytes | clean | PGD | FGSM | transfer | compress s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['network']} | {r['budget']} | {r['mode']} | | | | | | | {r['error']} |")
            continue
        size = ("100%", "100%") if r["mode"] == "original" else \
            (f"{r['params_ratio']:.1%}", f"{r['weight_bytes_ratio']:.1%}")
        lines.append(f"| {r['network']} | {r['budget']} | {r['mode']} | {size[0]} | {size[1]} | {r['clean']:.4f} | "
                     f"{r['pgd']:.3f} | {r['fgsm']:.3f} | {r.get('transfer', float('nan')):.3f} | "
                     f"{r.get('seconds', '')} |")
    with open(out + ".md", "w") as handle:
        handle.write("\n".join(lines) + "\n")
    plot(out + ".png", rows, meta)


def plot(path: str, rows: list[dict], meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    networks = list(dict.fromkeys(r["network"] for r in rows))
    fig, axes = plt.subplots(1, len(networks), figsize=(5 * len(networks), 4), squeeze=False)
    for ax, name in zip(axes[0], networks):
        mine = [r for r in rows if r["network"] == name and "error" not in r]
        original = next(r for r in mine if r["mode"] == "original")
        ax.axhline(original["pgd"], color="k", linestyle="--", label="original PGD")
        for mode, marker in (("rankfold", "o"), ("preserve", "s"), ("preserve+distil", "^")):
            points = sorted((r["weight_bytes_ratio"], r["pgd"]) for r in mine if r["mode"] == mode)
            if points:
                ax.plot(*zip(*points), marker=marker, label=f"{mode} PGD")
        ax.set_xscale("log")
        ax.set_xlabel("weight bytes (fraction of the float original)")
        ax.set_ylabel(f"PGD top-1 at eps {meta['eps']} (pixels)")
        ax.set_title(name)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
