"""How fast onnxruntime runs a weight-only file as rankfold writes it, against the float original
and against the same codes behind DequantizeLinear nodes (the layout rankfold wrote before):

    PYTHONPATH=. python -m bench.weight_only [--model PATH] [--runs 200] [--threads 2]
    PYTHONPATH=. python -m bench.weight_only --files A.onnx B.onnx ... --feeds DATA.npz


ResNet-18 (../shared/models/resnet18-fmnist.onnx) with every Conv and its Gemm int8, weight-only
(float activations): no onnxruntime kernel takes integer weights with float inputs, so a
DequantizeLinear runs at every call; rankfold scales the codes by a Cast and a Mul of constants,
which onnxruntime folds into float weights at load. The three sessions are timed in one run,
interleaved call by call (the machines are shared and noisy), median of --runs calls at batch 1.
With --files, those files are timed the same way on the first sample of --feeds (one array per
input, by name: a calibration .npz), each output's cosine to the first file's printed beside.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import onnx
from onnx import helper

DEFAULT_MODEL = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "models", "resnet18-fmnist.onnx")


def as_dequantize_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with each Cast + Mul that scales integer codes written as one DequantizeLinear (per
    output channel, axis 0 for a Conv's weight, a Gemm's as its scale lies): the same values."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    made = {o: n for n in graph.node for o in n.output}
    inits = {t.name: t for t in graph.initializer}
    drop, nodes = set(), []
    for node in graph.node:
        cast = made.get(node.input[0]) if node.op_type == "Mul" else None
        if cast is None or cast.op_type != "Cast" or cast.input[0] not in inits or node.input[1] not in inits:
            nodes.append(node)
            continue
        scale = inits[node.input[1]]
        dims = list(scale.dims)
        axis = next((i for i, d in enumerate(dims) if d > 1), 0)
        flat = onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(scale).reshape(-1), scale.name)
        scale.CopyFrom(flat)
        attrs = {"axis": axis} if flat.dims[0] > 1 else {}
        nodes.append(helper.make_node("DequantizeLinear", [cast.input[0], node.input[1]], [node.output[0]],
                                      name=f"{node.name}_dq", **attrs))
        drop.add(id(cast))
    del graph.node[:]
    graph.node.extend(n for n in nodes if id(n) not in drop)
    return out


def interleaved(sessions: dict, feeds: dict, runs: int) -> dict[str, float]:
    """Median seconds a call of each session, timed in turn call by call."""
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(runs):
        for key, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds)
            times[key].append(time.perf_counter() - start)
    return {k: float(np.median(t)) for k, t in times.items()}


def quiet_sessions(files: dict[str, str], threads: int) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # Interleaved sessions: threads that spin after a call would take the cores from the next
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return {k: ort.InferenceSession(p, options, providers=["CPUExecutionProvider"]) for k, p in files.items()}


def time_files(files: list[str], feeds_path: str, runs: int, threads: int) -> int:
    data = np.load(feeds_path)
    feeds = {name: data[name][:1] for name in data.files}
    sessions = quiet_sessions({os.path.basename(f): f for f in files}, threads)
    first = None
    medians = interleaved(sessions, feeds, runs)
    for path, (key, session) in zip(files, sessions.items()):
        out = session.run(None, feeds)[0].astype(np.float64).reshape(-1)
        first = out if first is None else first
        cosine = float(out @ first / np.linalg.norm(out) / np.linalg.norm(first))
        print(f"{key:40s} {medians[key] * 1e3:8.3f} ms  {os.path.getsize(path):,} B  cosine to the first {cosine:.5f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join("bench", "results", "weight-only.json"))
    parser.add_argument("--files", nargs="+", help="time these ONNX files instead")
    parser.add_argument("--feeds", help="with --files: an .npz of their inputs (the first sample is fed)")
    args = parser.parse_args(argv)
    if args.files:
        return time_files(args.files, args.feeds, args.runs, args.threads)
    import torch

    import rankfold
    from rankfold.quantize.export import export_quantized

    module = rankfold.load_onnx(args.model)
    shape = [d.dim_value or 1 for d in onnx.load(args.model).graph.input[0].type.tensor_type.shape.dim]
    calib = torch.randn(64, *shape[1:])
    layers = {name: 8 for name, m in module.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    with tempfile.TemporaryDirectory(prefix="rankfold-bench-") as scratch:
        written = os.path.join(scratch, "weight-only.onnx")
        export_quantized(module, layers, written, calib=calib, example_input=calib[:2], weight_only=True)
        before = os.path.join(scratch, "dequantize.onnx")
        onnx.save(as_dequantize_nodes(onnx.load(written)), before)
        files = {"float original": args.model, "weight-only, as rankfold writes it": written,
                 "weight-only, DequantizeLinear nodes": before}
        sessions = quiet_sessions(files, args.threads)
        sizes = {k: os.path.getsize(p) for k, p in files.items()}
    name = next(iter(sessions.values())).get_inputs()[0].name
    feeds = {name: calib[:1].numpy()}
    outputs = {k: s.run(None, feeds)[0] for k, s in sessions.items()}
    medians = interleaved(sessions, feeds, args.runs)
    base = medians["float original"]
    rows = [{"file": k, "ms": round(t * 1e3, 3), "vs_float": round(t / base, 2), "file_bytes": sizes[k]}
            for k, t in medians.items()]
    same = float(np.abs(outputs["weight-only, as rankfold writes it"] -
                        outputs["weight-only, DequantizeLinear nodes"]).max())
    for row in rows:
        print(f"{row['file']:40s} {row['ms']:8.3f} ms  x{row['vs_float']:.2f}  {row['file_bytes']:,} B")
    print(f"largest difference between the two weight-only files' outputs: {same:.2e}")
    with open(args.out, "w") as handle:
        json.dump({"model": os.path.basename(args.model), "threads": args.threads, "runs": args.runs,
                   "rows": rows, "max_output_difference": same}, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
