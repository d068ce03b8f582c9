"""Peak memory of `rankfold finetune` under --max-memory: the PP-OCRv4 recogniser (bench/realworld.py)
at half its parameters, a few distillation steps of 64 rendered lines, once under the default
limit and once under each --limits value; each run's peak resident memory, its micro-batch and
its losses.

    PYTHONPATH=. python -m bench.finetune_memory [--limits 4GB] [--steps 4]

The plan is made once (`compress --plan-out`, accepted whatever its self-check says: this bench
measures memory, not fidelity); every run then applies it and distils under bench.peak.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import numpy as np

from bench.peak import parse_peak
from bench.realworld import MODELS, RESULTS, TRAIN_SEED, fetch

OUT = os.path.join(RESULTS, "finetune-memory.json")


def _rankfold(*args: str) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-m", "bench.peak", *args], capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"rankfold {' '.join(args)} failed:\n{run.stderr[-2000:]}")
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.finetune_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--limits", default="4GB", help="--max-memory values to run under, besides the default")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lines", type=int, default=512, help="training lines (default 512)")
    parser.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "rankfold-field"))
    parser.add_argument("--work", default=os.path.join(RESULTS, "realworld-work"))
    args = parser.parse_args(argv)
    model = next(m for m in MODELS if m.name == "ppocr-rec")
    path = fetch(model, args.cache)
    os.makedirs(args.work, exist_ok=True)
    calib, train = (os.path.join(args.work, f"memory-{name}.npz") for name in ("calib", "train"))
    np.savez(calib, x=model.make_inputs(np.random.default_rng(1), 128))
    np.savez(train, x=model.make_inputs(np.random.default_rng(TRAIN_SEED), args.lines))
    plan = os.path.join(args.work, "memory-plan.json")
    _rankfold("compress", path, "--calib", calib, "--max-params", "50%", "--min-agreement", "0", "--force",
              "-o", os.path.join(args.work, "memory-planned.onnx"), "--plan-out", plan, "-q")
    rows = []
    for limit in [None, *filter(None, args.limits.split(","))]:
        run = _rankfold("finetune", path, "--plan", plan, "--calib", calib, "--train", train, "--steps",
                        str(args.steps), "--batch-size", "64", "--log-every", "1", "--min-agreement", "0", "--force",
                        "-o", os.path.join(args.work, "memory-tuned.onnx"),
                        *(["--max-memory", limit] if limit else []))
        micro = re.search(r"micro-batches of (\d+)", run.stderr)
        losses = [float(v) for v in re.findall(r"step \d+/\d+: loss ([0-9.]+)", run.stderr)]
        rows.append({"max_memory": limit or "default", "peak_rss_gb": parse_peak(run.stderr) / 1e9,
                     "micro_batch": int(micro.group(1)) if micro else 64, "losses": losses})
        print(json.dumps(rows[-1]), flush=True)
    with open(OUT, "w") as handle:
        json.dump({"model": model.package + " " + model.member, "steps": args.steps, "batch": 64, "rows": rows},
                  handle, indent=1)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
