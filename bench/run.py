"""rankfold against the classic methods, on the same networks, data and machine, in one run.

    python -m bench.run --quick           # ResNet-18 only, 2,000 test images, fewer contenders (< 10 min)
    python -m bench.run --full            # three networks, the 10,000 test images (the README's numbers)
    python -m bench.run --full --update-readme

Writes bench/results/<mode>.json, <mode>.md and <network>-<mode>-*.png. Every contender's model
is measured in this process: top-1, parameters, weight bytes, file bytes, MACs, peak activation
bytes, and onnxruntime latency (1 thread, batch 1 and 32, median of --rounds runs after warm-up,
the contenders' runs interleaved so that machine drift hits all alike).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from bench import report
from bench.contenders import CONTENDERS, Built, ContenderFailed, Context
from bench.nets import NETWORKS
from bench.side_by_side import interleaved_latency_ms
from bench.train import train_network
from rankfold.demo_data import fashion_mnist
from rankfold.evaluate import accuracy, onnx_peak_activation_bytes, onnx_size

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
RESNET = os.path.join(REPO_DIR, "..", "shared", "models", "resnet18-fmnist.onnx")
CALIB_SAMPLES = 512


@dataclass(frozen=True)
class Mode:
    networks: tuple[str, ...]
    test_limit: int  # 0: the whole test set
    param_budgets: tuple[float, ...]  # fractions of the original's parameters
    byte_budgets: tuple[float, ...]  # fractions of the original's weight bytes (joint rankfold)
    aidge_svd: bool  # Aidge's weight SVD at each parameter budget (its factor is the parameter share)
    aidge_tucker2_factors: tuple[float, ...]  # its Tucker-2 factor weakens VBMF ranks: 1.0 ~ VBMF, 0.5 ~ 50 %
    matched: bool  # rankfold rows at the exact size of the VBMF and onnxruntime-int8 contenders
    rounds: int = 50


MODES = {
    "quick": Mode(("resnet18",), 2000, (0.10,), (0.03,), aidge_svd=True, aidge_tucker2_factors=(), matched=False),
    "full": Mode(("resnet18", "vgg", "mobilenetv2"), 0, (0.10, 0.25, 0.50), (0.015, 0.03), aidge_svd=True,
                 aidge_tucker2_factors=(1.0, 0.5), matched=True),
}


@dataclass
class Row:
    network: str
    contender: str
    setting: str
    tool_seconds: float | None = None
    note: str = ""
    error: str | None = None
    path: str | None = None
    metrics: dict = field(default_factory=dict)


def prepare_data(work: str, log) -> tuple[str, str]:
    """Fashion-MNIST in the reference preprocessing: (test .npz, 512-image calibration .npz)."""
    test, calib = os.path.join(work, "fmnist-test.npz"), os.path.join(work, "fmnist-calib.npz")
    if not (os.path.isfile(test) and os.path.isfile(calib)):
        log("writing Fashion-MNIST test and calibration sets")
        data = fashion_mnist()
        os.makedirs(work, exist_ok=True)
        np.savez(test, x=data.x_test, y=data.y_test)
        # The same fixed sample of the train set as ../shared/data/fmnist_npz.py draws.
        idx = np.random.default_rng(0).choice(len(data.x_train), CALIB_SAMPLES, replace=False)
        np.savez(calib, x=data.x_train[idx], y=data.y_train[idx])
    return test, calib


def network_file(name: str, log) -> str:
    if name == "resnet18":
        if not os.path.isfile(RESNET):
            raise FileNotFoundError(f"{RESNET} not found: the ResNet-18 reference lies in ../shared/models")
        return os.path.abspath(RESNET)
    return train_network(name, log=log)  # trains only when its file is missing


def attempt(rows: list[Row], ctx: Context, contender: str, setting: str, *args) -> Row:
    """Run one contender; a failure becomes a row with its error, never a crash of the bench."""
    ctx.log(f"[{ctx.network}] {contender} {setting}")
    row = Row(ctx.network, contender, setting)
    try:
        built: Built = CONTENDERS[contender](ctx, *args)
        row.path, row.tool_seconds, row.note = built.path, built.seconds, built.note
        size = onnx_size(built.path)
        row.metrics.update(params=size.params, weight_bytes=size.weight_bytes, file_bytes=size.file_bytes,
                           macs=size.macs)
        if built.peak_rss_bytes is not None:
            row.metrics["peak_rss_bytes"] = built.peak_rss_bytes
        ctx.log(f"  {size.params:,} parameters, {size.weight_bytes:,} weight bytes, {built.seconds:.1f} s")
    except ContenderFailed as exc:
        row.error = str(exc)
        ctx.log(f"  failed: {exc}")
    rows.append(row)
    return row


def _sizes(rows: list[Row], key: str) -> list[int]:
    return [r.metrics[key] for r in rows if r.metrics]


def rankfold_at_size(rows: list[Row], ctx: Context, setting: str, params: list[int], weight_bytes: list[int]) -> None:
    """rankfold float at the smallest of `params`; where no float plan is that small, the joint
    int8/int4 plan at the smallest contender's weight bytes (what a user would try next)."""
    tried = attempt(rows, ctx, "rankfold-float", setting, min(params))
    if tried.error and weight_bytes:
        attempt(rows, ctx, "rankfold-joint", f"{setting}: at the contenders' bytes", min(weight_bytes))


def build_all(ctx: Context, mode: Mode) -> list[Row]:
    rows: list[Row] = []
    base = attempt(rows, ctx, "original", "float")
    params0, bytes0 = base.metrics["params"], base.metrics["weight_bytes"]
    ort_row = attempt(rows, ctx, "ort-int8", "int8")
    attempt(rows, ctx, "aidge-ptq", "int8")
    small = [attempt(rows, ctx, "vbmf-tucker2", "EVBMF ranks")]
    small += [attempt(rows, ctx, "aidge", f"Tucker-2, factor {f:g}", f, "tucker2") for f in mode.aidge_tucker2_factors]
    for fraction in mode.param_budgets:
        budget = int(fraction * params0)
        setting = f"{fraction:.0%} params"
        contenders = [attempt(rows, ctx, "aidge", f"{setting} (weight SVD)", fraction, "svd")] if mode.aidge_svd else []
        contenders.append(attempt(rows, ctx, "hosvd-tucker2", setting, budget))
        # rankfold gets no more parameters than the smallest contender at this budget
        rankfold_at_size(rows, ctx, setting, [budget] + _sizes(contenders, "params"),
                         _sizes(contenders, "weight_bytes"))
    for fraction in mode.byte_budgets:
        attempt(rows, ctx, "rankfold-joint", f"{fraction:.1%} weight bytes", int(fraction * bytes0))
    if mode.matched:
        if _sizes(small, "params"):  # as small as the smallest of VBMF Tucker-2 and Aidge's Tucker-2 at factor 1
            rankfold_at_size(rows, ctx, "= smallest VBMF size", _sizes(small, "params"), _sizes(small, "weight_bytes"))
        if ort_row.metrics:
            attempt(rows, ctx, "rankfold-joint", "= ORT int8 bytes", ort_row.metrics["weight_bytes"])
    return rows


def measure(rows: list[Row], test: str, mode: Mode, log) -> None:
    data = np.load(test)
    x, y = data["x"], data["y"]
    if mode.test_limit:
        x, y = x[: mode.test_limit], y[: mode.test_limit]
    done = [r for r in rows if r.path]
    for row in done:
        t0 = time.perf_counter()
        row.metrics["accuracy"] = accuracy(row.path, x, y)
        row.metrics["peak_activation_bytes"] = onnx_peak_activation_bytes(onnx.load(row.path))
        log(f"  top-1 {row.metrics['accuracy']:.4f}  {row.contender} {row.setting} ({time.perf_counter() - t0:.0f} s)")
    paths = [r.path for r in done]
    log(f"timing {len(paths)} models, interleaved, {mode.rounds} rounds at batch 1 and at batch 32")
    for batch, key in ((1, "latency_ms_b1"), (32, "latency_ms_b32")):
        for row, ms in zip(done, interleaved_latency_ms(paths, x[:batch], mode.rounds)):
            row.metrics[key] = ms
    for row in rows:
        row.metrics["test_samples"] = len(x)


def merge_results(path: str, new: dict) -> dict:
    """The results at `path` with the networks of `new` replaced by `new`'s rows (same mode)."""
    with open(path) as handle:
        old = json.load(handle)
    if old.get("mode") != new["mode"]:
        return new
    redone = set(new["network_seconds"])
    order = list(dict.fromkeys([r["network"] for r in old["rows"]] + list(redone)))
    by_network = {n: [r for r in old["rows"] if r["network"] == n] for n in order if n not in redone}
    by_network.update({n: [r for r in new["rows"] if r["network"] == n] for n in redone})
    seconds = {**old.get("network_seconds", {}), **new["network_seconds"]}
    return {**new, "network_seconds": seconds, "rows": [r for n in order for r in by_network.get(n, [])]}


def machine() -> dict:
    import onnxruntime
    import torch

    from rankfold.runtime import cpu_summary, int8_kernels

    return {"cpu": cpu_summary(), "int8_kernels": int8_kernels().describe(), "cores": os.cpu_count(),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--quick", action="store_true")
    which.add_argument("--full", action="store_true")
    parser.add_argument("--networks", help="comma-separated subset of the mode's networks")
    parser.add_argument("--out", default=os.path.join(BENCH_DIR, "results"))
    parser.add_argument("--work", default=os.path.join(BENCH_DIR, "work"))
    parser.add_argument("--update-readme", action="store_true", help="write the Results section of README.md")
    args = parser.parse_args(argv)
    mode_name = "quick" if args.quick else "full"
    mode = MODES[mode_name]
    networks = args.networks.split(",") if args.networks else list(mode.networks)
    unknown = sorted(set(networks) - {"resnet18", *NETWORKS})
    if unknown:
        parser.error(f"unknown network(s) {', '.join(unknown)}; choose from resnet18, {', '.join(NETWORKS)}")
    t_start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f}s] {message}", flush=True)

    if mode.test_limit:
        log(f"--quick: top-1 on the first {mode.test_limit:,} test images only; --full uses all 10,000")
    test, calib = prepare_data(os.path.join(args.work, "data"), log)
    rows: list[Row] = []
    network_seconds: dict[str, float] = {}
    for network in networks:
        t_network = time.perf_counter()
        try:
            model = network_file(network, log)
        except FileNotFoundError as exc:
            log(f"skipping {network}: {exc}")
            continue
        shape = tuple(d.dim_value or 1 for d in onnx.load(model).graph.input[0].type.tensor_type.shape.dim)
        ctx = Context(network, model, calib, os.path.join(args.work, mode_name, network), shape, log)
        network_rows = build_all(ctx, mode)
        measure(network_rows, test, mode, log)
        rows += network_rows
        network_seconds[network] = time.perf_counter() - t_network
    json_path = os.path.join(args.out, f"{mode_name}.json")
    results = {"mode": mode_name, "machine": machine(), "mode_settings": asdict(mode),
               "network_seconds": network_seconds, "rows": [asdict(r) for r in rows]}
    if args.networks and os.path.isfile(json_path):  # a partial re-run replaces only its networks
        results = merge_results(json_path, results)
    results["seconds"] = sum(results["network_seconds"].values())
    os.makedirs(args.out, exist_ok=True)
    with open(json_path + ".tmp", "w") as handle:
        json.dump(results, handle, indent=1)
    os.replace(json_path + ".tmp", json_path)
    markdown = report.write_all(results, args.out)
    print(markdown)
    if args.update_readme:
        report.update_readme(os.path.join(REPO_DIR, "README.md"), results, args.out)
    log(f"done: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
