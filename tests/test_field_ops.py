"""ONNX ops of networks from the field, each against onnxruntime: recurrent layers, an If on a
constant, and graphs that are already quantized (dynamic, QDQ and QOperator formats)."""

import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

import rankfold
from rankfold.errors import RankfoldError
from tests.helpers import ORT_QUANTIZER_RANGE


def _ort(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def _ours(path, x):
    out = rankfold.load_onnx(path)(torch.from_numpy(x))
    return [t.detach().numpy() for t in (out if isinstance(out, tuple) else (out,))]


class Recurrent(nn.Module):
    def __init__(self, kind: str, bidirectional: bool):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(6, 8, 3, padding=1)
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[kind](8, 12, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(24 if bidirectional else 12, 5)

    def forward(self, x):  # (N, 6, T)
        y, _state = self.rnn(self.conv(x).transpose(1, 2))
        return self.head(y)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["forward", "bidirectional"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_recurrent_layers_match_onnxruntime(tmp_path, kind, bidirectional):
    model = Recurrent(kind, bidirectional).eval()
    x = torch.randn(3, 6, 10)
    path = tmp_path / "r.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                          dynamic_axes={"x": {0: "n"}})
    assert kind.upper() in {n.op_type for n in onnx.load(str(path)).graph.node}
    fresh = np.random.default_rng(1).normal(size=(4, 6, 10)).astype(np.float32)
    np.testing.assert_allclose(_ours(path, fresh)[0], _ort(path, fresh)[0], atol=1e-5)


def test_an_if_on_a_constant_is_the_branch_it_takes(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    then_out = helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N", 4])
    else_out = helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", 4])
    then_graph = helper.make_graph([helper.make_node("Relu", ["x"], ["t"])], "then", [], [then_out])
    else_graph = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [else_out])
    cond = helper.make_node("Constant", [], ["c"], value=helper.make_tensor("cv", TensorProto.BOOL, [], [False]))
    branch = helper.make_node("If", ["c"], ["y"], then_branch=then_graph, else_branch=else_graph)
    graph = helper.make_graph([cond, branch], "g", [x], [y])
    path = tmp_path / "if.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    v = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    np.testing.assert_allclose(_ours(path, v)[0], -v)
    np.testing.assert_allclose(_ort(path, v)[0], -v)


def test_an_if_on_the_input_is_refused_by_name(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    out = helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N", 4])
    body = helper.make_graph([helper.make_node("Relu", ["x"], ["t"])], "b", [], [out])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Cast", ["s"], ["c"], to=TensorProto.BOOL),
             helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=body)]
    path = tmp_path / "if2.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                                opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(RankfoldError, match="If whose condition depends on the input"):
        rankfold.load_onnx(path)


def _float_model(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 8 * 8, 10)).eval()
    path = tmp_path / "float.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 3, 8, 8),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], dynamic_axes={"x": {0: "n"}})
    return str(path)


class _Reader:
    def __init__(self, x):
        self.items = iter([{"x": x[i : i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self.items, None)


def _quantized_model(tmp_path, form: str, x: np.ndarray) -> tuple[str, str]:
    """(the float model, its copy quantized by onnxruntime in `form`), calibrated on `x`."""
    from onnxruntime import quantization as q

    src = _float_model(tmp_path)
    out = str(tmp_path / f"{form}.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if form == "dynamic":
            q.quantize_dynamic(src, out, op_types_to_quantize=["Conv", "MatMul", "Gemm"], **ORT_QUANTIZER_RANGE)
        else:
            fmt = q.QuantFormat.QDQ if form == "qdq" else q.QuantFormat.QOperator
            # QOperator Gemm is Microsoft's own QGemm: only the standard QLinearConv here
            ops = ["Conv", "MatMul", "Gemm"] if form == "qdq" else ["Conv"]
            q.quantize_static(src, out, _Reader(x), quant_format=fmt, op_types_to_quantize=ops,
                              **ORT_QUANTIZER_RANGE)
    return src, out


@pytest.mark.parametrize("form", ["dynamic", "qdq", "qoperator"])
def test_already_quantized_graphs_load_and_match_onnxruntime(tmp_path, form):
    x = np.random.default_rng(0).normal(size=(16, 3, 8, 8)).astype(np.float32)
    src, out = _quantized_model(tmp_path, form, x)
    ops = {n.op_type for n in onnx.load(out).graph.node}
    expected = {"dynamic": "DynamicQuantizeLinear", "qdq": "DequantizeLinear", "qoperator": "QLinearConv"}[form]
    assert expected in ops, ops
    ours, theirs = _ours(out, x)[0], _ort(out, x)[0]
    reference = _ort(src, x)[0]
    scale = np.abs(reference).max()
    # float arithmetic vs onnxruntime's integer kernels: a rounding unit here and there
    assert np.abs(ours - theirs).max() < 0.05 * scale, (np.abs(ours - theirs).max(), scale)
    assert (ours.argmax(1) == theirs.argmax(1)).mean() >= 0.9
    loaded = rankfold.load_onnx(out)
    if form == "qdq":  # weights dequantized at load: ordinary layers, compressible like any other
        assert sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in loaded.modules()) == 3



@pytest.mark.parametrize("data_type", [TensorProto.INT4, TensorProto.UINT4])
def test_blocked_int4_weights_load_as_onnxruntime_reads_them(tmp_path, data_type):
    """Opset 21 blocked DequantizeLinear (a scale and a zero point per block of 8 input elements,
    the layout of int4 weight-only files from NNCF, torchao exports and rankfold's own groups) is
    dequantized block by block at load, a short last block included: the weights become an
    ordinary Linear that computes what onnxruntime computes."""
    rng = np.random.default_rng(0)
    low, high = (-8, 8) if data_type == TensorProto.INT4 else (0, 16)
    codes = rng.integers(low, high, size=(20, 6))  # (in, out) for MatMul, blocks along the input axis
    scale = rng.uniform(0.01, 0.1, size=(3, 6)).astype(np.float32)
    zero = rng.integers(low, high, size=(3, 6))
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], axis=0, block_size=8),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "blocked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 20])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 6])],
                              [helper.make_tensor("w_q", data_type, codes.shape, codes.flatten().tolist()),
                               helper.make_tensor("w_scale", TensorProto.FLOAT, scale.shape, scale.flatten()),
                               helper.make_tensor("w_zero", data_type, zero.shape, zero.flatten().tolist())])
    path = tmp_path / "blocked.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    x = rng.normal(size=(4, 20)).astype(np.float32)
    theirs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    loaded = rankfold.load_onnx(path)
    with torch.no_grad():
        ours = loaded(torch.from_numpy(x))
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-5, atol=1e-5)
    assert sum(isinstance(m, nn.Linear) for m in loaded.modules()) == 1

def _bidirectional_file(tmp_path, kind: str, example: torch.Tensor):
    """A bidirectional Recurrent(kind) exported by the TorchScript exporter, batch open."""
    path = tmp_path / "r.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Recurrent(kind, bidirectional=True).eval(), (example,), str(path), dynamo=False,
                          opset_version=17, input_names=["x"], dynamic_axes={"x": {0: "n"}})
    return path


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_recurrent_input_projections_are_layers_that_factorize_and_quantize(tmp_path, kind):
    # The LSTM / GRU input projection x W^T (+ biases) is a Linear layer of the loaded graph: a
    # uniform SVD factorizes it, a byte budget quantizes it, and both files run in onnxruntime as
    # the compressed module computes.
    calib = torch.randn(96, 6, 10)
    path = _bidirectional_file(tmp_path, kind, calib[:1])
    loaded = rankfold.load_onnx(path)
    projections = [(name, m) for name, m in loaded.named_modules() if name.endswith("_input")]
    gates = {"lstm": 4, "gru": 3}[kind]
    assert len(projections) == 1 and projections[0][1].weight.shape == (2 * gates * 12, 8)
    name = projections[0][0]
    factorized = rankfold.compress(loaded, calib=calib, layers={name: rankfold.SVDConfig(rank=4),
                                                                "*": rankfold.SkipConfig("kept")})
    record = next(r for r in factorized.rankfold_report.layers if r.name == name)
    assert record.method == "svd" and record.ranks == (4,)
    rankfold.export_onnx(factorized, tmp_path / "svd.onnx", example_input=calib[:2])  # verified in onnxruntime
    fresh = calib[:4].numpy()
    np.testing.assert_allclose(_ort(tmp_path / "svd.onnx", fresh)[0], factorized(calib[:4]).detach().numpy(),
                               atol=1e-4)
    result = rankfold.compress_to_budget(loaded, calib=calib, budgets={"weight_bytes": "80%"}, bits=8, min_rank=2)
    assert result.plan.layer_bits()[name] == 8
    result.save(tmp_path / "q.onnx")  # checked again on the held-back samples before it is written
    assert any(n.op_type == "DequantizeLinear" for n in onnx.load(tmp_path / "q.onnx").graph.node)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_recurrent_weights_are_layers_the_recurrence_calls(tmp_path, kind):
    """R of each direction is a Linear layer (h R^T) that the recurrence calls at every step: the
    loaded graph still matches onnxruntime, and a byte budget that the input projections alone
    cannot meet (R is half the float bytes) quantizes R too, in a file checked before it is written."""
    calib = torch.randn(96, 6, 10)
    path = _bidirectional_file(tmp_path, kind, calib[:1])
    loaded = rankfold.load_onnx(path)
    gates = {"lstm": 4, "gru": 3}[kind]
    recurrent = {name: m for name, m in loaded.named_modules() if "_recurrent" in name}
    assert sorted(n.rsplit("_", 1)[-1] for n in recurrent) == ["recurrent", "reverse"]
    assert all(m.weight.shape == (gates * 12, 12) and m.bias is None for m in recurrent.values())
    fresh = np.random.default_rng(1).normal(size=(4, 6, 10)).astype(np.float32)
    np.testing.assert_allclose(_ours(path, fresh)[0], _ort(path, fresh)[0], atol=1e-5)
    result = rankfold.compress_to_budget(loaded, calib=calib, budgets={"weight_bytes": "50%"}, bits=8, min_rank=2)
    assert all(result.plan.layer_bits()[name] == 8 for name in recurrent)
    result.save(tmp_path / "q.onnx")
    assert (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("form", ["dynamic", "qoperator"])
def test_already_quantized_graphs_compress_or_refuse_in_one_line(tmp_path, form):
    """Integer ops run in float64 for exactness; the export that timing and writing need traces them
    in float32 (onnxruntime has no float64 Conv), so compressing such a graph ends in a file or one
    line, never a traceback."""
    from tests.helpers import run_cli

    x = np.random.default_rng(0).normal(size=(64, 3, 8, 8)).astype(np.float32)
    _src, out = _quantized_model(tmp_path, form, x[:16])
    np.savez(tmp_path / "calib.npz", x=x)
    for index, budget in enumerate((["--max-params", "90%"], ["--max-weight-bytes", "50%"])):
        written = tmp_path / f"small-{index}.onnx"
        code, stdout, stderr = run_cli("compress", out, "--calib", tmp_path / "calib.npz", *budget, "-o", written)
        assert "Traceback" not in stderr and code in (0, 2), stderr
        assert "already quantized" in stdout + stderr
        if code == 2:
            assert "rankfold: error:" in stderr and not written.exists()


def test_a_dynamically_quantized_lstm_reads_as_its_float_lstm(tmp_path):
    """onnxruntime's DynamicQuantizeLSTM (int8 weights stored input-major, a scale per direction):
    read as the float LSTM its weights dequantize to, whose input projection is a layer."""
    from onnxruntime import quantization as q

    model = Recurrent("lstm", True).eval()
    src, out = tmp_path / "r.onnx", tmp_path / "rq.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(3, 6, 10),), str(src), dynamo=False, opset_version=17,
                          input_names=["x"], dynamic_axes={"x": {0: "n"}})
        q.quantize_dynamic(str(src), str(out), op_types_to_quantize=["LSTM"], **ORT_QUANTIZER_RANGE)
    assert "DynamicQuantizeLSTM" in {n.op_type for n in onnx.load(str(out)).graph.node}
    fresh = np.random.default_rng(1).normal(size=(4, 6, 10)).astype(np.float32)
    ours, theirs, floats = _ours(out, fresh)[0], _ort(out, fresh)[0], _ort(src, fresh)[0]
    # onnxruntime also quantizes the activations at each step; rankfold computes them in float
    scale = np.abs(floats).max()
    assert np.abs(ours - floats).max() < 0.05 * scale and np.abs(ours - theirs).max() < 0.05 * scale
    loaded = rankfold.load_onnx(out)
    assert any(isinstance(m, nn.Linear) and m.in_features == 8 for m in loaded.modules())  # the projection
    assert "DynamicQuantizeLSTM x1" in loaded.quantized_note


def test_an_already_quantized_graph_is_budgeted_in_the_bytes_its_file_holds(tmp_path):
    """Read in float, an int8 file is about 4x larger than it is: a byte percentage is of the file,
    and a parameter budget alone may not write a result larger than the file."""
    from rankfold.evaluate import onnx_size
    from tests.helpers import run_cli

    x = np.random.default_rng(0).normal(size=(64, 3, 8, 8)).astype(np.float32)
    _src, out = _quantized_model(tmp_path, "qdq", x[:16])
    np.savez(tmp_path / "calib.npz", x=x)
    held = onnx_size(out).weight_bytes
    for budget, share in ((["--max-params", "90%"], 1.0), (["--max-weight-bytes", "80%"], 0.8)):
        code, stdout, stderr = run_cli("compress", out, "--calib", tmp_path / "calib.npz", *budget, "-o",
                                       tmp_path / "small.onnx", "--force", "--check", "relerr:10")
        assert code == 0, stderr
        assert f"the file holds {held:,} weight bytes" in stdout + stderr
        assert onnx_size(str(tmp_path / "small.onnx")).weight_bytes <= share * held


def test_a_recurrent_weight_is_priced_for_every_step_it_runs(tmp_path):
    """R runs once per time step: its MACs per sample are T times one step's (they were priced for
    one step), while a layer called once keeps its own shape."""
    from rankfold.planner.sensitivity import layer_statistics

    steps, calib = 10, torch.randn(16, 6, 10)
    loaded = rankfold.load_onnx(_bidirectional_file(tmp_path, "lstm", calib[:1]))
    names = [name for name, m in loaded.named_modules() if isinstance(m, nn.Linear)]
    stats = layer_statistics(loaded, names, calib)
    recurrent = [name for name in names if "_recurrent" in name]
    assert len(recurrent) == 2
    assert all(stats[name].input_shape == (steps, 12) and stats[name].output_shape == (steps, 48)
               for name in recurrent)
    projection = next(name for name in names if name.endswith("_input"))
    assert stats[projection].input_shape[-1] == 8 and len(stats[projection].input_shape) >= 2
    result = rankfold.compress_to_budget(loaded, calib=calib, budgets={"params": "100%"}, bits=32, check=False)
    macs = {layer.name: layer.macs for layer in result.plan.layers}
    assert all(macs[name] == steps * 12 * 48 for name in recurrent), macs


@pytest.mark.parametrize("kind, quantized", [("lstm", False), ("gru", False), ("lstm", True)],
                         ids=["lstm", "gru", "dynamic-int8-lstm"])
def test_a_files_mac_count_includes_its_recurrences(tmp_path, monkeypatch, kind, quantized):
    """The file's MACs per sample: the convolution, T steps of both directions' W and R, the head;
    counting writes nothing into the working directory (onnxruntime's own shape tool would)."""
    from onnxruntime import quantization as q

    from rankfold.evaluate import onnx_size

    steps, gates = 10, {"lstm": 4, "gru": 3}[kind]
    path = _bidirectional_file(tmp_path, kind, torch.randn(1, 6, steps))
    if quantized:
        q.quantize_dynamic(str(path), str(tmp_path / "q.onnx"), op_types_to_quantize=["LSTM"])
        path = tmp_path / "q.onnx"
        assert "DynamicQuantizeLSTM" in {n.op_type for n in onnx.load(str(path)).graph.node}
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    conv, recurrence, head = steps * 8 * 6 * 3, steps * 2 * gates * 12 * (8 + 12), steps * 24 * 5
    # neither ONNX's shape inference nor onnxruntime's sizes what follows the contrib op: one run does
    assert onnx_size(path).macs == conv + recurrence + head
    assert list((tmp_path / "cwd").iterdir()) == []


class ReshapedRecurrent(Recurrent):
    """The LSTM's input made by a Reshape to a shape computed from Shape ops (ddddocr's recogniser):
    ONNX's shape inference leaves it open."""

    def forward(self, x):  # (N, 6, T)
        y = self.conv(x)
        y = y.permute(2, 0, 1).reshape(y.shape[2], y.shape[0], -1)  # (T, N, 8)
        return self.head(self.rnn(y)[0])


def test_a_recurrence_after_a_computed_reshape_is_counted(tmp_path):
    from rankfold.evaluate import onnx_size

    steps, path = 10, tmp_path / "r.onnx"
    model = ReshapedRecurrent("lstm", bidirectional=True).eval()
    model.rnn.batch_first = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 6, steps),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], dynamic_axes={"x": {0: "n", 2: "t"}})
    conv, recurrence, head = steps * 8 * 6 * 3, steps * 2 * 4 * 12 * (8 + 12), steps * 24 * 5
    assert onnx_size(path, sample_shape=(6, steps)).macs == conv + recurrence + head


def test_integer_convolutions_and_matmuls_with_constant_weights_are_layers(tmp_path):
    """ConvInteger / MatMulInteger (onnxruntime's dynamic quantization) read as float layers on
    (x_q - x_zero) with weights W - W_zero: the loaded graph matches onnxruntime, its convolutions
    and its Gemm are layers, and a byte budget re-quantizes them into a file no larger than the input."""
    from rankfold.evaluate import onnx_size
    from tests.helpers import run_cli

    x = np.random.default_rng(0).normal(size=(64, 3, 8, 8)).astype(np.float32)
    _src, out = _quantized_model(tmp_path, "dynamic", x[:16])
    loaded = rankfold.load_onnx(out)
    assert sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in loaded.modules()) == 3
    np.testing.assert_allclose(_ours(out, x[:8])[0], _ort(out, x[:8])[0], rtol=1e-4, atol=1e-4)
    np.savez(tmp_path / "calib.npz", x=x)
    # the toy's int8 file is 13 kB: QDQ's activation scales alone are a few percent of it
    code, _stdout, stderr = run_cli("compress", out, "--calib", tmp_path / "calib.npz", "--max-params", "90%",
                                    "--max-weight-bytes", "150%", "-o", tmp_path / "small.onnx", "--check", "relerr:10")
    assert code == 0, stderr
    assert onnx_size(str(tmp_path / "small.onnx")).weight_bytes <= 1.5 * onnx_size(out).weight_bytes


def test_a_qoperator_file_is_planned_on_its_convolutions_within_a_share_of_the_bytes_it_holds(tmp_path):
    """QLinearConv weights are layers (they were constants written in float, and 40 % of the int8
    file was refused): 40 % of its bytes is planned and the written file holds at most that; a
    share no plan reaches is refused in one line with nothing left behind; --bits 32 without a
    byte budget accepts a float result."""
    from rankfold.evaluate import onnx_size
    from tests.helpers import run_cli

    x = np.random.default_rng(0).normal(size=(64, 3, 8, 8)).astype(np.float32)
    _src, out = _quantized_model(tmp_path, "qoperator", x[:16])  # the Gemm stays a float layer
    np.savez(tmp_path / "calib.npz", x=x)
    args = ["compress", out, "--calib", tmp_path / "calib.npz", "--max-params", "90%", "--check", "relerr:10"]
    code, _stdout, stderr = run_cli(*args, "--max-weight-bytes", "40%", "-o", tmp_path / "small.onnx")
    assert code == 0, stderr
    assert onnx_size(str(tmp_path / "small.onnx")).weight_bytes <= 0.4 * onnx_size(out).weight_bytes
    before = sorted(os.listdir(tmp_path))
    code, _stdout, stderr = run_cli(*args, "--max-weight-bytes", "3%", "-o", tmp_path / "tiny.onnx")
    assert code == 2 and "Traceback" not in stderr, stderr
    assert "the result would hold" in stderr or "weight_bytes cannot be met" in stderr, stderr
    assert sorted(os.listdir(tmp_path)) == before
    code, _stdout, stderr = run_cli(*args, "--bits", "32", "-o", tmp_path / "in-float.onnx")
    assert code == 0, stderr


def test_sensitivities_flow_back_through_dynamically_quantized_activations(tmp_path):
    """The planner's sensitivities of the layers before a DynamicQuantizeLinear are not zero: its
    codes are rounded straight-through (as uint8 they cut the gradient, and those layers looked free)."""
    from rankfold.planner.sensitivity import layer_statistics

    x = np.random.default_rng(0).normal(size=(32, 3, 8, 8)).astype(np.float32)
    _src, out = _quantized_model(tmp_path, "dynamic", x[:16])
    loaded = rankfold.load_onnx(out)
    names = [name for name, m in loaded.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(names) == 3
    stats = layer_statistics(loaded, names, torch.from_numpy(x))
    assert all(float(stats[name].sensitivity.sum()) > 0 for name in names), \
        {name: float(stats[name].sensitivity.sum()) for name in names}
