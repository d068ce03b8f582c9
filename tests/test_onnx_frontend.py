import math
import os
import tempfile
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import rankfold
from rankfold.frontends.onnx import OnnxModule, on_one_device

REFERENCE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "models", "resnet18-fmnist.onnx")


class OpZoo(nn.Module):
    """Touches most ops of the front-end's list in one small network."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=(1, 2))
        self.fc = nn.Linear(8 * 2, 5)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = F.max_pool2d(x, 2, ceil_mode=True)
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        a, b = torch.split(x, 4, dim=1)
        x = torch.cat([F.hardswish(a), F.hardsigmoid(b) * torch.tanh(b)], dim=1)
        x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        x = F.leaky_relu(self.conv2(x), 0.1)
        x = torch.clamp(x, -1.0, 6.0) + torch.sigmoid(x)
        x = F.avg_pool2d(x, 2)
        x = x[:, :, 1:, :]
        x = x - x.mean(dim=(2, 3), keepdim=True) / torch.sqrt(x.pow(2).mean() + 1.0)
        x = x.flatten(2).mean(dim=2, keepdim=True)
        x = x.reshape(-1, 8)
        x = torch.cat([x, x * 0.5], dim=1)
        return torch.softmax(self.fc(x), dim=-1)


class AttentionBlock(nn.Module):
    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim))

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(-1, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(-1, t, d))
        return x + self.mlp(x)


def export(model, x, path, *, dynamo, opset=17, fold=True):
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, (x,), path, dynamo=True, opset_version=max(opset, 18), input_names=["input"],
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},), verbose=False)
        else:
            torch.onnx.export(model, (x,), path, dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=["output"], dynamic_axes={"input": {0: "b"}, "output": {0: "b"}},
                              do_constant_folding=fold)
    return str(path)


def ort_run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


class FieldOps(nn.Module):
    """Ops of detectors, OCR and face models from the field: PRelu, ConvTranspose, a Range grid."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.PReLU(8)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.up2 = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1, bias=False)
        with torch.no_grad():
            self.act.weight.uniform_(0.05, 0.5)

    def forward(self, x):
        y = self.up2(torch.relu(self.up(self.act(self.conv(x)))))
        grid = torch.arange(y.shape[3], dtype=torch.float32) / y.shape[3]
        return y + grid


CASES = {
    "field": (FieldOps, (2, 3, 8, 8)),
    "opzoo": (OpZoo, (2, 3, 16, 16)),
    "attention": (AttentionBlock, (2, 5, 16)),
    "mlp": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 4)),
            (2, 3, 4, 4)),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(),
                                     nn.Conv1d(8, 8, 5, stride=2, dilation=2)), (2, 4, 32)),
}


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("case", list(CASES))
def test_load_then_export_reproduces_the_original(tmp_path, case, dynamo):
    make, shape = CASES[case]
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(*shape)
    src = export(model, x, tmp_path / "src.onnx", dynamo=dynamo)
    loaded = rankfold.load_onnx(src)
    assert isinstance(loaded, OnnxModule)
    assert any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) for m in loaded.modules())
    x_big = torch.randn(7, *shape[1:])  # a batch size never seen in export: the batch stays dynamic
    expected = ort_run(src, x_big)
    np.testing.assert_allclose(loaded(x_big).detach().numpy(), expected, atol=1e-5, rtol=0)
    out = tmp_path / "again.onnx"
    rankfold.export_onnx(loaded, out, example_input=x)
    np.testing.assert_allclose(ort_run(out, x_big), expected, atol=1e-5, rtol=0)


def test_step_inputs_made_on_the_cpu_join_the_data_on_its_device():
    data = torch.empty(2, 3, device="meta")  # a second device that every machine has
    grid = torch.arange(3)  # as Range and ConstantOfShape make them
    moved = on_one_device([data, grid, [1, 2]])
    assert [v.device.type for v in moved[:2]] == ["meta", "meta"] and moved[2] == [1, 2]
    same = [torch.ones(2), torch.arange(2)]
    assert on_one_device(same) is same


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", list(CASES))
def test_a_loaded_graph_runs_on_the_gpu_as_on_the_cpu(case):
    make, shape = CASES[case]
    torch.manual_seed(0)
    x = torch.randn(*shape)
    with tempfile.TemporaryDirectory() as folder:
        loaded = rankfold.load_onnx(export(make().eval(), x, os.path.join(folder, "src.onnx"), dynamo=False))
    want = loaded(x).detach()
    got = loaded.to("cuda")(x.to("cuda")).detach().cpu()
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4, rtol=1e-4)


def test_unfolded_batchnorm_loads_and_folds(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.BatchNorm2d(8)).eval()
    with torch.no_grad():
        for bn in (model[1], model[3]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    src = export(model, x, tmp_path / "bn.onnx", dynamo=False, fold=False)
    assert sum(n.op_type == "BatchNormalization" for n in onnx.load(src).graph.node) == 2
    loaded = rankfold.load_onnx(src)
    assert sum(s.op == "BatchNormalization" for s in loaded.steps) == 1  # the one after the conv was folded
    np.testing.assert_allclose(loaded(x).detach().numpy(), ort_run(src, x), atol=1e-5)


def test_layers_are_named_after_nodes_and_compress(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1)).eval()
    x = torch.randn(2, 3, 8, 8)
    loaded = rankfold.load_onnx(export(model, x, tmp_path / "m.onnx", dynamo=False))
    names = [n for n, m in loaded.named_modules() if isinstance(m, nn.Conv2d)]
    assert names == ["n_0_Conv", "n_2_Conv"]
    compressed = rankfold.compress(loaded, keep=0.3, calib=torch.randn(16, 3, 8, 8))
    out = tmp_path / "c.onnx"
    rankfold.export_onnx(compressed, out, example_input=x)
    assert ort_run(out, torch.randn(5, 3, 8, 8)).shape == (5, 32, 8, 8)


def _graph(nodes, *, opset=17, inputs=None, inits=()):
    inputs = inputs if inputs is not None else [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph(nodes, "g", inputs, [out], initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_a_clip_whose_floor_the_data_computes_keeps_it_a_tensor(tmp_path):
    """A spectrogram's floor at its own maximum minus some decibels (openWakeWord's mel front end):
    the bound stays a tensor, so gradients pass without a warning and a traced export computes
    the floor of the batch it is given, not the example's (it failed at batches 1 and 3)."""
    path = tmp_path / "floor.onnx"
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32), "w")
    drop = numpy_helper.from_array(np.array(1.0, np.float32), "drop")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("ReduceMax", ["a"], ["m"], keepdims=0),
             helper.make_node("Sub", ["m", "drop"], ["floor"]), helper.make_node("Clip", ["a", "floor"], ["y"])]
    onnx.save(_graph(nodes, inits=[weight, drop]), path)
    model = rankfold.load_onnx(path)
    x = torch.randn(4, 4, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x).sum().backward()
    assert torch.allclose(model(x[:1]), torch.from_numpy(ort_run(path, x[:1].detach())))
    rankfold.export_onnx(model.eval(), tmp_path / "again.onnx", example_input=x.detach())  # verified at 4, 1, 3


def test_every_unsupported_op_is_named_at_once_with_its_count(tmp_path):
    path = tmp_path / "u.onnx"
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Bernoulli", ["a"], ["b"], name="mystery"),
             helper.make_node("Bernoulli", ["b"], ["c"]), helper.make_node("Det", ["c"], ["y"])]
    onnx.save(_graph(nodes), path)
    expected = r"unsupported ONNX ops: Bernoulli x2, Det x1 \(first at node 'mystery'\); supported: .*Conv"
    with pytest.raises(rankfold.RankfoldError, match=expected):
        rankfold.load_onnx(path)


def test_graph_without_inputs_is_refused(tmp_path):
    path = tmp_path / "n.onnx"
    const = helper.make_tensor("c", TensorProto.FLOAT, [1], [1.0])
    onnx.save(_graph([helper.make_node("Identity", ["c"], ["y"])], inputs=[], inits=[const]), path)
    with pytest.raises(rankfold.RankfoldError, match="no inputs"):
        rankfold.load_onnx(path)


def test_missing_external_data_is_a_clear_error(tmp_path):
    model = nn.Sequential(nn.Linear(64, 64)).eval()
    path = tmp_path / "ext.onnx"
    rankfold.export_onnx(model, path, example_input=torch.randn(1, 64))
    proto = onnx.load(path)
    onnx.save_model(proto, path, save_as_external_data=True, location="weights.bin", size_threshold=0)
    os.remove(tmp_path / "weights.bin")
    with pytest.raises(rankfold.RankfoldError, match="external"):
        rankfold.load_onnx(path)


@pytest.mark.parametrize("content", [b"", b"not an onnx file at all", b"\x08\x07\x12\x00garbage"])
def test_non_onnx_files_are_clear_errors(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(rankfold.RankfoldError):
        rankfold.load_onnx(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(rankfold.RankfoldError, match="no such file"):
        rankfold.load_onnx(tmp_path / "nope.onnx")


def test_opset_out_of_range_is_refused(tmp_path):
    path = tmp_path / "o.onnx"
    onnx.save(_graph([helper.make_node("Relu", ["x"], ["y"])], opset=26), path)
    with pytest.raises(rankfold.RankfoldError, match="opset 26"):
        rankfold.load_onnx(path)


def test_corrupted_variants_end_in_clean_errors_or_models(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    good = tmp_path / "good.onnx"
    rankfold.export_onnx(model, good, example_input=torch.randn(1, 1, 8, 8))
    data = good.read_bytes()
    rng = np.random.default_rng(0)
    variants = [data[: int(n)] for n in rng.integers(0, len(data), 150)]
    for _ in range(250):
        flipped = bytearray(data)
        for pos in rng.integers(0, len(data), rng.integers(1, 8)):
            flipped[pos] = int(rng.integers(0, 256))
        variants.append(bytes(flipped))
    outcomes = {"error": 0, "loaded": 0}
    path = tmp_path / "v.onnx"
    for blob in variants:
        path.write_bytes(blob)
        try:
            loaded = rankfold.load_onnx(path)
        except rankfold.RankfoldError as exc:
            assert "\n" not in str(exc)
            outcomes["error"] += 1
            continue
        with torch.no_grad():  # a model that loads runs, or fails with a RankfoldError
            try:
                loaded(torch.randn(1, 1, 8, 8))
            except (rankfold.RankfoldError, RuntimeError):
                pass
        outcomes["loaded"] += 1
    assert outcomes["error"] > 100 and sum(outcomes.values()) == 400


@pytest.mark.skipif(not os.path.isfile(REFERENCE), reason="reference network ../shared/models not present")
def test_reference_network_round_trip(tmp_path):
    loaded = rankfold.load_onnx(REFERENCE)
    x = torch.randn(3, 1, 32, 32)
    out = tmp_path / "r.onnx"
    rankfold.export_onnx(loaded, out, example_input=x[:1])
    np.testing.assert_allclose(ort_run(out, x), ort_run(REFERENCE, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("opset", [11, 13, 15, 18, 21])
@pytest.mark.parametrize("case", ["opzoo", "attention"])
def test_opsets_11_to_21_load(tmp_path, opset, case):
    make, shape = CASES[case]
    model = make().eval()
    src = export(model, torch.randn(*shape), tmp_path / "m.onnx", dynamo=False, opset=opset)
    assert onnx.load(src).opset_import[0].version == opset
    x = torch.randn(5, *shape[1:])
    np.testing.assert_allclose(rankfold.load_onnx(src)(x).detach().numpy(), ort_run(src, x), atol=1e-5, rtol=0)


def test_hand_built_graph_with_shape_arithmetic_matches_onnxruntime(tmp_path):
    """Ops that exporters rarely emit, and the Shape -> Gather -> Concat -> Reshape idiom."""
    f = TensorProto.FLOAT
    i64 = TensorProto.INT64
    inits = [
        helper.make_tensor("w", f, [4, 3, 3, 3], np.random.default_rng(0).standard_normal(108).tolist()),
        helper.make_tensor("zero", i64, [], [0]),
        helper.make_tensor("minus1", i64, [1], [-1]),
        helper.make_tensor("axes0", i64, [1], [0]),
        helper.make_tensor("axes23", i64, [2], [2, 3]),
        helper.make_tensor("split", i64, [2], [1, 3]),
        helper.make_tensor("lo", f, [], [-0.5]),
        helper.make_tensor("hi", f, [], [0.75]),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Clip", ["c", "lo", "hi"], ["clip"]),
        helper.make_node("Split", ["clip", "split"], ["s1", "s2"], axis=1),
        helper.make_node("Erf", ["s1"], ["e"]),
        helper.make_node("Constant", [], ["two"], value=helper.make_tensor("v", f, [], [2.0])),
        helper.make_node("Div", ["s2", "two"], ["d"]),
        helper.make_node("Concat", ["e", "d"], ["cat"], axis=1),
        helper.make_node("Transpose", ["cat"], ["t"], perm=[0, 1, 3, 2]),
        helper.make_node("Identity", ["t"], ["ident"]),
        helper.make_node("Dropout", ["ident"], ["drop"]),
        helper.make_node("AveragePool", ["drop"], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("ReduceMean", ["pool"], ["rm"], axes=[2, 3], keepdims=1),
        helper.make_node("Squeeze", ["rm", "axes23"], ["sq"]),
        helper.make_node("Unsqueeze", ["sq", "axes0"], ["unsq"]),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes0"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "minus1"], ["newshape"], axis=0),
        helper.make_node("Reshape", ["unsq", "newshape"], ["flat"]),
        helper.make_node("Softmax", ["flat"], ["y"], axis=-1),
    ]
    graph = _graph(nodes, opset=13, inputs=[helper.make_tensor_value_info("x", f, ["N", 3, 8, 8])], inits=inits)
    path = tmp_path / "h.onnx"
    onnx.save(graph, path)
    loaded = rankfold.load_onnx(path)
    x = torch.randn(6, 3, 8, 8)
    np.testing.assert_allclose(loaded(x).detach().numpy(), ort_run(path, x), atol=1e-6)
    out = tmp_path / "h2.onnx"
    rankfold.export_onnx(loaded, out, example_input=x[:2])
    np.testing.assert_allclose(ort_run(out, x), ort_run(path, x), atol=1e-6)


def test_export_verification_tells_float_noise_on_a_near_zero_output_from_a_real_difference(tmp_path):
    """An output that is ~1e-6 everywhere (a detector's sigmoid map on random input) and differs by
    ~1e-7 (float noise) passes the export check; it used to read as a 10 % relative error. A real
    difference is still refused."""
    import rankfold
    from rankfold.errors import RankfoldError
    from rankfold.export import onnx as exporter

    class NearZero(torch.nn.Module):
        def forward(self, x):
            return torch.sigmoid(x - 14)

    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    rankfold.export_onnx(NearZero(), tmp_path / "z.onnx", example_input=x)
    ref = NearZero()(x)
    noisy = ref + 1e-7 * torch.randn_like(ref)
    assert float((noisy - ref).norm() / ref.norm()) > 1e-2  # what the relative error alone refused
    exporter._verify(str(tmp_path / "z.onnx"), x, noisy)
    with pytest.raises(RankfoldError, match="disagrees"):
        exporter._verify(str(tmp_path / "z.onnx"), x, ref * 1.01 + 0.01)


def test_nodes_listed_out_of_order_are_read_in_an_order_that_computes(tmp_path):
    """onnxruntime's float16 converter (keep_io_types) appends the input Casts after the nodes that
    read them; onnxruntime runs such files, so rankfold reads them (the file is not changed). A
    cycle is still refused."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["h", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"]),
             helper.make_node("Sigmoid", ["x"], ["h"])]  # the first node's input, made last
    path = tmp_path / "unsorted.onnx"
    onnx.save(_graph(nodes, inits=[w]), path)
    before = path.read_bytes()
    x = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    module = rankfold.load_onnx(path)
    wanted = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.allclose(module(torch.from_numpy(x)).detach().numpy(), wanted, atol=1e-6)
    assert [m for m in module.modules() if isinstance(m, nn.Linear)]
    assert path.read_bytes() == before
    cycle = [helper.make_node("Relu", ["b"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Add", ["x", "b"], ["y"])]
    onnx.save(_graph(cycle), tmp_path / "cycle.onnx")
    with pytest.raises(rankfold.RankfoldError, match="invalid ONNX model"):
        rankfold.load_onnx(tmp_path / "cycle.onnx")




def _steps_computing_as_onnxruntime(path, x: np.ndarray) -> list[str]:
    """The ops of the file as read, after checking that they compute what onnxruntime computes on x."""
    module = rankfold.load_onnx(path)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    with torch.no_grad():
        got = module(torch.from_numpy(x))
    got = got if isinstance(got, tuple) else (got,)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-5, atol=1e-5)
    return [step.op for step in module.steps]

def _more_activations_graph(tmp_path, half_first: bool, extra_output: str | None = None):
    """Linear -> GELU as torch.onnx writes it (x * (Erf(x / sqrt 2) + 1) * 0.5; or with the 0.5 on x
    first and x * (1 / sqrt 2)) -> Linear -> Mish as Mul(x, Tanh(Softplus(x))) -> Linear ->
    hard-swish as Mul(x, HardSigmoid(x)) at alpha 1/6 -> Linear -> Mul(x, HardSigmoid(x)) at the
    default alpha 0.2, which is not a hard-swish."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), f"w{i}") for i in range(4)]
    consts = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in
              (("sqrt2", np.sqrt(2.0)), ("rsqrt2", np.sqrt(0.5)), ("one", 1.0), ("half", 0.5))]
    if half_first:
        gelu = [helper.make_node("Mul", ["rsqrt2", "a"], ["s"]), helper.make_node("Erf", ["s"], ["e"]),
                helper.make_node("Add", ["one", "e"], ["g"]), helper.make_node("Mul", ["a", "half"], ["h"]),
                helper.make_node("Mul", ["h", "g"], ["ge"])]
    else:
        gelu = [helper.make_node("Div", ["a", "sqrt2"], ["s"]), helper.make_node("Erf", ["s"], ["e"]),
                helper.make_node("Add", ["e", "one"], ["g"]), helper.make_node("Mul", ["a", "g"], ["h"]),
                helper.make_node("Mul", ["h", "half"], ["ge"])]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["a"]), *gelu,
             helper.make_node("MatMul", ["ge", "w1"], ["b"]), helper.make_node("Softplus", ["b"], ["sp"]),
             helper.make_node("Tanh", ["sp"], ["t"]), helper.make_node("Mul", ["b", "t"], ["mi"]),
             helper.make_node("MatMul", ["mi", "w2"], ["c"]),
             helper.make_node("HardSigmoid", ["c"], ["hs"], alpha=1 / 6, beta=0.5),
             helper.make_node("Mul", ["hs", "c"], ["sw"]), helper.make_node("MatMul", ["sw", "w3"], ["d"]),
             helper.make_node("HardSigmoid", ["d"], ["ds"]), helper.make_node("Mul", ["d", "ds"], ["y"])]
    returned = ["y"] + ([extra_output] if extra_output else [])
    outputs = [helper.make_tensor_value_info(v, TensorProto.FLOAT, [None, 8]) for v in returned]
    graph = helper.make_graph(nodes, "more", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])],
                              outputs, weights + consts)
    path = tmp_path / f"more{int(half_first)}{extra_output or ''}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


@pytest.mark.parametrize("half_first", [False, True])
def test_gelu_mish_and_hard_sigmoid_swish_written_as_several_nodes_are_read_as_one_op(tmp_path, half_first):
    """GELU (Erf), Mish and hard-swish as x * HardSigmoid(x) run as one torch op each and compute what
    onnxruntime computes; a HardSigmoid at another slope, and a GELU whose Erf the graph also
    returns, stay as written."""
    from rankfold.frontends.activations import FUSED_MISH

    x = np.random.default_rng(1).normal(scale=2.0, size=(16, 8)).astype(np.float32)
    for extra, fused in ((None, True), ("e", False)):
        path = _more_activations_graph(tmp_path, half_first, extra)
        ops = _steps_computing_as_onnxruntime(path, x)
        assert (ops.count("Gelu") == 1 and "Erf" not in ops) == fused, ops
        assert ops.count(FUSED_MISH) == 1 and "Softplus" not in ops and "Tanh" not in ops, ops
        assert ops.count("HardSwish") == 1 and ops.count("HardSigmoid") == 1, ops  # the 0.2 one stays

class _TanhGelus(nn.Module):
    """GELU's tanh approximation as three libraries write it, then the same formula with another
    cubic coefficient (0.05), which is not a GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.linears = nn.ModuleList(nn.Linear(8, 8) for _ in range(5))

    @staticmethod
    def gelu_new(x, cubic=0.044715):  # GPT-2 / Hugging Face: x^3 as a power, the half first
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + cubic * torch.pow(x, 3.0))))

    @staticmethod
    def gelu_fast(x):  # Hugging Face's FastGELU: x * c * (1 + k x^2)
        return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))

    def forward(self, x):
        x = F.gelu(self.linears[0](x), approximate="tanh")
        x = self.gelu_new(self.linears[1](x))
        x = self.gelu_fast(self.linears[2](x))
        return self.linears[4](self.gelu_new(self.linears[3](x), cubic=0.05))


@pytest.mark.parametrize("dynamo", [False, True])
def test_gelus_tanh_approximation_as_exporters_write_it_is_read_as_one_op(tmp_path, dynamo):
    """torch's gelu(approximate="tanh"), GPT-2's gelu_new and Hugging Face's FastGELU, exported by
    either torch.onnx exporter, run as one Gelu each and compute what onnxruntime computes; the same
    formula with another coefficient stays as written."""
    path = tmp_path / f"tanh-gelus{int(dynamo)}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_TanhGelus().eval(), (torch.randn(4, 8),), str(path), dynamo=dynamo, opset_version=18,
                          input_names=["x"], dynamic_axes=None if dynamo else {"x": {0: "n"}}, verbose=False)
    x = np.random.default_rng(1).normal(scale=2.0, size=(4, 8)).astype(np.float32)
    ops = _steps_computing_as_onnxruntime(path, x)
    assert ops.count("Gelu") == 3 and ops.count("Tanh") == 1 and ops.count("Pow") <= 1, ops


def _activation_graph(tmp_path, opset: int, extra_output: str | None = None):
    """Conv -> hard-swish as Paddle2ONNX writes it (Add 3, Clip 0..6, Mul, Div 6) -> Conv -> SiLU as
    Mul(x, Sigmoid(x)), as YOLOv8's exporter writes it."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=(8, 8, 1, 1)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array(3.0, np.float32), "three"),
             numpy_helper.from_array(np.array(6.0, np.float32), "six"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    clip = helper.make_node("Clip", ["shifted", "zero", "six"], ["clipped"]) if opset >= 11 else \
        helper.make_node("Clip", ["shifted"], ["clipped"], min=0.0, max=6.0)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["a", "three"], ["shifted"]), clip,
             helper.make_node("Mul", ["a", "clipped"], ["scaled"]),
             helper.make_node("Div", ["scaled", "six"], ["hs"]),
             helper.make_node("Conv", ["hs", "w2"], ["b"]),
             helper.make_node("Sigmoid", ["b"], ["gate"]),
             helper.make_node("Mul", ["gate", "b"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8, 6, 6])]
    if extra_output:
        outputs.append(helper.make_tensor_value_info(extra_output, TensorProto.FLOAT, [None, 8, 6, 6]))
    graph = helper.make_graph(nodes, "acts", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 6, 6])],
                              outputs, inits)
    path = tmp_path / f"acts{opset}{extra_output or ''}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)
    return path


@pytest.mark.parametrize("opset", [10, 13])
def test_hard_swish_and_silu_written_as_several_nodes_are_read_as_one_op(tmp_path, opset):
    """Every pass over calibration data runs a model's activations: the four nodes of a Paddle2ONNX
    hard-swish and the two of a SiLU run as one torch op each, computing what onnxruntime computes;
    where an intermediate value is also returned, the nodes stay as written."""
    from rankfold.frontends.activations import FUSED_SILU

    x = np.random.default_rng(1).normal(scale=3.0, size=(4, 3, 6, 6)).astype(np.float32)
    for extra, fused in ((None, True), ("clipped", False)):
        path = _activation_graph(tmp_path, opset, extra)
        ops = _steps_computing_as_onnxruntime(path, x)
        assert (ops.count("HardSwish") == 1 and "Div" not in ops and "Clip" not in ops) == fused, ops
        assert ops.count(FUSED_SILU) == 1 and "Sigmoid" not in ops


def _affine_after_conv_graph(path) -> None:
    """Conv -> Mul by a scalar -> Add per channel (Paddle2ONNX's learnable affine block) -> Relu ->
    another affine block -> Conv without bias -> Add of its bias -> Mul by a constant map (not per
    channel: stays) -> Gemm."""
    rng = np.random.default_rng(3)
    inits = {"w1": rng.normal(size=(32, 8, 3, 3)) / 8, "b1": rng.normal(size=32) / 10, "s": np.array([1.7]),
             "t": rng.normal(size=(32, 1, 1)), "w2": rng.normal(size=(24, 32, 3, 3)) / 17,
             "b2": rng.normal(size=(1, 24, 1, 1)), "map": rng.normal(size=(24, 4, 4)), "s2": [0.8], "t2": [-0.1],
             "w3": rng.normal(size=(384, 5)) / 20}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["s", "c1"], ["scaled"]), helper.make_node("Add", ["scaled", "t"], ["shifted"]),
             helper.make_node("Relu", ["shifted"], ["r1"]), helper.make_node("Mul", ["r1", "s2"], ["r1s"]),
             helper.make_node("Add", ["t2", "r1s"], ["r1t"]),
             helper.make_node("Conv", ["r1t", "w2"], ["c2"], strides=[2, 2]),
             helper.make_node("Add", ["c2", "b2"], ["biased"]), helper.make_node("Mul", ["biased", "map"], ["m"]),
             helper.make_node("Flatten", ["m"], ["f"]), helper.make_node("MatMul", ["f", "w3"], ["y"])]
    graph = helper.make_graph(nodes, "affine", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
                              [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in inits.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_a_mul_and_add_per_channel_after_a_conv_fold_into_it_and_a_changed_layer_is_written_in_their_place(tmp_path):
    """Each was a pass over the map in every run on calibration data, and a node of the written
    file; a Mul by a map that varies over the pixels is not per channel and stays. The affine block
    after the Relu runs as one op, and stays in the written file as the two nodes it was."""
    from rankfold.export.graft import checked_graft
    from rankfold.frontends.activations import FUSED_SCALE_SHIFT

    path = tmp_path / "affine.onnx"
    _affine_after_conv_graph(path)
    x = np.random.default_rng(4).normal(size=(8, 8, 9, 9)).astype(np.float32)
    assert _steps_computing_as_onnxruntime(path, x) == ["Conv", "Relu", FUSED_SCALE_SHIFT, "Conv", "Mul", "Flatten",
                                                        "MatMul"]
    original, result = rankfold.load_onnx(path), rankfold.load_onnx(path)
    with torch.no_grad():
        for layer in result.modules():
            if isinstance(layer, nn.Conv2d):
                layer.weight.mul_(1.01)
    graph = checked_graft(result, original, torch.from_numpy(x))  # checked in onnxruntime against `result`
    written = [n.op_type for n in graph.graph.node]
    assert written.count("Mul") == 2 and written.count("Add") == 1 and written.count("Conv") == 2, written


def test_convolutions_read_channels_last_maps():
    """torch's CPU convolutions run two to five times faster on them (frontends.onnx._layer_argument)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    with tempfile.TemporaryDirectory() as scratch:
        loaded = rankfold.load_onnx(export(model, torch.randn(2, 3, 8, 8), os.path.join(scratch, "m.onnx"),
                                           dynamo=False))
    seen = []
    for layer in loaded.modules():
        if isinstance(layer, nn.Conv2d):
            layer.register_forward_pre_hook(
                lambda m, i: seen.append(i[0].is_contiguous(memory_format=torch.channels_last)))
    x = torch.randn(2, 3, 8, 8)
    np.testing.assert_allclose(loaded(x).detach().numpy(), model(x).detach().numpy(), atol=1e-5)
    assert seen == [True, True]
