"""The C back-end's everyday ops (issue 18): each bit-exact against the golden model in C, on the
host and on emulated Cortex-M3 (plain C), M4 and M7 (DSP extension), and within one unit of
onnxruntime's own int8 tensors, op by op."""

import shutil

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from rankfold.cexport.golden import run_golden
from rankfold.cexport.ir import read_program
from rankfold.cexport.run import build_host, export_c, qemu_tools_missing, quantize_input, run_c, run_host
from rankfold.errors import RankfoldError
from rankfold.quantize.export import export_quantized

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no host C compiler")
needs_qemu = pytest.mark.skipif(qemu_tools_missing() is not None,
                                reason="Arm toolchain or qemu-system-arm missing (gcc-arm-none-eabi, "
                                       "libnewlib-arm-none-eabi, qemu-system-arm)")


class Everyday(nn.Module):
    """The ops microcontroller CNNs use beyond convolutions: pooling, concatenation, squeeze-and-
    excitation (mean, sigmoid, per-channel Mul), hard-swish, PReLU, LeakyReLU, padding, a transpose,
    a softmax output."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.branch = nn.Conv2d(8, 4, 1)
        self.se_reduce = nn.Conv2d(12, 4, 1)
        self.se_expand = nn.Conv2d(4, 12, 1)
        self.depthwise = nn.Conv2d(12, 12, 5, padding=2, groups=12)  # the 5-tap rows at stride 1
        self.prelu = nn.PReLU(12, init=0.2)
        self.fc = nn.Linear(12 * 6 * 6, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.stem(x)), 2)
        x = torch.cat([x, F.leaky_relu(self.branch(x), 0.1)], 1)
        x = x * torch.sigmoid(self.se_expand(F.relu(self.se_reduce(x.mean((2, 3), keepdim=True)))))
        x = self.prelu(F.hardswish(self.depthwise(x)))
        x = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        x = F.hardsigmoid(F.pad(x, (1, 0, 0, 1)).permute(0, 1, 3, 2))
        return torch.softmax(self.fc(x.flatten(1)), 1)


class MobileNetV3Block(nn.Module):
    """MobileNetV3's bottleneck: 1x1 expand + hard-swish, depthwise 5x5 stride 2 (4-bit),
    squeeze-and-excitation with a hard-sigmoid gate, 1x1 project; average pooling with the padding
    counted, a 3x3 max-pool with ceil_mode."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, stride=2, padding=1)
        self.expand = nn.Conv2d(16, 32, 1)
        self.depthwise = nn.Conv2d(32, 32, 5, stride=2, padding=2, groups=32)
        self.se_reduce = nn.Conv2d(32, 8, 1)
        self.se_expand = nn.Conv2d(8, 32, 1)
        self.project = nn.Conv2d(32, 24, 1)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        x = F.hardswish(self.stem(x))
        x = F.hardswish(self.depthwise(F.hardswish(self.expand(x))))
        gate = F.hardsigmoid(self.se_expand(F.relu(self.se_reduce(F.adaptive_avg_pool2d(x, 1)))))
        x = self.project(x * gate)
        x = F.max_pool2d(F.avg_pool2d(x, 2, stride=1, padding=1, count_include_pad=True), 3, 2, ceil_mode=True)
        return self.fc(x.mean((2, 3)))


def _qdq(model: nn.Module, bits: dict, path, shape, samples=48) -> np.ndarray:
    torch.manual_seed(0)
    calib = torch.randn(samples, *shape)
    export_quantized(model.eval(), bits, path, calib=calib, example_input=calib[:2], reduce_range=False)
    return calib.numpy()


@pytest.fixture(scope="module")
def everyday(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("ops")
    x = _qdq(Everyday(), dict.fromkeys(("stem", "branch", "se_reduce", "se_expand", "depthwise", "fc"), 8),
             root / "q.onnx", (1, 10, 10))
    return root, x


@pytest.fixture(scope="module")
def mobilenetv3(tmp_path_factory):
    torch.manual_seed(1)
    root = tmp_path_factory.mktemp("v3")
    bits = {"stem": 8, "expand": 8, "depthwise": 4, "se_reduce": 8, "se_expand": 8, "project": 4, "fc": 8}
    x = _qdq(MobileNetV3Block(), bits, root / "q.onnx", (1, 16, 16))
    return root, x


def test_every_op_of_the_model_is_read_as_its_own_integer_op(everyday):
    root, _ = everyday
    program = read_program(onnx.load(root / "q.onnx"))
    kinds = {getattr(op, "function", "") or getattr(op, "kind", "") or type(op).__name__ for op in program.ops}
    assert {"max", "avg", "Concat", "Mul", "Sigmoid", "HardSwish", "PRelu", "LeakyRelu", "Pad", "Transpose",
            "HardSigmoid", "Softmax", "AvgPool"} <= kinds, kinds


@needs_cc
@pytest.mark.parametrize("name", ["everyday", "mobilenetv3"])
def test_c_is_bit_exact_with_the_golden_model_and_within_one_unit_of_onnxruntime_op_by_op(name, request, tmp_path):
    root, x = request.getfixturevalue(name)
    export_c(onnx.load(root / "q.onnx"), str(tmp_path / "c"))
    program = read_program(onnx.load(tmp_path / "c" / "model.onnx"))
    binary = build_host(str(tmp_path / "c"), sanitize=True)
    x_q = quantize_input(program, x)
    np.testing.assert_array_equal(run_host(binary, program, x_q), run_golden(program, x_q).reshape(len(x), -1))
    result = run_c(str(tmp_path / "c"), x, None)
    assert result["golden_mismatches"] == 0
    by_op = result["onnx_op_max_unit_difference_by_op"]
    new_ops = {"MaxPool", "AveragePool", "Concat", "Mul", "Sigmoid", "HardSwish", "HardSigmoid", "PRelu",
               "LeakyRelu", "Pad", "Transpose", "Softmax"}
    assert set(by_op) & new_ops, by_op
    assert all(by_op[kind] <= 1 for kind in set(by_op) & new_ops), by_op
    assert result["onnx_agreement"] >= 0.95


@needs_qemu
@pytest.mark.parametrize("board", ["mps2-an385", "mps2-an386", "mps2-an500"])  # M3 plain C, M4 and M7 DSP
def test_cortex_m_builds_match_the_host_with_and_without_the_dsp_extension(mobilenetv3, everyday, tmp_path, board):
    for index, (root, x) in enumerate((mobilenetv3, everyday)):
        directory = str(tmp_path / f"c{index}")
        export_c(onnx.load(root / "q.onnx"), directory)
        result = run_c(directory, x[:4], None, qemu=board, qemu_samples=4)
        assert result["golden_mismatches"] == 0 and result["qemu_matches_host"] is True, (board, index)


@needs_cc
def test_kernels_agree_on_odd_shapes_and_four_bit_weights(tmp_path):
    """Odd channel and pixel counts (the 2x2 kernel's edges), rows that are not whole words, 4-bit
    weights in every kernel, dilation, a stride-2 depthwise layer, a fully connected layer whose
    input is not a whole number of words."""

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 7, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
            self.b = nn.Conv2d(7, 7, 3, stride=2, padding=1, groups=7)  # the stride-2 3x3 depthwise rows
            self.c = nn.Conv2d(7, 5, 3)
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            return self.fc(F.relu(self.c(F.relu(self.b(F.relu(self.a(x)))))).flatten(1))

    for bits in (8, 4):
        path = tmp_path / f"odd{bits}.onnx"
        x = _qdq(Odd(), dict.fromkeys("abc", bits) | {"fc": bits}, path, (3, 9, 7))
        directory = str(tmp_path / f"c{bits}")
        export_c(onnx.load(path), directory)
        result = run_c(directory, x, None, sanitize=True)
        assert result["golden_mismatches"] == 0, bits


def test_scratch_is_two_int16_columns_not_a_padded_copy_and_every_layers_ram_is_written(tmp_path):
    """Layer A of issue 18 (3x3, 64->64, 16x16, pad 1): the old kernel copied the padded input
    (20,736 B); the im2col kernel needs two columns of 576 int16 values (2,304 B, as CMSIS-NN)."""
    from rankfold.cexport.codegen import RAM_TABLE, arena_bytes, scratch_bytes

    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU())
    x = _qdq(model, {"0": 8}, tmp_path / "a.onnx", (64, 16, 16), samples=8)
    program = read_program(onnx.load(tmp_path / "a.onnx"))
    conv = program.ops[0]
    assert scratch_bytes(program, conv) == 2 * 576 * 2
    assert arena_bytes(program) == 2 * 64 * 16 * 16 + 2304  # input, output, the columns: all live at once
    info = export_c(onnx.load(tmp_path / "a.onnx"), str(tmp_path / "c"))
    rows = (tmp_path / "c" / RAM_TABLE).read_text().splitlines()[2:]
    assert len(rows) == len(program.ops) == len(info["ram_per_op"])
    assert max(int(r.split("\t")[3]) for r in rows) <= info["arena_bytes"]  # the planner placed the scratch
    assert run_c(str(tmp_path / "c"), x, None)["golden_mismatches"] == 0


class ShapeArithmetic(nn.Module):
    """Reads its input's size at run time (Shape, Gather, Concat, Reshape in the ONNX graph)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        y = y.reshape(y.shape[0], y.shape[1], y.shape[2] * y.shape[3]).mean(2)
        return self.fc(y)


@needs_cc
def test_shape_arithmetic_folds_and_an_open_input_size_is_fixed_by_the_data(tmp_path):
    x = _qdq(ShapeArithmetic(), {"conv": 8, "fc": 8}, tmp_path / "q.onnx", (3, 12, 10), samples=16)
    model = onnx.load(tmp_path / "q.onnx")
    assert any(n.op_type == "Shape" for n in model.graph.node)
    for dim, name in zip(list(model.graph.input[0].type.tensor_type.shape.dim)[2:], ("height", "width")):
        dim.ClearField("dim_value")
        dim.dim_param = name  # as an exporter leaves a detector's or recogniser's size open
    with pytest.raises(RankfoldError, match="no static shape.*give --calib data of that size"):
        export_c(model, str(tmp_path / "open"))
    assert not (tmp_path / "open").exists()
    export_c(model, str(tmp_path / "c"), sample_shape=(3, 12, 10))
    saved = onnx.load(tmp_path / "c" / "model.onnx")
    assert [d.dim_value for d in saved.graph.input[0].type.tensor_type.shape.dim][1:] == [3, 12, 10]
    result = run_c(str(tmp_path / "c"), x, None)
    assert result["golden_mismatches"] == 0 and result["accuracy"] is None
    with pytest.raises(RankfoldError, match=r"samples have shape \(3, 9, 9\)"):
        export_c(saved, str(tmp_path / "c2"), sample_shape=(3, 9, 9))


@needs_cc
def test_a_float_graph_with_prelu_and_two_outputs_exports_through_the_front_end(tmp_path):
    """As MTCNN's nets come (keras2onnx): PRelu with one slope per channel, two heads. The ONNX
    front-end keeps PRelu a PRelu (not Where) so that the C back-end runs it as a table per channel."""
    from onnx import TensorProto, helper, numpy_helper

    from rankfold.cexport.run import quantize_for_c

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3)).astype(np.float32) * 0.3, "w"),
             numpy_helper.from_array(np.linspace(0.05, 0.4, 6, dtype=np.float32).reshape(6, 1, 1), "slope"),
             numpy_helper.from_array(rng.standard_normal((6 * 8 * 8, 4)).astype(np.float32) * 0.1, "fc1"),
             numpy_helper.from_array(rng.standard_normal((6 * 8 * 8, 2)).astype(np.float32) * 0.1, "fc2"),
             numpy_helper.from_array(np.array([0, -1], np.int64), "flat")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("PRelu", ["c", "slope"], ["p"]),
             helper.make_node("Reshape", ["p", "flat"], ["f"]),
             helper.make_node("MatMul", ["f", "fc1"], ["box"]),
             helper.make_node("MatMul", ["f", "fc2"], ["s"]),
             helper.make_node("Softmax", ["s"], ["face"], axis=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("box", TensorProto.FLOAT, ["N", 4]),
                               helper.make_tensor_value_info("face", TensorProto.FLOAT, ["N", 2])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "f.onnx")
    x = rng.standard_normal((32, 3, 8, 8)).astype(np.float32)
    qdq = quantize_for_c(str(tmp_path / "f.onnx"), x, lambda _m: None)
    assert any(n.op_type == "PRelu" for n in qdq.graph.node) and not any(n.op_type == "Where" for n in qdq.graph.node)
    export_c(qdq, str(tmp_path / "c"))
    result = run_c(str(tmp_path / "c"), x, None, sanitize=True)
    assert result["outputs"] == 2 and result["golden_mismatches"] == 0
    assert result["onnx_op_max_unit_difference_by_op"]["PRelu"] <= 1
