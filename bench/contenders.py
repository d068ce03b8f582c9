"""The contenders of the benchmark: each one turns the original ONNX network into a compressed
ONNX file and says how long the tool took. One registry; `bench.run` decides which run where.

A contender that fails (a library that does not install, or crashes on a layer) raises
ContenderFailed with the library's error, which the results and the README then show.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from bench import aidge_env
from bench.baselines import factorize_all, fraction_for_budget, uniform_rank, vbmf_rank
from bench.peak import parse_peak
from rankfold.export.onnx import export_onnx
from rankfold.frontends.onnx import load_onnx


class ContenderFailed(Exception):
    """The contender's tool did not produce a model; the message is its error."""


@dataclass
class Context:
    network: str
    model: str  # the original ONNX file
    calib: str  # .npz with 512 calibration inputs
    work: str  # directory for this network's outputs
    input_shape: tuple[int, ...]  # one sample, batch included
    log: Callable[[str], None] = print


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where `-m bench.peak` resolves


@dataclass
class Built:
    path: str
    seconds: float
    note: str = ""
    peak_rss_bytes: int | None = None  # the tool's peak resident memory, where it ran in its own process


def _out(ctx: Context, name: str) -> str:
    os.makedirs(ctx.work, exist_ok=True)
    return os.path.join(ctx.work, f"{name}.onnx")


def _calib(ctx: Context) -> np.ndarray:
    return np.load(ctx.calib)["x"]


def original(ctx: Context) -> Built:
    return Built(ctx.model, 0.0)


def ort_static_int8(ctx: Context) -> Built:
    """onnxruntime's own post-training static quantization: QDQ, int8, per-channel weights, after
    the pre-processing (shape inference, graph optimization) that its documentation asks for."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from rankfold.runtime import int8_kernels

    calib = _calib(ctx)

    class Reader(CalibrationDataReader):
        def __init__(self):
            import onnx

            self.name = onnx.load(ctx.model).graph.input[0].name
            self.batches = iter(calib[i : i + 32] for i in range(0, len(calib), 32))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {self.name: batch}

    out, prepared = _out(ctx, "ort-int8"), _out(ctx, "ort-prepared")
    t0 = time.perf_counter()
    quant_pre_process(ctx.model, prepared)
    # reduce_range where this CPU's kernels need it, as onnxruntime's own guide says (rankfold/runtime.py)
    reduce_range = int8_kernels().reduce_range
    quantize_static(prepared, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=reduce_range,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return Built(out, time.perf_counter() - t0, "QDQ, per-channel int8 weights, min-max calibration (512 images)"
                 + (", reduce_range (7-bit weights: this CPU has no VNNI)" if reduce_range else ""))


def _factorized(ctx: Context, name: str, rank_of, hooi_iters: int, note: str) -> Built:
    t0 = time.perf_counter()
    model = load_onnx(ctx.model)
    replaced = factorize_all(model, rank_of(model), hooi_iters=hooi_iters)
    out = _out(ctx, name)
    export_onnx(model, out, example_input=torch.from_numpy(_calib(ctx)[:2]))
    return Built(out, time.perf_counter() - t0, f"{note}; {len(replaced)} layers factorized")


def hosvd_tucker2(ctx: Context, max_params: int) -> Built:
    """Uniform-rank Tucker-2 by plain HOSVD (TensorLy, no iterations), data-free."""

    def rank_of(model):
        fraction = fraction_for_budget(model, max_params)
        ctx.log(f"  HOSVD: every layer keeps {fraction:.1%} of its channels")
        return uniform_rank(fraction)

    return _factorized(ctx, f"hosvd-{max_params}", rank_of, 0, "TensorLy partial_tucker, HOSVD")


def vbmf_tucker2(ctx: Context) -> Built:
    """Tucker-2 at EVBMF ranks with HOOI (TensorLy's default iterations), data-free."""
    return _factorized(ctx, "vbmf-tucker2", lambda model: vbmf_rank, 100, "EVBMF ranks, TensorLy HOOI")


def _run_aidge(ctx: Context, name: str, flags: list[str], library: str) -> tuple[str, dict]:
    """bench/aidge_runner.py in Aidge's own environment (bench/aidge_env.py): the output path and
    the runner's JSON result; its reported failure becomes ContenderFailed."""
    python, error = aidge_env.ensure_aidge(log=ctx.log)
    if python is None:
        raise ContenderFailed(error)
    out = _out(ctx, name)
    runner = os.path.join(os.path.dirname(__file__), "aidge_runner.py")
    shape = ",".join(map(str, ctx.input_shape))
    done = subprocess.run([python, runner, ctx.model, out, *flags, "--input-shape", shape],
                          capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    if "error" in result:
        raise ContenderFailed(f"{library}: {result['error']}")
    return out, result


def aidge(ctx: Context, factor: float, method: str) -> Built:
    """Eclipse Aidge's compression module."""
    out, result = _run_aidge(ctx, f"aidge-{method}-{factor:g}", ["--factor", str(factor), "--method", method],
                             "aidge-compression")
    return Built(out, result["seconds"], f"Compressor({factor:g}).compress(graph, {method}), "
                 f"{result['replaced']} layers replaced; batch dimension made dynamic after export")


def aidge_ptq(ctx: Context) -> Built:
    """aidge-quantization's int8 post-training quantization of the original, where it runs."""
    out, result = _run_aidge(ctx, "aidge-ptq", ["--method", "ptq", "--calib", ctx.calib], "aidge-quantization")
    return Built(out, result["seconds"], "quantize_network(MAX clipping, single shift), set_to_qdq")


def rankfold_cli(ctx: Context, name: str, budget_flags: list[str], bits: str) -> Built:
    """`rankfold compress` as a user runs it, in a subprocess, timed from start to finish."""
    out = _out(ctx, name)
    model, calib, out = (os.path.abspath(p) for p in (ctx.model, ctx.calib, out))  # run from REPO
    command = [sys.executable, "-m", "bench.peak", "compress", model, "--calib", calib, "-o", out,
               *budget_flags, "--bits", bits, "--force"]  # the bench owns its work directory
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - t0
    with open(os.path.join(ctx.work, f"{name}.log"), "w") as handle:
        handle.write(" ".join(command) + "\n" + done.stdout + done.stderr)
    if done.returncode != 0:
        said = [line for line in done.stderr.strip().splitlines() if parse_peak(line) is None]
        raise ContenderFailed("rankfold: " + (said or ["failed"])[-1])
    return Built(out, seconds, " ".join(budget_flags + ["--bits", bits]), parse_peak(done.stderr))


def rankfold_float(ctx: Context, max_params: int) -> Built:
    return rankfold_cli(ctx, f"rankfold-float-{max_params}", ["--max-params", str(max_params)], "32")


def rankfold_joint(ctx: Context, max_weight_bytes: int) -> Built:
    return rankfold_cli(ctx, f"rankfold-joint-{max_weight_bytes}", ["--max-weight-bytes", str(max_weight_bytes)],
                        "auto")


CONTENDERS: dict[str, Callable[..., Built]] = {
    "original": original,
    "ort-int8": ort_static_int8,
    "hosvd-tucker2": hosvd_tucker2,
    "vbmf-tucker2": vbmf_tucker2,
    "aidge": aidge,
    "aidge-ptq": aidge_ptq,
    "rankfold-float": rankfold_float,
    "rankfold-joint": rankfold_joint,
}
