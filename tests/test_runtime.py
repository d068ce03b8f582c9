"""int8 results that hold on every CPU: onnxruntime's default session computes rankfold's QDQ files
as rankfold's own integer model does, on whatever CPU runs the tests (with or without VNNI)."""

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from rankfold.cexport.golden import run_golden
from rankfold.cexport.ir import read_program
from rankfold.cexport.run import quantize_input
from rankfold.errors import RankfoldError
from rankfold.quantize.core import REDUCED_INT8_QMAX, quantize_weight, weight_qmax
from rankfold.quantize.export import export_quantized
from rankfold.quantize.onnx_qdq import INT8_RANGE_KEY
from rankfold.runtime import int8_kernel_check, int8_kernels, quantized_layer_spans, session
from rankfold.target import load_target, target_from_dict

# The layers of issue 13 (each alone, int8): on an AVX2-only CPU the default session was 29-46
# units away from the reference arithmetic for full 8-bit weights.
LAYERS = {
    "conv3x3_64_64_relu": (lambda: nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU()), (64, 16, 16)),
    "conv1x1_128_32": (lambda: nn.Sequential(nn.Conv2d(128, 32, 1)), (128, 8, 8)),
    "stem_conv3x3_1_32": (lambda: nn.Sequential(nn.Conv2d(1, 32, 3, padding=1)), (1, 32, 32)),
    "fc_512_10": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(512, 10)), (512,)),
}


def _int8_layer(tmp_path, key, reduce_range: bool | None = None):
    torch.manual_seed(0)
    make, shape = LAYERS[key]
    model = make().eval()
    calib = torch.randn(64, *shape)
    if key == "stem_conv3x3_1_32":
        calib = calib.abs()  # image-like: every input on the same side of its zero point
    path = tmp_path / f"{key}.onnx"
    export_quantized(model, {"0" if key != "fc_512_10" else "1": 8}, path, calib=calib, example_input=calib[:1],
                     reduce_range=reduce_range)
    return path, calib[:16].numpy()


@pytest.mark.parametrize("key", sorted(LAYERS))
def test_default_session_computes_a_quantized_layer_as_the_integer_model_does(tmp_path, key):
    path, x = _int8_layer(tmp_path, key)
    program = read_program(onnx.load(path))
    golden = run_golden(program, quantize_input(program, x)).astype(np.int64).reshape(len(x), -1)
    default = session(str(path))  # onnxruntime as users run it: every graph optimization on
    out = default.run(None, {default.get_inputs()[0].name: x})[0].reshape(len(x), -1)
    t = program.tensors[program.output]
    out_q = np.clip(np.round(out / t.scale) + t.zero_point, -128, 127).astype(np.int64)
    assert np.abs(out_q - golden).max() <= 1, int8_kernels().describe()
    assert int8_kernel_check(str(path), x).ok


def test_export_follows_what_this_cpus_onnxruntime_needs(tmp_path):
    path, _x = _int8_layer(tmp_path, "conv3x3_64_64_relu")
    model = onnx.load(path)
    codes = [numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8
             and i.name.endswith("_q")]
    assert codes
    widest = max(int(np.abs(c).max()) for c in codes)
    props = {p.key: p.value for p in model.metadata_props}
    if int8_kernels().reduce_range:
        assert widest <= REDUCED_INT8_QMAX and props[INT8_RANGE_KEY] == "7"
    else:
        assert widest == 127 and props[INT8_RANGE_KEY] == "8"


def test_reduced_range_codes_stay_within_7_bits_and_cost_one_bit():
    w = np.random.default_rng(0).normal(size=(16, 64)).astype(np.float32)
    full, reduced = quantize_weight(w, 8), quantize_weight(w, 8, reduce_range=True)
    assert np.abs(full.q).max() == 127 and np.abs(reduced.q).max() == REDUCED_INT8_QMAX
    err_full = np.abs(full.dequantize() - w).max(axis=1)
    err_reduced = np.abs(reduced.dequantize() - w).max(axis=1)
    assert np.all(err_reduced <= reduced.scale / 2 + 1e-7) and np.all(err_full <= full.scale / 2 + 1e-7)
    assert weight_qmax(4, reduce_range=True) == 7  # int4 is exact everywhere


def test_reduced_range_layers_are_computed_exactly_on_every_cpu(tmp_path):
    """The fix itself: 7-bit int8 weights are exact whatever kernels this CPU gets."""
    assert int8_kernels().reduced_range_exact
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU()).eval()
    calib = torch.randn(32, 64, 8, 8)
    export_quantized(model, {"0": 8}, tmp_path / "r.onnx", calib=calib, example_input=calib[:1], reduce_range=True)
    assert int8_kernel_check(str(tmp_path / "r.onnx"), calib[:8].numpy()).worst_units <= 1


class _Altered:
    """An onnxruntime session whose outputs pass through `change`: a runtime that computes something else."""

    def __init__(self, inner, change):
        self.inner, self.change = inner, change

    def get_inputs(self):
        return self.inner.get_inputs()

    def run(self, names, feed):
        return [self.change(v) for v in self.inner.run(names, feed)]


def test_the_kernel_check_finds_a_runtime_that_computes_something_else(tmp_path, monkeypatch):
    """Where the optimized session drifts from the reference arithmetic, the check says by how much and where."""
    import rankfold.runtime as runtime

    path, x = _int8_layer(tmp_path, "conv1x1_128_32")
    real = runtime.session

    monkeypatch.setattr(runtime, "session", lambda m, *, optimized=True, threads=0:
                        _Altered(real(m, optimized=True), lambda v: v + 5.0) if optimized else real(m, optimized=False))
    check = int8_kernel_check(str(path), x)
    assert not check.ok and check.worst_units >= 5 and check.worst_layer
    assert len(quantized_layer_spans(onnx.load(path))) == check.layers == 1


def test_target_profiles_say_which_int8_range_they_need():
    assert load_target("x86-avx2").reduce_range is True
    assert load_target("x86-vnni").reduce_range is False
    assert load_target("arm64").reduce_range is False
    host = load_target("host")
    assert host.reduce_range == int8_kernels().reduce_range and host.int8_note
    for name in ("cortex-m4", "cortex-m7", "cortex-m55"):
        assert load_target(name).runtime == "c" and not load_target(name).reduce_range
    with pytest.raises(RankfoldError, match="reduce_range must be"):
        target_from_dict({"name": "t", "reduce_range": "sometimes"})
    with pytest.raises(RankfoldError, match="runtime must be"):
        target_from_dict({"name": "t", "runtime": "tflite"})
    with pytest.raises(RankfoldError, match="unknown field"):
        target_from_dict({"name": "t", "int8_note": "set by hand"})


def test_the_planner_prices_the_coarser_grid():
    from rankfold.planner.costs import chain_profile
    from rankfold.planner.options import NoiseUnits, Option, with_bits

    layer = nn.Conv2d(8, 8, 3)
    option = Option("none", (), 0.0, chain_profile([layer], (8, 6, 6)), 0.0, 0)
    full = {o.bits: o for o in with_bits([option], (32, 8, 4), NoiseUnits(1.0))}
    reduced = {o.bits: o for o in with_bits([option], (32, 8, 4), NoiseUnits(1.0), reduce_range=True)}
    assert reduced[8].loss == pytest.approx(full[8].loss * (127 / 63) ** 2)
    assert reduced[8].weight_bytes == full[8].weight_bytes  # still stored as int8
    assert reduced[4].loss == full[4].loss and reduced[32].loss == 0.0


def test_eval_reports_the_int8_kernel_check_and_the_cpu(tmp_path):
    import json
    import subprocess
    import sys

    path, x = _int8_layer(tmp_path, "fc_512_10")
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(len(x), np.int64))
    proc = subprocess.run([sys.executable, "-m", "rankfold.cli", "eval", str(path), "--data", str(tmp_path / "d.npz"),
                           "--json", "--no-latency"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["int8_kernel_max_units"] <= 1 and result["cpu"]


def test_run_batched_stacks_scalar_values_of_a_batch_one_graph(tmp_path):
    """A graph exported at batch 1 runs one sample at a time; a 0-d value it computes (the scale of
    a DynamicQuantizeLinear, observed by the activation calibration) is stacked, not concatenated
    (ddddocr's int8 recogniser ended in a ValueError)."""
    from onnx import TensorProto, helper

    from rankfold.runtime import run_batched, session

    nodes = [helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0), helper.make_node("Relu", ["x"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3]),
                               helper.make_tensor_value_info("m", TensorProto.FLOAT, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "b1.onnx")
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    y, m = run_batched(session(str(tmp_path / "b1.onnx")), None, "x", x)
    assert y.shape == (4, 3) and m.tolist() == [2.0, 5.0, 8.0, 11.0]


def test_the_graphs_rankfold_times_declare_an_ir_older_runtimes_load():
    """The planner's timing graphs: make_model would stamp the installed onnx's newest IR (14 with
    onnx 1.23), which onnxruntime 1.30 refused; they declare IR 8, which holds their opset 17."""
    from rankfold.planner.costs import _chain_graph, chain_profile

    for layers, shape in (([nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 1)], (4, 6, 6)),
                          ([nn.Linear(12, 5)], (3, 12))):
        graph = _chain_graph(chain_profile(layers, shape), shape)
        assert graph.ir_version == 8 and graph.opset_import[0].version == 17
        session(graph)  # and onnxruntime runs it


def _saturating_cpu(monkeypatch, saturates: bool = True, only_int8: bool = True):
    """This CPU as one whose fused int8 kernels saturate (or not): the default session negates the
    outputs of graphs that run int8 kernels (`only_int8`; else of every graph), so a figure shows
    which session made it."""
    import rankfold.runtime as runtime

    real = runtime.session

    def fake(m, *, optimized=True, threads=0):  # only graphs that run int8 kernels are off
        proto = m if hasattr(m, "graph") else onnx.load_from_string(m) if isinstance(m, bytes) else onnx.load(m)
        inner = real(m, optimized=optimized)
        altered = optimized and (runtime.computes_in_int8(proto) or not only_int8)
        return _Altered(inner, lambda v: -v) if altered else inner

    monkeypatch.setattr(runtime, "int8_kernels", lambda: runtime.Int8Kernels(not saturates, True, "a test CPU"))
    monkeypatch.setattr(runtime, "session", fake)
    return real


@pytest.mark.parametrize("saturates", [True, False])
def test_an_int8_file_is_measured_in_what_it_means_where_the_kernels_saturate(tmp_path, monkeypatch, saturates):
    """On x86 without VNNI, a file with 8-bit weights (for a Cortex-M, say) is measured in the
    reference arithmetic, which every other CPU and the C compute; the default session's figure is
    reported beside it. The demo's planned file read 0.8632 here where it means 0.8836."""
    from rankfold.evaluate import evaluate

    path, x = _int8_layer(tmp_path, "fc_512_10", reduce_range=False)  # 8-bit weights, whatever this CPU
    real = _saturating_cpu(monkeypatch, saturates)
    reference = real(str(path), optimized=False)
    scores = reference.run(None, {reference.get_inputs()[0].name: x})[0]
    y = scores.argmax(1)  # labels the file's own arithmetic gets all right
    result = evaluate(path, x, y, measure_latency=False)
    if saturates:
        assert result.accuracy == 1.0 and result.accuracy_default_session == float(((-scores).argmax(1) == y).mean())
        assert "reference arithmetic" in result.arithmetic and result.int8_kernel_max_units > 1
        assert "compute this file wrongly" in result.latency_note  # its latency is the wrong kernels'
    else:
        assert result.accuracy < 1.0 and result.accuracy_default_session is None  # the default session, as is
        assert result.latency_note == ""


def test_a_file_made_for_saturating_kernels_is_measured_in_the_default_session_and_said_right(
        tmp_path, monkeypatch):
    """Its int8 weights lie within +-63 (--target host on x86 without VNNI): the fused kernels
    compute it exactly there, so the default session measures it and no note calls it wrong."""
    from rankfold.evaluate import evaluate
    from rankfold.runtime import optimized_is_faithful

    (tmp_path / "wide").mkdir()
    path, x = _int8_layer(tmp_path, "fc_512_10", reduce_range=True)
    wide, _ = _int8_layer(tmp_path / "wide", "fc_512_10", reduce_range=False)
    _saturating_cpu(monkeypatch, saturates=True)
    assert optimized_is_faithful(onnx.load(path)) and not optimized_is_faithful(onnx.load(wide))
    result = evaluate(path, x, np.zeros(len(x), np.int64), measure_latency=False)
    assert result.accuracy_default_session is None and result.latency_note == ""
    assert result.arithmetic == "onnxruntime's default session"


def test_a_float_file_is_measured_in_the_default_session_on_every_cpu(tmp_path, monkeypatch):
    from rankfold.evaluate import accuracy
    from rankfold.export.onnx import export_onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(512, 10)).eval()
    x = torch.randn(16, 512)
    export_onnx(model, tmp_path / "f.onnx", example_input=x[:2])
    y = model(x).argmax(1).numpy()
    _saturating_cpu(monkeypatch, only_int8=False)
    assert accuracy(str(tmp_path / "f.onnx"), x.numpy(), y) == float(((-model(x)).argmax(1).numpy() == y).mean())


@pytest.mark.parametrize("target", ["x86-vnni", "host"])
def test_a_file_for_another_machine_is_checked_as_that_machine_computes_it(tmp_path, monkeypatch, target):
    """Planned on a CPU whose int8 kernels saturate for a VNNI server (full 8-bit weights), the file
    is checked in the reference arithmetic, which the server computes: written, not refused. For
    this machine (host: 7-bit weights here), a default session that computes something else is
    still refused, and nothing is written."""
    import rankfold
    from tests.helpers import tiny_classifier

    model = tiny_classifier()
    calib = torch.randn(128, 1, 12, 12)
    _saturating_cpu(monkeypatch)
    plan = rankfold.make_plan(model, calib=calib, target=target, budgets={"weight_bytes": "30%"}, bits=8)
    assert plan.quantized and plan.reduce_range == (target == "host")
    result = rankfold.apply_and_check(model, plan, calib=calib, min_agreement=0.8)
    lines = []
    if target == "host":
        with pytest.raises(RankfoldError, match="int8 kernels compute layer"):
            result.save(tmp_path / "out.onnx", progress=lines.append)
        assert not (tmp_path / "out.onnx").exists()
    else:
        result.save(tmp_path / "out.onnx", progress=lines.append)
        assert (tmp_path / "out.onnx").exists() and result.check.top1_agreement >= 0.8
        assert any("reference arithmetic, as x86-vnni computes it" in line for line in lines), lines


def test_joining_the_runs_of_samples():
    from rankfold.runtime import join_samples

    a, b = np.zeros((3, 5, 2), np.float32), np.ones((2, 5, 2), np.float32)
    assert join_samples([a, b], [3, 2]).shape == (5, 5, 2)
    seq_first = [np.zeros((7, 3, 4)), np.ones((7, 2, 4))]  # (T, N, classes): joined on the sample axis
    assert join_samples(seq_first, [3, 2]).shape == (7, 5, 4)
    # One run joins nothing: the activation observer's tensors (108 MB a line in PP-OCRv4's
    # recogniser) were copied whole for nothing.
    assert join_samples([a], [3]) is a
