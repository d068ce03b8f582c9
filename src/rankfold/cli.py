"""The `rankfold` command line. Bad input ends in one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from rankfold.errors import RankfoldError


def _cmd_eval(args: argparse.Namespace) -> None:
    from rankfold.data import load_npz
    from rankfold.evaluate import evaluate
    from rankfold.frontends.onnx import read_onnx
    from rankfold.report import human

    read_onnx(args.model)  # a clear error for a bad model before any work
    data = load_npz(args.data)
    x, y = data.x, data.y
    if args.limit:
        x, y = x[: args.limit], y[: args.limit]
    result = evaluate(args.model, x, y, runs=args.runs, measure_latency=not args.no_latency)
    if args.json:
        print(json.dumps(result.to_dict()))
        return
    print(f"model           {args.model}")
    print(f"accuracy        {result.accuracy:.4f}  ({len(x)} samples)")
    print(f"parameters      {result.params:,} ({human(result.params)})")
    print(f"MACs            {result.macs:,} ({human(result.macs)}) per sample")
    print(f"weight bytes    {result.weight_bytes:,}")
    print(f"file bytes      {result.file_bytes:,}")
    if result.latency_ms_b1 is not None:
        print(f"latency b1      {result.latency_ms_b1:.3f} ms   (onnxruntime, 1 thread, median of {args.runs})")
        print(f"latency b32     {result.latency_ms_b32:.3f} ms")


def _cmd_compress(args: argparse.Namespace) -> None:
    import torch

    from rankfold.compress import compress_with_report
    from rankfold.config import check_keep, config_for_method
    from rankfold.data import check_input_shape, load_npz
    from rankfold.evaluate import onnx_size
    from rankfold.export.onnx import export_onnx
    from rankfold.frontends.onnx import load_onnx, read_onnx
    from rankfold.io import write_json_atomic
    from rankfold.report import layer_table

    try:
        check_keep(args.keep, "--keep")
        config_for_method(args.method)
    except ValueError as exc:
        raise RankfoldError(str(exc)) from None
    _check_output_dir(args.output)
    graph = read_onnx(args.model)
    model = load_onnx(args.model)
    calib = load_npz(args.calib, need_labels=False).x if args.calib else None
    if calib is not None:
        check_input_shape(calib, _input_dims(graph), args.calib)
        calib = calib[: args.calib_limit]
    example = torch.from_numpy(calib[:2]) if calib is not None else _example_input(graph)
    log = _log(args.quiet)
    log(f"compressing {args.model}: method={args.method} keep={args.keep} "
        f"{'data-aware, ' + str(len(calib)) + ' calibration samples' if calib is not None else 'data-free'}")
    t0 = time.time()
    compressed, report = compress_with_report(
        model, method=args.method, keep=args.keep, calib=None if calib is None else torch.from_numpy(calib),
        min_rank=args.min_rank, progress=lambda m: log("  " + m),
    )
    export_onnx(compressed, args.output, example_input=example)
    seconds = time.time() - t0
    before, after = onnx_size(args.model), onnx_size(args.output)
    print(layer_table(report))
    print(f"parameters {before.params:,} -> {after.params:,} ({after.params / before.params:.1%}), "
          f"MACs {before.macs:,} -> {after.macs:,} ({after.macs / max(before.macs, 1):.1%}), {seconds:.1f}s")
    print(f"wrote {args.output}")
    if args.report:
        write_json_atomic(args.report, {"model": args.model, "output": args.output, "method": args.method,
                                        "keep": args.keep, "seconds": seconds, "before": before.__dict__,
                                        "after": after.__dict__, **report.to_dict()})


def _cmd_demo(args: argparse.Namespace) -> None:
    from rankfold.demo import run_demo

    run_demo(args.out, epochs=args.epochs, keep=args.keep, method=args.method)


def _first_input(graph):
    inits = {i.name for i in graph.graph.initializer}
    return next(i for i in graph.graph.input if i.name not in inits)


def _input_dims(graph) -> list:
    """The first input's dims: ints where static, None where symbolic."""
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in _first_input(graph).type.tensor_type.shape.dim]


def _example_input(graph):
    import torch

    dims = _input_dims(graph)
    if any(d is None for d in dims[1:]):
        raise RankfoldError("the model's input has dynamic dimensions besides the batch: give --calib data")
    return torch.zeros(2, *dims[1:])


def _check_output_dir(path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise RankfoldError(f"{path}: the output directory {directory} does not exist")


def _log(quiet: bool):
    return (lambda _m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rankfold", description="Shrink trained networks for edge hardware.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("eval", help="measure an ONNX model: accuracy, size, MACs, latency",
                       description="Top-1 accuracy, parameters, MACs, weight/file bytes and onnxruntime latency "
                                   "(1 thread, median of --runs after warm-up) at batch 1 and 32.")
    p.add_argument("model", help="model .onnx")
    p.add_argument("--data", required=True, help=".npz with x (N, ...) float32 and y (N,) int labels")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--limit", type=int, default=0, help="use only the first N samples")
    p.add_argument("--runs", type=int, default=30, help="timed runs per latency (default 30)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("compress", help="factorize every compressible layer of an ONNX model",
                       description="Uniform low-rank compression: each compressible layer keeps --keep of its "
                                   "parameters. With --calib the data-aware decompositions are used.")
    p.add_argument("model", help="model .onnx")
    p.add_argument("-o", "--output", required=True, help="output .onnx")
    p.add_argument("--calib", help=".npz with x: calibration inputs (labels not needed)")
    p.add_argument("--calib-limit", type=int, default=512, help="use at most N calibration samples (default 512)")
    p.add_argument("--method", default="tucker2", help="svd | tucker2 | cp | spatial-svd | auto (default tucker2)")
    p.add_argument("--keep", type=float, default=0.5, help="fraction of each layer's parameters kept, in (0, 1]")
    p.add_argument("--min-rank", type=int, default=8, help="leave alone layers whose rank would fall below this")
    p.add_argument("--report", help="also write the per-layer report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=_cmd_compress)

    p = sub.add_parser("demo", help="train a small CNN, compress it, compare before/after",
                       description="Trains a small CNN on Fashion-MNIST (Debian dataset-fashion-mnist) or "
                                   "scikit-learn's digits, compresses it data-aware and measures both ONNX files.")
    p.add_argument("--out", default="out/demo", help="output directory (default out/demo)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--keep", type=float, default=0.3)
    p.add_argument("--method", default="tucker2")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except RankfoldError as exc:
        print(f"rankfold: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rankfold: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
