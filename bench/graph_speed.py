"""How fast rankfold runs a field network's ONNX graph in torch, against another checkout's reader,
side by side. Every pass over calibration data runs it (statistics, fitting, rounding, the
checks), so its speed is most of a compress run's time:

    PYTHONPATH=. python -m bench.graph_speed --baseline OTHER_CHECKOUT/src [--models ppocr-rec,ppocr-det]
                                             [--rounds 3] [--passes 3]

For each model of bench/realworld.py (fetched into --cache as that bench does), a batch of its own
inputs (about three million numbers: 64 text lines, 4 pages) is read by each side's load_onnx in a
process of its own; each process times --passes forward passes (no gradient) and forward +
backward passes after one warm-up of each. The sides alternate --rounds times (the machines are
shared and noisy); the medians and their ratio are printed and written to
bench/results/graph-speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
BATCH_NUMBERS = 3_000_000  # numbers per timed batch: 64 lines of 48 x 320, 2 pages of 640 x 640 (x3)


def time_passes(path: str, batch_file: str, passes: int) -> dict[str, list[float]]:
    """Seconds of each forward and forward + backward pass of the graph at `path` on the batch."""
    import torch

    from rankfold import load_onnx

    x = torch.from_numpy(np.load(batch_file)["x"])
    model = load_onnx(path, probe=x[:2]).eval()

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def backward() -> None:
        out = model(x.clone().requires_grad_(True))
        sum(o.float().square().mean() for o in (out if isinstance(out, tuple) else (out,))).backward()

    times: dict[str, list[float]] = {}
    for name, run in (("forward", forward), ("forward+backward", backward)):
        run()  # warm-up
        times[name] = []
        for _ in range(passes):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def _side(src: str, path: str, batch_file: str, passes: int) -> dict[str, list[float]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.abspath(src), ROOT])}
    proc = subprocess.run([sys.executable, "-m", "bench.graph_speed", "--worker", path, batch_file, str(passes)],
                          capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{src}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    from bench.realworld import MODELS, fetch
    from rankfold.runtime import cpu_summary

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="the src folder of the checkout to compare with")
    parser.add_argument("--models", default="ppocr-rec,ppocr-det,ppocr-cls,yolov8n")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "rankfold-field"))
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        path, batch_file, passes = args.worker
        print(json.dumps(time_passes(path, batch_file, int(passes))))
        return 0
    if not args.baseline:
        parser.error("--baseline: the src folder of the checkout to compare with")
    sides = {"this": os.path.join(ROOT, "src"), "baseline": args.baseline}
    by_name = {m.name: m for m in MODELS}
    rows = []
    with tempfile.TemporaryDirectory(prefix="rankfold-speed-") as scratch:
        for name in args.models.split(","):
            model = by_name[name]
            path = fetch(model, args.cache)
            sample = model.make_inputs(np.random.default_rng(0), 1)
            count = max(1, min(64, BATCH_NUMBERS // sample[0].size))
            batch_file = os.path.join(scratch, f"{name}.npz")
            np.savez(batch_file, x=model.make_inputs(np.random.default_rng(0), count).astype(np.float32))
            times: dict[str, dict[str, list[float]]] = {side: {} for side in sides}
            for _ in range(args.rounds):
                for side, src in sides.items():
                    for kind, seconds in _side(src, path, batch_file, args.passes).items():
                        times[side].setdefault(kind, []).extend(seconds)
            row = {"model": name, "batch": count}
            for kind in ("forward", "forward+backward"):
                this, base = (statistics.median(times[side][kind]) for side in ("this", "baseline"))
                row[kind] = {"this_s": round(this, 3), "baseline_s": round(base, 3), "ratio": round(this / base, 3)}
            print(f"{name} (batch {count}): " + "; ".join(
                f"{kind} {row[kind]['this_s']} s against {row[kind]['baseline_s']} s (x{row[kind]['ratio']})"
                for kind in ("forward", "forward+backward")), flush=True)
            rows.append(row)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "graph-speed.json"), "w") as handle:
        json.dump({"cpu": cpu_summary(), "baseline": args.baseline,
                   "rounds": args.rounds, "passes": args.passes, "rows": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
