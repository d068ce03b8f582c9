"""Measure ONNX models side by side in one run: top-1 on a data set, size, and onnxruntime
latency (1 thread, batch 1 and 32), the models' timed runs interleaved so that machine drift
hits all alike; ratios are to the first model.

    python -m bench.side_by_side ORIGINAL.onnx OTHER.onnx ... --data test.npz [--rounds 50] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort

from rankfold.data import load_npz
from rankfold.evaluate import accuracy, onnx_size
from rankfold.runtime import session


def _session(path: str) -> ort.InferenceSession:
    return session(path, threads=1)


def interleaved_latency_ms(paths: list[str], sample: np.ndarray, rounds: int) -> list[float]:
    """Median over `rounds` of one timed run per model per round, models in turn."""
    sessions = [_session(p) for p in paths]
    feeds = [{s.get_inputs()[0].name: sample} for s in sessions]
    for s, f in zip(sessions, feeds):
        for _ in range(5):
            s.run(None, f)
    times = [[] for _ in paths]
    for r in range(rounds):
        order = range(len(paths)) if r % 2 == 0 else reversed(range(len(paths)))
        for i in order:
            t0 = time.perf_counter()
            sessions[i].run(None, feeds[i])
            times[i].append(1000 * (time.perf_counter() - t0))
    return [statistics.median(t) for t in times]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data", required=True)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    data = load_npz(args.data)
    x, y = (data.x[: args.limit], data.y[: args.limit]) if args.limit else (data.x, data.y)
    b1 = interleaved_latency_ms(args.models, x[:1], args.rounds)
    b32 = interleaved_latency_ms(args.models, x[:32], max(10, args.rounds // 5))
    rows = []
    for path, l1, l32 in zip(args.models, b1, b32):
        size = onnx_size(path)
        rows.append({"model": path, "accuracy": accuracy(path, x, y), "params": size.params,
                     "weight_bytes": size.weight_bytes, "file_bytes": size.file_bytes, "macs": size.macs,
                     "latency_ms_b1": l1, "latency_ms_b32": l32})
    ref = rows[0]
    print(f"{'model':40} {'top-1':>7} {'params':>8} {'MACs':>8} {'b1 ms':>8} {'b1':>6} {'b32 ms':>8} {'b32':>6}")
    for r in rows:
        print(f"{r['model'][-40:]:40} {r['accuracy']:>7.4f} {r['params'] / ref['params']:>8.1%} "
              f"{r['macs'] / ref['macs']:>8.1%} {r['latency_ms_b1']:>8.3f} "
              f"{r['latency_ms_b1'] / ref['latency_ms_b1']:>6.1%} {r['latency_ms_b32']:>8.2f} "
              f"{r['latency_ms_b32'] / ref['latency_ms_b32']:>6.1%}")
    print(f"({len(x)} samples; latency: onnxruntime CPU, 1 thread, median of {args.rounds} interleaved runs)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
