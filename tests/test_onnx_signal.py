"""ONNX's signal ops (rankfold/frontends/onnx_ops_signal.py): STFT, DFT, the windows and
MelWeightMatrix against onnx's reference and onnxruntime on the same file, and an audio model
exported by torch.onnx with `torch.stft` at its front compressed whole, its written file holding
the STFT node again."""

import collections
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import rankfold
from rankfold.errors import RankfoldError
from rankfold.evaluate import onnx_size

RNG = np.random.default_rng(0)


def _i64(value):
    return np.array(value, np.int64)


def _file(tmp_path, nodes, x, inits, out_rank, opset=17) -> str:
    graph = helper.make_graph(nodes, "signal", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * out_rank)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    path = str(tmp_path / "signal.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)
    return path


SIGNAL = RNG.normal(size=(2, 400, 1)).astype(np.float32)
# name -> (nodes from x to y, x, constants, y's rank, opset)
CASES = {
    "stft, periodic hann window": (
        [helper.make_node("HannWindow", ["n"], ["w"]), helper.make_node("STFT", ["x", "s", "w"], ["y"])],
        SIGNAL, dict(n=_i64(64), s=_i64(16)), 4, 17),
    "stft, symmetric hamming window, two-sided": (
        [helper.make_node("HammingWindow", ["n"], ["w"], periodic=0),
         helper.make_node("STFT", ["x", "s", "w", "n"], ["y"], onesided=0)],
        SIGNAL, dict(n=_i64(50), s=_i64(20)), 4, 17),
    "stft without a window": (
        [helper.make_node("STFT", ["x", "s", "", "n"], ["y"])], SIGNAL, dict(n=_i64(48), s=_i64(32)), 4, 17),
    "stft of a complex signal, blackman window": (
        [helper.make_node("BlackmanWindow", ["n"], ["w"]),
         helper.make_node("STFT", ["x", "s", "w"], ["y"], onesided=0)],
        RNG.normal(size=(2, 300, 2)).astype(np.float32), dict(n=_i64(64), s=_i64(16)), 4, 17),
    "dft-17, onesided": (
        [helper.make_node("DFT", ["x"], ["y"], onesided=1)], SIGNAL, {}, 3, 17),
    "dft-17, zero-padded to its length": (
        [helper.make_node("DFT", ["x", "n"], ["y"])], SIGNAL[:, :100], dict(n=_i64(128)), 3, 17),
    "dft-20, inverse of a complex spectrum": (
        [helper.make_node("DFT", ["x", "", "a"], ["y"], inverse=1)],
        RNG.normal(size=(3, 64, 2)).astype(np.float32), dict(a=_i64(-2)), 3, 20),
    "dft-20 over axis 1 of four": (
        [helper.make_node("DFT", ["x", "", "a"], ["y"])],
        RNG.normal(size=(2, 30, 5, 1)).astype(np.float32), dict(a=_i64(1)), 4, 20),
    "mel weight matrix": (
        [helper.make_node("MelWeightMatrix", ["b", "n", "r", "low", "high"], ["m"]),
         helper.make_node("MatMul", ["x", "m"], ["y"])],
        RNG.normal(size=(2, 10, 257)).astype(np.float32),
        dict(b=_i64(40), n=_i64(512), r=_i64(16000), low=np.float32(20.0), high=np.float32(8000.0)), 3, 17),
}


@pytest.mark.parametrize("case", list(CASES))
def test_signal_ops_compute_what_the_reference_and_onnxruntime_compute(tmp_path, case):
    nodes, x, inits, rank, opset = CASES[case]
    path = _file(tmp_path, nodes, x, inits, rank, opset)
    exact = ReferenceEvaluator(path).run(None, {"x": x})[0]
    theirs = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ours = rankfold.load_onnx(path)(torch.from_numpy(x)).detach().numpy()
    scale = max(1.0, float(np.abs(exact).max()))
    assert ours.shape == exact.shape
    assert np.abs(ours - exact).max() <= 1e-5 * scale, case
    assert np.abs(ours - theirs).max() <= 1e-4 * scale, case  # onnxruntime's FFT rounds a little apart


def test_an_inverse_of_a_onesided_spectrum_is_refused_by_name(tmp_path):
    x = RNG.normal(size=(2, 33, 2)).astype(np.float32)
    path = _file(tmp_path, [helper.make_node("DFT", ["x"], ["y"], inverse=1, onesided=1)], x, {}, 3)
    with pytest.raises(RankfoldError, match=r"DFT\) cannot run: an inverse of a onesided spectrum"):
        rankfold.load_onnx(path)(torch.from_numpy(x))


class Spectrogram(torch.nn.Module):
    """A keyword spotter's shape: log-magnitude STFT frames, a convolution over time, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.register_buffer("window", torch.hann_window(64))
        self.conv = torch.nn.Conv1d(33, 24, 3)
        self.fc = torch.nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spectrum = torch.stft(x, 64, hop_length=16, window=self.window, center=False, return_complex=True)
        return self.fc(torch.relu(self.conv(torch.log(spectrum.abs() + 1e-3))).mean(-1))


def test_an_audio_model_with_an_stft_front_compresses_whole_and_writes_the_stft_again(tmp_path):
    original, calib, out = tmp_path / "kws.onnx", tmp_path / "calib.npz", tmp_path / "small.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Spectrogram().eval(), (torch.randn(2, 800),), str(original), dynamo=True, opset_version=17,
                          input_names=["x"], dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert "STFT" in {n.op_type for n in onnx.load(str(original)).graph.node}
    module = rankfold.load_onnx(original)
    assert {name for name, m in module.named_modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Linear))}
    np.savez(calib, x=RNG.normal(size=(64, 800)).astype(np.float32))
    from rankfold.cli import main

    assert main(["compress", str(original), "--calib", str(calib), "--keep", "0.7", "--max-output-error", "1",
                 "-o", str(out), "-q"]) == 0
    written = collections.Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    assert written["STFT"] == 1 and written["MatMul"] == 0  # the transform, not its matrices as weights
    x = RNG.normal(size=(3, 800)).astype(np.float32)
    small, wanted = ort.InferenceSession(str(out)), ort.InferenceSession(str(original))
    assert small.run(None, {"x": x})[0].shape == wanted.run(None, {"x": x})[0].shape == (3, 4)
    assert onnx_size(str(out)).params < onnx_size(str(original)).params


def test_a_dft_front_is_written_again_as_a_dft_node(tmp_path):
    """A magnitude spectrum (DFT-17, onesided) into two MatMul layers: compressed and written,
    the file computes its DFT as onnxruntime does, at other batches too."""
    nodes = [helper.make_node("Unsqueeze", ["x", "last"], ["signal"]),
             helper.make_node("DFT", ["signal"], ["spectrum"], onesided=1, axis=1),
             helper.make_node("ReduceL2", ["spectrum", "last"], ["magnitude"], keepdims=0),
             helper.make_node("MatMul", ["magnitude", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    inits = dict(last=_i64([-1]), w1=RNG.normal(size=(129, 32)).astype(np.float32) / 10,
                 w2=RNG.normal(size=(32, 4)).astype(np.float32))
    graph = helper.make_graph(nodes, "dft", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    original, calib, out = tmp_path / "dft.onnx", tmp_path / "calib.npz", tmp_path / "small.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(original))
    np.savez(calib, x=RNG.normal(size=(64, 256)).astype(np.float32))
    from rankfold.cli import main

    assert main(["compress", str(original), "--calib", str(calib), "--keep", "0.7", "--max-output-error", "1",
                 "-o", str(out), "-q"]) == 0
    assert collections.Counter(n.op_type for n in onnx.load(str(out)).graph.node)["DFT"] == 1
    x = RNG.normal(size=(3, 256)).astype(np.float32)
    got = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    assert got.shape == (3, 4) and np.isfinite(got).all()
