"""What several test files share: the CLI run as a user runs it, and a tiny trained-shape classifier."""

import subprocess
import sys

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
    """`rankfold ARGS` in a subprocess: (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "rankfold.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)
    return proc.returncode, proc.stdout, proc.stderr


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
