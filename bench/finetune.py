"""Post-training against fine-tuned (distillation), through the CLI as a user runs it.

    python -m bench.finetune                                   # ResNet-18 at 3 % of its parameters
    python -m bench.finetune --budget max-weight-bytes=0.75% --target cortex-m4
    python -m bench.finetune --nproc 2                         # the same under torchrun (gloo)
    python -m bench.finetune --budget max-weight-bytes=0.75% --target cortex-m4 --steps 600 --qat-steps lsq --reuse

Steps: `rankfold compress` (post-training, plan written), `rankfold eval` on the 10,000 test
images, `rankfold finetune --plan` on the first --train-images training images for --minutes,
`rankfold eval` again. The data is ../shared/data's Fashion-MNIST .npz (fmnist_npz.py writes
it); the reference network is ../shared/models/resnet18-fmnist.onnx (0.9542). Appends a row to
bench/results/finetune.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(BENCH_DIR, "..", "..", "shared")
RESULTS = os.path.join(BENCH_DIR, "results", "finetune.json")


def rankfold(*args: str, nproc: int = 1) -> str:
    """Run the CLI (under torchrun with `nproc` > 1); its stdout, or SystemExit with its stderr."""
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "rankfold.cli", *args]
    else:
        command = [sys.executable, "-m", "rankfold.cli", *args]
    done = subprocess.run(command, capture_output=True, text=True)
    sys.stderr.write(done.stderr[-4000:])
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr[-2000:]}")
    return done.stdout


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def accuracy(model: str, test: str) -> float:
    return json.loads(rankfold("eval", model, "--data", test, "--no-latency", "--json"))["accuracy"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(SHARED, "models", "resnet18-fmnist.onnx"))
    ap.add_argument("--data", default="/tmp/rankfold-fmnist", help="directory of fmnist-{train,test,calib}.npz")
    ap.add_argument("--budget", default="max-params=3%", help="FLAG=VALUE of compress, e.g. max-weight-bytes=0.75%%")
    ap.add_argument("--target", default="host")
    ap.add_argument("--minutes", type=float, default=25.0)
    ap.add_argument("--steps", type=int, help="exactly this many steps instead of --minutes (to compare runs)")
    ap.add_argument("--train-images", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", default="3e-4")
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--work", default="/tmp/rankfold-bench-finetune")
    ap.add_argument("--qat-steps", choices=("max-abs", "lsq"), default="max-abs",
                    help="finetune --qat-steps: the quantized layers' weight steps, the exporter's or learned")
    ap.add_argument("--qat-activations", choices=("calibrated", "lsq"), default="calibrated",
                    help="finetune --qat-activations: the quantized layers' input steps, calibrated or learned")
    ap.add_argument("--reuse", action="store_true", help="keep the post-training result and plan of an earlier run")
    args = ap.parse_args(argv)
    if not os.path.exists(os.path.join(args.data, "fmnist-train.npz")):
        subprocess.run([sys.executable, os.path.join(SHARED, "data", "fmnist_npz.py"), args.data], check=True)
    data = {k: os.path.join(args.data, f"fmnist-{k}.npz") for k in ("train", "test", "calib")}
    os.makedirs(args.work, exist_ok=True)
    flag, value = args.budget.split("=", 1)
    tag = f"{flag}-{value.rstrip('%')}-{args.target}-p{args.nproc}"
    post, plan = (os.path.join(args.work, f"{tag}-{name}") for name in ("post.onnx", "plan.json"))
    variant = args.qat_steps + ("" if args.qat_activations == "calibrated" else "-act-lsq")
    tuned = os.path.join(args.work, f"{tag}-{variant}-ft.onnx")
    t0 = time.time()
    if not (args.reuse and os.path.exists(post) and os.path.exists(plan)):
        rankfold("compress", args.model, "--calib", data["calib"], f"--{flag}", value, "--target", args.target,
                 "-o", post, "--plan-out", plan, "--force", "-q")
    compress_s = time.time() - t0
    t0 = time.time()
    out = rankfold("finetune", args.model, "--plan", plan, "--calib", data["calib"], "--train", data["train"],
                   "--train-limit", str(args.train_images),
                   *(["--steps", str(args.steps)] if args.steps else ["--minutes", str(args.minutes)]), "--batch-size",
                   str(args.batch_size), "--lr", args.lr, "--qat-steps", args.qat_steps,
                   "--qat-activations", args.qat_activations, "-o", tuned, "--force",
                   "--report", tuned + ".json",
                   nproc=args.nproc)
    finetune_s = time.time() - t0
    report = json.load(open(tuned + ".json"))
    row = {"model": os.path.basename(args.model), "budget": args.budget, "target": args.target,
           "original": accuracy(args.model, data["test"]), "post_training": accuracy(post, data["test"]),
           "fine_tuned": accuracy(tuned, data["test"]), "params_after": report["after"]["params"],
           "weight_bytes_after": report["after"].get("weight_bytes"), "train_images": args.train_images,
           "steps": report["finetune"]["steps"], "samples_seen": report["finetune"]["samples_seen"],
           "processes": args.nproc, "train_seconds": report["finetune"]["seconds"],
           "finetune_command_seconds": round(finetune_s, 1), "compress_seconds": round(compress_s, 1),
           "lr": args.lr, "batch_size": args.batch_size, "qat_steps": args.qat_steps,
           "qat_activations": args.qat_activations, "cpu": cpu_name(),
           "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "stdout": out.strip().splitlines()}
    print(json.dumps({k: v for k, v in row.items() if k != "stdout"}, indent=1))
    rows = json.load(open(RESULTS)) if os.path.exists(RESULTS) else []
    rows.append(row)
    with open(RESULTS + ".part", "w") as handle:
        json.dump(rows, handle, indent=1)
    os.replace(RESULTS + ".part", RESULTS)


if __name__ == "__main__":
    main()
