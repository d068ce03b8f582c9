"""How much a field network's compressed fidelity moves with the calibration draw alone: the same
budget planned on calibration inputs from several seeds (bench/realworld.py's makers), each result
measured on the same fresh inputs (seed 2, as the bench's) by the model's own measure, in
onnxruntime. A change to the planner is judged against this spread, not against one draw:
PP-OCRv4 rec at half its parameters read from 0.807 to 0.879 of the same fresh lines alike as
the planner's noise seed and the calibration size changed (main f3b94bb).

    PYTHONPATH=. python -m bench.plan_spread                                  # ppocr-rec, 50 % params
    PYTHONPATH=. python -m bench.plan_spread --models ppocr-rec --calib 512,1024 --seeds 1,4,5
    PYTHONPATH=. python -m bench.plan_spread --models ppocr-det --budget=--max-weight-bytes=10%

Each draw runs `rankfold compress` as the bench does, with a self-check that accepts anything
(every draw is measured, including those the default check would refuse). Writes
bench/results/plan-spread.json (one entry per model, budget and calibration size, replaced when
run again).
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

from bench.realworld import BENCH_DIR, CALIB_INPUTS, MODELS, RESULTS, fetch, ort_outputs
from rankfold.runtime import cpu_summary

FRESH_SEED = 2  # the bench's fresh inputs
OUT = os.path.join(RESULTS, "plan-spread.json")
ACCEPT_ANYTHING = ["--min-agreement", "0", "--max-output-error", "1e30"]


def spread(values: list[float]) -> dict:
    """Median, range and values of one set of draws."""
    return {"median": statistics.median(values), "low": min(values), "high": max(values), "values": values}


def replaced(entries: list[dict], entry: dict) -> list[dict]:
    """`entries` with `entry` in place of the one of its model, budget and calibration size."""
    key = ("model", "budget", "calibration")
    return [e for e in entries if [e[k] for k in key] != [entry[k] for k in key]] + [entry]


def planned_fidelity(model, path: str, calib: np.ndarray, budget: list[str], fresh: np.ndarray,
                     reference: list[np.ndarray], scratch: str) -> tuple[float, float]:
    """(fidelity on the fresh inputs, seconds of `rankfold compress`) of one calibration draw, run
    as the bench runs it, with a check that accepts anything."""
    data, out = os.path.join(scratch, "calib.npz"), os.path.join(scratch, "draw.onnx")
    np.savez(data, **model.npz_arrays(calib))
    command = [sys.executable, "-m", "rankfold.cli", "compress", path, "--calib", data, "--calib-limit",
               str(len(calib)), "-o", out, "--force", "-q", *budget, *ACCEPT_ANYTHING]
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=os.path.dirname(BENCH_DIR))
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return model.measure(reference, ort_outputs(out, fresh, given_once=model.given_once)), seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ppocr-rec")
    parser.add_argument("--budget", default="--max-params=50%",
                        help="a compress budget option and its value, e.g. --max-weight-bytes=10%% "
                             "(default --max-params=50%%)")
    parser.add_argument("--calib", default="", help="calibration sizes, comma-separated (default: the bench's)")
    parser.add_argument("--seeds", default="1,4,5", help="calibration seeds (1 is the bench's own draw)")
    parser.add_argument("--fresh", type=int, default=512, help="fresh inputs (default 512)")
    parser.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "rankfold-field"))
    args = parser.parse_args(argv)
    unknown = set(args.models.split(",")) - {m.name for m in MODELS}
    if unknown or not args.budget.startswith("--max-") or "=" not in args.budget:
        parser.error(f"unknown --models {sorted(unknown)}" if unknown else
                     f"--budget {args.budget!r}: expected an option and its value, e.g. --budget=--max-params=50%")
    budget = args.budget.split("=", 1)
    seeds = [int(s) for s in args.seeds.split(",")]
    saved = json.load(open(OUT)) if os.path.isfile(OUT) else {"entries": []}
    for model in (m for m in MODELS if m.name in args.models.split(",")):
        path = fetch(model, args.cache)
        fresh = model.make_inputs(np.random.default_rng(FRESH_SEED), args.fresh)
        reference = ort_outputs(path, fresh, given_once=model.given_once)
        for count in [int(c) for c in args.calib.split(",") if c] or [model.calib or CALIB_INPUTS]:
            draws = []
            with tempfile.TemporaryDirectory(prefix="plan-spread-") as scratch:
                for seed in seeds:
                    calib = model.make_inputs(np.random.default_rng(seed), count)
                    fidelity, seconds = planned_fidelity(model, path, calib, budget, fresh, reference, scratch)
                    draws.append({"seed": seed, "fidelity": round(fidelity, 4), "seconds": round(seconds, 1)})
                    print(f"[{model.name}] {' '.join(budget)}, {count} calibration inputs from seed {seed}: "
                          f"{model.measure_name} {fidelity:.4f} ({seconds:.0f} s)", file=sys.stderr, flush=True)
            entry = {"model": model.name, "budget": args.budget, "calibration": count, "fresh": args.fresh,
                     "measure": model.measure_name, "draws": draws,
                     **spread([d["fidelity"] for d in draws]), "cpu": cpu_summary()}
            print(f"[{model.name}] {count} calibration inputs: median {entry['median']:.4f}, "
                  f"{entry['low']:.4f} to {entry['high']:.4f}", flush=True)
            saved["entries"] = replaced(saved["entries"], entry)
            with open(OUT, "w") as handle:
                json.dump(saved, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
