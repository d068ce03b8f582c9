"""Export a torch module to ONNX with a dynamic batch dimension, checked in onnxruntime."""

from __future__ import annotations

import os
import tempfile
import warnings

import numpy as np
import torch
from torch import Tensor, nn

from rankfold.errors import RankfoldError
from rankfold.io import replace_atomically

OPSET = 17
RTOL = 1e-4


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    example_input: Tensor,
    verify: bool = True,
    opset: int = OPSET,
) -> None:
    """Write `model` to `path` as ONNX (batch dimension dynamic).

    The file is written to a temporary name and renamed, so a failed export leaves nothing. With
    `verify`, onnxruntime runs the file on `example_input` and the export is refused when its
    output differs from PyTorch's by more than 1e-4 relative (Frobenius) error.
    """
    path = os.fspath(path)
    was_training = model.training
    model.eval()
    try:
        _export_checked(model, path, example_input, verify=verify, opset=opset)
    finally:
        model.train(was_training)


def _export_checked(model: nn.Module, path: str, example_input: Tensor, *, verify: bool, opset: int) -> None:
    input_names = list(getattr(model, "input_names", ["input"]))[:1]
    output_names = list(getattr(model, "output_names", ["output"]))
    with torch.no_grad():
        expected = model(example_input)
    if isinstance(expected, tuple):
        output_names = output_names[: len(expected)] if len(output_names) >= len(expected) else [
            f"output_{i}" for i in range(len(expected))]
    else:
        output_names = output_names[:1]
    dynamic = {name: {0: "batch"} for name in input_names + output_names}
    for name, axes in getattr(model, "dynamic_axes", {}).items():  # what the original left open stays open
        if name in dynamic:
            dynamic[name].update(axes)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise RankfoldError(f"{path}: the directory {directory} does not exist")
    # Exported and verified in the system's temporary directory; only the checked bytes are written
    # beside `path` (unique name, then an atomic rename), so a kill leaves nothing of it there.
    with tempfile.TemporaryDirectory(prefix="rankfold-") as scratch:
        tmp = os.path.join(scratch, "model.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (example_input,), tmp, dynamo=False, opset_version=opset,
                input_names=input_names, output_names=output_names, dynamic_axes=dynamic,
                do_constant_folding=True,
            )
        if verify:
            _verify(tmp, example_input, expected)
        with open(tmp, "rb") as handle:
            replace_atomically(path, handle.read())


def _verify(path: str, example_input: Tensor, expected) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: example_input.detach().cpu().numpy()}
    got = session.run(None, feed)
    wanted = expected if isinstance(expected, tuple) else (expected,)
    for g, w in zip(got, wanted):
        w = w.detach().cpu().numpy()
        err = float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30))
        if err > RTOL:
            raise RankfoldError(f"exported ONNX disagrees with PyTorch: relative error {err:.2e} > {RTOL:g}")
