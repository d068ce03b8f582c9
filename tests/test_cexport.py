import json
import re
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from rankfold.cexport.arith import multiply_by_quantized_multiplier, quantize_multiplier
from rankfold.cexport.codegen import plan_arena
from rankfold.cexport.golden import run_golden
from rankfold.cexport.ir import read_program
from rankfold.cexport.run import build_host, export_c, quantize_input, run_c, run_host
from rankfold.errors import RankfoldError
from rankfold.quantize.export import export_quantized

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no host C compiler")


def test_quantized_multiplier_reproduces_the_real_factor():
    for real in (0.0003, 0.25, 0.7, 1.0, 3.7):
        multiplier, shift = quantize_multiplier(real)
        assert 2**30 <= multiplier < 2**31
        x = np.arange(-5000, 5000, 7)
        got = multiply_by_quantized_multiplier(x, multiplier, shift)
        assert np.abs(got - x * real).max() <= 1.0  # two roundings (high mul, then shift): within one unit


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # depthwise
        self.down = nn.Conv2d(8, 16, (3, 1), stride=2, padding=(1, 0))  # Kx1, strided
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.b(torch.relu(self.a(x))))
        x = torch.relu(self.down(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def qdq(tmp_path_factory):
    torch.manual_seed(0)
    model = Residual().eval()
    calib = torch.randn(64, 1, 10, 10)
    root = tmp_path_factory.mktemp("c")
    bits = {"stem": 8, "a": 8, "b": 8, "down": 4, "fc": 8}
    export_quantized(model, bits, root / "q.onnx", calib=calib, example_input=calib[:2])
    return root, calib.numpy()


def test_int4_groups_are_refused_not_misread(tmp_path):
    """Blocked DequantizeLinear (a scale and a zero point per group of inputs) has no C kernel:
    refused by name, before any code is written."""
    torch.manual_seed(0)
    model = Residual().eval()
    calib = torch.randn(64, 1, 10, 10)
    export_quantized(model, {"stem": 8, "a": 8, "b": 8, "down": 8, "fc": 4}, tmp_path / "g.onnx", calib=calib,
                     example_input=calib[:2], groups={"fc": 8}, reduce_range=False)
    with pytest.raises(RankfoldError, match="int4 groups of 8 .* C back-end takes symmetric weights"):
        read_program(onnx.load(tmp_path / "g.onnx"))


def test_arena_reuses_memory_without_overlapping_live_tensors(qdq):
    root, _ = qdq
    program = read_program(onnx.load(root / "q.onnx"))
    arena = plan_arena(program)
    assert arena.size < sum(t.size for t in program.tensors.values())  # something is reused
    live = {}
    for i, op in enumerate(program.ops):
        for name in op.inputs + [op.out]:
            live.setdefault(name, [i, i])[1] = i
    live[program.input][0] = -1
    names = list(live)
    for i, m in enumerate(names):
        for n in names[i + 1 :]:
            (f1, l1), (f2, l2) = live[m], live[n]
            if f1 <= l2 and f2 <= l1:  # alive together: must not share bytes
                a0, a1 = arena.offsets[m], arena.offsets[m] + program.tensors[m].size
                b0, b1 = arena.offsets[n], arena.offsets[n] + program.tensors[n].size
                assert a1 <= b0 or b1 <= a0, (m, n)


def test_golden_model_follows_onnxruntime(qdq):
    import onnxruntime as ort

    root, calib = qdq
    program = read_program(onnx.load(root / "q.onnx"))
    golden = run_golden(program, quantize_input(program, calib)).astype(np.int64)
    session = ort.InferenceSession(str(root / "q.onnx"), providers=["CPUExecutionProvider"])
    ref = session.run(None, {session.get_inputs()[0].name: calib})[0]
    out = program.tensors[program.output]
    ref_q = np.clip(np.round(ref / out.scale) + out.zero_point, -128, 127)
    assert np.abs(golden - ref_q).max() <= 3  # rounding differs per op (fused ReLU: one rounding, not two)
    assert (golden.argmax(1) == ref.argmax(1)).mean() >= 0.95


def test_layers_kept_float_run_in_int8_from_their_inputs_parameters(tmp_path):
    """A plan may keep the first and last layer float; in the QDQ file they read unquantized inputs
    (for onnxruntime), and the C back-end, which has no float layers, runs them in int8."""
    import onnxruntime as ort

    torch.manual_seed(0)
    model = Residual().eval()
    calib = torch.randn(64, 1, 10, 10)
    export_quantized(model, {"stem": 32, "a": 8, "b": 8, "down": 8, "fc": 32}, tmp_path / "q.onnx", calib=calib,
                     example_input=calib[:2])
    program = read_program(onnx.load(tmp_path / "q.onnx"))
    golden = run_golden(program, quantize_input(program, calib.numpy()))
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    ref = session.run(None, {session.get_inputs()[0].name: calib.numpy()})[0]
    assert (golden.argmax(1) == ref.argmax(1)).mean() >= 0.9


@needs_cc
def test_generated_c_is_bit_exact_with_the_golden_model_under_sanitizers(qdq, tmp_path):
    root, calib = qdq
    info = export_c(onnx.load(root / "q.onnx"), str(tmp_path / "c"))
    assert info["arena_bytes"] > 0 and (tmp_path / "c" / "model.h").is_file()
    program = read_program(onnx.load(tmp_path / "c" / "model.onnx"))
    binary = build_host(str(tmp_path / "c"), sanitize=True)  # -Wall -Wextra -pedantic -Werror as well
    x_q = quantize_input(program, calib)
    c_out = run_host(binary, program, x_q)
    np.testing.assert_array_equal(c_out, run_golden(program, x_q).reshape(len(calib), -1))


@needs_cc
def test_one_weight_scale_per_tensor_runs_in_c_bit_exact_and_as_onnxruntime_does(tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    model = Residual().eval()
    calib = torch.randn(64, 1, 10, 10)
    bits = {"stem": 8, "a": 8, "b": 8, "down": 4, "fc": 8}
    export_quantized(model, bits, tmp_path / "q.onnx", calib=calib, example_input=calib[:2],
                     per_tensor=["a", "b", "down", "fc"])
    proto = onnx.load(tmp_path / "q.onnx")
    scalar_scales = [i for i in proto.graph.initializer if i.name.endswith("_wscale") and not i.dims]
    assert len(scalar_scales) == 4
    program = read_program(proto)
    x = calib.numpy()
    golden = run_golden(program, quantize_input(program, x)).astype(np.int64)
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    ref = session.run(None, {session.get_inputs()[0].name: x})[0]
    out = program.tensors[program.output]
    assert np.abs(golden - np.clip(np.round(ref / out.scale) + out.zero_point, -128, 127)).max() <= 3
    export_c(proto, str(tmp_path / "c"))
    binary = build_host(str(tmp_path / "c"))
    x_q = quantize_input(program, x)
    np.testing.assert_array_equal(run_host(binary, program, x_q), golden.reshape(len(x), -1))


@needs_cc
def test_run_c_cli_reports_the_contract_keys(qdq, tmp_path):
    root, calib = qdq
    labels = np.zeros(len(calib), np.int64)
    np.savez(tmp_path / "data.npz", x=calib, y=labels)
    proc = subprocess.run([sys.executable, "-m", "rankfold.cli", "export-c", str(root / "q.onnx"), "-o",
                           str(tmp_path / "c"), "--target", "cortex-m4"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "rankfold.cli", "run-c", str(tmp_path / "c"), "--data",
                           str(tmp_path / "data.npz"), "--json", "-q"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert {"accuracy", "golden_mismatches", "onnx_agreement", "flash_bytes", "ram_bytes", "instructions"} <= set(
        result)
    assert result["golden_mismatches"] == 0 and result["onnx_agreement"] >= 0.95
    assert result["onnx_op_within_one_unit"] >= 0.97  # op by op, on onnxruntime's own inputs
    assert "reference arithmetic" in result["onnx_compared_with"]  # the same on every CPU
    assert result["onnx_default_int8_kernel_max_units"] <= 1 and result["host_cpu"]


def test_unsupported_op_is_named_and_nothing_is_written(tmp_path):
    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    zero = helper.make_tensor("z", TensorProto.INT8, [], [0])
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("Hardmax", ["xd"], ["y"]),
             helper.make_node("Hardmax", ["y"], ["y2"]),
             helper.make_node("Det", ["y2"], ["y3"]),
             helper.make_node("QuantizeLinear", ["y3", "s", "z"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4])], [scale, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(RankfoldError, match=r"Hardmax x2, Det x1 \(first: op Hardmax"):  # every one, at once
        export_c(model, str(tmp_path / "c"))
    assert not (tmp_path / "c").exists() and list(tmp_path.iterdir()) == []


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, ReLU6, depthwise 3x3, ReLU6, 1x1 project, residual add."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.expand = nn.Conv2d(8, 24, 1)
        self.depthwise = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.project = nn.Conv2d(24, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = nn.functional.relu6(self.stem(x))
        y = self.project(nn.functional.relu6(self.depthwise(nn.functional.relu6(self.expand(x)))))
        return self.fc((x + y).mean((2, 3)))


def test_relu6_is_fused_into_the_layer_before_it(tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    model = InvertedResidual().eval()
    calib = torch.randn(64, 1, 10, 10) * 3  # wide enough that ReLU6 saturates
    export_quantized(model, dict.fromkeys(("stem", "expand", "depthwise", "project", "fc"), 8), tmp_path / "q.onnx",
                     calib=calib, example_input=calib[:2])
    proto = onnx.load(tmp_path / "q.onnx")
    assert sum(n.op_type == "Clip" for n in proto.graph.node) == 3
    program = read_program(proto)
    clip_outputs = {n.output[0] for n in proto.graph.node if n.op_type == "Clip"}
    fused = [op for op in program.ops if op.out in clip_outputs]
    assert len(fused) == 3 and all(hasattr(op, "act_max") for op in fused)  # each Clip is its Conv's clamp
    for op in fused:
        out = program.tensors[op.out]
        assert op.act_min == max(-128, out.zero_point)
        assert op.act_max == min(127, int(np.round(6.0 / out.scale)) + out.zero_point)
    golden = run_golden(program, quantize_input(program, calib.numpy())).astype(np.int64)
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    ref = session.run(None, {session.get_inputs()[0].name: calib.numpy()})[0]
    out = program.tensors[program.output]
    ref_q = np.clip(np.round(ref / out.scale) + out.zero_point, -128, 127)
    assert np.abs(golden - ref_q).max() <= 3
    assert (golden.argmax(1) == ref.argmax(1)).mean() >= 0.95


def test_a_clip_that_follows_no_layer_runs_as_a_table_onnxruntime_agrees_with():
    import onnxruntime as ort

    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    zero = helper.make_tensor("z", TensorProto.INT8, [], [0])
    six = helper.make_tensor("six", TensorProto.FLOAT, [], [6.0])
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("Clip", ["xd", "", "six"], ["y"]),
             helper.make_node("QuantizeLinear", ["y", "s", "z"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])], [scale, zero, six])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    program = read_program(model)
    assert [type(op).__name__ for op in program.ops] == ["Lookup"]
    x = np.linspace(-12, 12, 200, dtype=np.float32).reshape(50, 4)
    golden = run_golden(program, quantize_input(program, x))
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(golden.astype(np.float32) * 0.1, ref)


def test_a_model_that_does_not_fit_is_refused_with_the_excess(qdq, tmp_path):
    from rankfold.target import target_from_dict

    root, _ = qdq
    tiny = target_from_dict({"name": "tiny", "flash_bytes": 100, "ram_bytes": 64})
    with pytest.raises(RankfoldError, match="over by"):
        export_c(onnx.load(root / "q.onnx"), str(tmp_path / "c"), target=tiny)
    assert not (tmp_path / "c").exists()


def test_run_c_on_a_directory_that_is_not_an_export(tmp_path):
    with pytest.raises(RankfoldError, match="not a directory written by rankfold export-c"):
        run_c(str(tmp_path), np.zeros((1, 1, 4, 4), np.float32), None)


@needs_cc
@pytest.mark.skipif(__import__("rankfold.cexport.run", fromlist=["x"]).qemu_tools_missing() is not None,
                    reason="Arm toolchain or qemu-system-arm missing (gcc-arm-none-eabi, libnewlib-arm-none-eabi, "
                           "qemu-system-arm)")
@pytest.mark.parametrize("board", ["mps2-an386", "mps2-an500"])
def test_cortex_m_build_under_qemu_matches_the_host(qdq, tmp_path, board):
    root, calib = qdq
    export_c(onnx.load(root / "q.onnx"), str(tmp_path / "c"))
    result = run_c(str(tmp_path / "c"), calib[:6], None, qemu=board, qemu_samples=3)
    assert result["golden_mismatches"] == 0
    assert result["qemu_matches_host"] is True and result["qemu_samples"] == 3
    assert result["flash_bytes"] > 0 and result["ram_bytes"] > 0
    assert result["instructions"] > 0 and 1 < result["instructions_per_mac"] < 200
    assert 0 < result["stack_bytes"] < 16384 and result["ram_bytes"] > result["stack_bytes"]


def test_the_fit_check_counts_the_arena_the_code_declares_scratch_included(qdq, tmp_path):
    from rankfold.cexport.codegen import arena_bytes, ram_per_op
    from rankfold.target import target_from_dict

    root, _ = qdq
    program = read_program(onnx.load(root / "q.onnx"))
    info = export_c(onnx.load(root / "q.onnx"), str(tmp_path / "c"))
    need = max(r["tensor_bytes"] + r["scratch_bytes"] for r in ram_per_op(program))
    assert info["arena_bytes"] == arena_bytes(program) >= need  # the kernels' scratch is planned in the arena
    # RAM enough for the tensors but not for the scratch: refused (it used to be written, and overflow)
    short = target_from_dict({"name": "short", "ram_bytes": info["arena_bytes"] - 1})
    with pytest.raises(RankfoldError, match="the arena needs"):
        export_c(onnx.load(root / "q.onnx"), str(tmp_path / "c2"), target=short)
    assert not (tmp_path / "c2").exists()


def test_a_plan_for_a_c_target_holds_the_bytes_its_c_program_holds(tmp_path):
    """Every convolution of the C program holds an int32 bias (zeros where the layer has none), an
    int32 requantization multiplier and an int8 shift (9 bytes) per output channel: a factorized
    layer's first factor, which has no bias, is priced so too, and the program holds the bytes the
    plan says, as its source declares them."""
    import rankfold

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(64, 10)).eval()
    calib = torch.randn(64, 3, 8, 8)
    result = rankfold.compress_to_budget(model, calib=calib, budgets={"params": "40%"}, target="cortex-m4",
                                         min_rank=2, check=False)
    assert any(layer.method != "none" for layer in result.plan.layers)  # factors without a bias
    result.save(tmp_path / "q.onnx")
    program = read_program(onnx.load(tmp_path / "q.onnx"))
    # the plan's total adds the QDQ file's activation scales, which the C program keeps in its code
    assert program.weight_bytes == sum(layer.weight_bytes for layer in result.plan.layers)
    convs = [op for op in program.ops if hasattr(op, "multiplier")]
    assert program.weight_bytes == sum(op.weight_bytes + 9 * op.multiplier.size for op in convs)
    export_c(onnx.load(tmp_path / "q.onnx"), str(tmp_path / "c"))
    source = "".join(p.read_text() for p in (tmp_path / "c").rglob("*.c"))
    shifts = re.findall(r"static const (\w+) L\d+_s\[(\d+)\]", source)
    assert len(shifts) == len(convs) and {kind for kind, _ in shifts} == {"int8_t"}
