"""What several test files share: the CLI run as a user runs it, and a tiny trained-shape classifier."""

import contextlib
import io
import os
import traceback
import warnings

import numpy as np
import onnx
import torch
from torch import nn

from rankfold.runtime import int8_kernels

# What onnxruntime's quantizer is told on this CPU: its documentation advises 7-bit weights
# (reduce_range) on x86 without VNNI, whose int8 kernels saturate 8-bit ones (an AVX2-only AMD
# EPYC, Zen 3); files quantized so are what onnxruntime computes exactly there, so a test can hold
# rankfold's reading of them to onnxruntime's run.
ORT_QUANTIZER_RANGE = {"reduce_range": int8_kernels().reduce_range}


def run_cli(*args, cwd=None):
    """`rankfold ARGS` as the console script runs it, in this process: (exit code, stdout, stderr).

    A fresh interpreter per call spent about 4 s importing torch and onnxruntime, a third of the
    suite. What a separate process would show is kept: argparse's exit code and usage, an exception
    escaping `main` written to stderr as a traceback with code 1, and warnings printed to stderr
    under Python's default filters (pytest would otherwise record them out of sight); the random
generators' states are the caller's again afterwards. The tests that
    need a real process (kills, the entry point, concurrent runs) start one themselves."""
    from rankfold.cli import main

    out, err = io.StringIO(), io.StringIO()
    here, threads = os.getcwd(), torch.get_num_threads()
    torch_rng, numpy_rng = torch.get_rng_state(), np.random.get_state()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            _fresh_interpreter_warnings(err)
            try:
                code = main([str(arg) for arg in args])
            except SystemExit as exc:  # argparse: usage errors (2) and --help (0)
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if not isinstance(exc.code, int) and exc.code is not None:
                    print(exc.code, file=err)
            except Exception:  # what the interpreter prints for an uncaught exception
                traceback.print_exc(file=err)
                code = 1
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)
        torch.set_rng_state(torch_rng)
        np.random.set_state(numpy_rng)
    return code, out.getvalue(), err.getvalue()


def _fresh_interpreter_warnings(err) -> None:
    """Python's default warning filters, each warning printed to `err` (once per place, as a fresh
    interpreter prints it)."""
    warnings.resetwarnings()
    warnings.simplefilter("default")
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.simplefilter("ignore", category)  # inserted in front: these win
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: err.write(
        warnings.formatwarning(message, category, filename, lineno, line))


def tiny_classifier() -> nn.Module:
    """Two convolutions and a classifier for (N, 1, 12, 12) inputs, seeded."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def table_codes(graph, name_part: str = ""):
    """The integer codes an embedding table's Gather reads in a weight-only file (int8, or int4
    through the Cast to int8 that onnxruntime folds at load), and the initializers by name; None
    where no Gather reads codes."""
    inits = {i.name: i for i in graph.initializer}
    made = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if node.op_type != "Gather" or name_part not in node.name:
            continue
        source = node.input[0]
        if source in made and made[source].op_type == "Cast":
            source = made[source].input[0]
        codes = inits.get(source)
        if codes is not None and codes.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT4):
            return codes, inits
    return None, inits
