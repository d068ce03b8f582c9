import copy
import dataclasses
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import rankfold
from rankfold.errors import RankfoldError
from rankfold.evaluate import onnx_size
from rankfold.layers import LowRank
from rankfold.planner.pricing import make_plan
from rankfold.quantize.core import (
    activation_params,
    fake_quantize_weight,
    pack_int4,
    quantize_weight,
    unpack_int4,
)
from rankfold.quantize.export import ROUNDING_SAMPLES, export_quantized
from rankfold.quantize.gptq import input_second_moments, quantize_layer
from rankfold.quantize.observers import BINS, RangeObserver, histogram_sample, uniform_histogram
from rankfold.quantize.weights import correct_bias, equalize_seams, quantize_weights
from rankfold.runtime import int8_kernels


# -- arithmetic -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits, qmax", [(8, 127), (4, 7)])
def test_per_channel_weights_stay_within_half_a_step(bits, qmax):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32) * rng.uniform(0.01, 10, (6, 1, 1, 1))
    qw = quantize_weight(w, bits)
    assert qw.q.dtype == np.int8 and np.abs(qw.q).max() == qmax
    np.testing.assert_allclose(qw.scale, np.abs(w).reshape(6, -1).max(1) / qmax, rtol=1e-6)
    err = np.abs(qw.dequantize() - w).reshape(6, -1).max(1)
    assert np.all(err <= qw.scale / 2 + 1e-6)  # each channel: at most half of its own step


def test_grouped_int4_scales_follow_each_group():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((3, 40)).astype(np.float32)
    w[:, 32:] *= 100  # one loud group must not coarsen the others
    grouped = quantize_weight(w, 4, group_size=16)
    assert grouped.scale.shape == (3, 3)
    per_channel = quantize_weight(w, 4)
    quiet = slice(0, 32)
    assert np.abs(grouped.dequantize() - w)[:, quiet].max() < 0.2 * np.abs(per_channel.dequantize() - w)[:, quiet].max()


def test_quantizing_a_fake_quantized_weight_is_exact():
    w = np.random.default_rng(2).standard_normal((8, 5)).astype(np.float32)
    once = fake_quantize_weight(w, 4)
    np.testing.assert_array_equal(fake_quantize_weight(once, 4), once)


def test_int4_packing_round_trips():
    values = np.array([-7, 7, 0, -1, 3, -8, 5], np.int8)
    packed = pack_int4(values)
    assert len(packed) == 4 and packed[0] == ((-7 & 0xF) | (7 << 4))  # first value in the low nibble
    np.testing.assert_array_equal(unpack_int4(packed, 7), values)
    with pytest.raises(ValueError):
        pack_int4(np.array([9], np.int8))


def test_activation_params_keep_zero_exact_and_cover_the_range():
    params = activation_params(-0.3, 6.0)
    assert params.dequantize(params.quantize(np.zeros(1, np.float32)))[0] == 0.0
    x = np.linspace(-0.3, 6.0, 1000, dtype=np.float32)
    assert np.abs(params.dequantize(params.quantize(x)) - x).max() <= params.scale / 2 + 1e-6
    relu = activation_params(0.0, 4.0)
    assert relu.zero_point == -128


def test_observers_minmax_percentile_mse():
    rng = np.random.default_rng(3)
    data = rng.standard_normal(200_000).astype(np.float32)
    data[:20] = rng.choice([-200.0, 200.0], 20)  # a few outliers: clipping them pays
    obs = RangeObserver()
    for chunk in np.array_split(data, 7):
        obs.update(chunk)
    assert obs.low == data.min() and obs.high == data.max()

    def sq_error(params):
        return float(np.mean((params.dequantize(params.quantize(data)) - data) ** 2))

    pct, mse, mm = obs.percentile(99.9), obs.mse(), obs.minmax()
    lo, hi = (-128 - mm.zero_point) * mm.scale, (127 - mm.zero_point) * mm.scale
    assert lo <= data.min() + 1e-3 and hi >= data.max() - mm.scale  # min-max covers everything
    p_lo, p_hi = (-128 - pct.zero_point) * pct.scale, (127 - pct.zero_point) * pct.scale
    inside = np.mean((data >= p_lo) & (data <= p_hi))
    assert 0.998 <= inside < 1.0  # the percentile range keeps ~99.9 % and clips the outliers
    assert sq_error(mse) <= sq_error(mm) and sq_error(mse) <= sq_error(pct)  # mse: least squared error


def test_histogram_counts_as_numpy_and_samples_large_batches_unbiased():
    rng = np.random.default_rng(4)
    values = (rng.standard_normal(50_000) * 2).astype(np.float32)
    low, high = float(values.min()), float(values.max())
    counts = uniform_histogram(values, low, high)
    reference = np.histogram(values, bins=BINS, range=(low, high))[0]
    assert counts.sum() == values.size and np.abs(counts - reference).sum() <= 20  # float32 rounding moves a few
    # A batch above the sampling limit: every k-th value (k a prime not dividing the width), each
    # counting k times, and the percentile range of a histogram of every value, within 1 %.
    maps = np.maximum(rng.standard_normal((8, 16, 96, 96)), 0).astype(np.float32)
    maps[:, :, :, ::2] *= 4.0  # even columns louder: a step of 2 would see only them
    sampled, exact = RangeObserver(), RangeObserver()
    sampled.update(maps)
    exact.update(maps[:4]), exact.update(maps[4:])  # below the limit: every value counted
    sample, step = histogram_sample(maps, limit=1 << 16)
    assert 96 % step and all(step % d for d in range(2, step)) and sample.size <= (1 << 16) + 1
    assert abs(sampled.hist.sum() - maps.size) <= 0.01 * maps.size
    assert abs(sampled.percentile(99.9).scale / exact.percentile(99.9).scale - 1) < 0.01
    # -inf padding before a max pool (MTCNN's SAME pads) is not a value to cover: the range is the
    # finite values' (it once made every edge NaN and the export fail).
    padded = RangeObserver()
    padded.update(np.array([[-np.inf, 0.5, 2.0, np.inf]], np.float32))
    padded.update(np.full(3, -np.inf, np.float32))
    assert (padded.low, padded.high) == (0.5, 2.0) and padded.hist.sum() == 2
    assert np.isfinite(padded.percentile().scale) and np.isfinite(padded.mse().scale)


# -- seams, bias correction -----------------------------------------------------------------------
def _imbalanced_chain():
    torch.manual_seed(0)
    first, second = nn.Conv2d(16, 12, 3, padding=1, bias=False), nn.Conv2d(12, 20, 1)
    s = torch.exp(2 * torch.randn(12))  # same function, badly balanced channel ranges
    with torch.no_grad():
        first.weight.mul_(s.reshape(-1, 1, 1, 1))
        second.weight.div_(s.reshape(1, -1, 1, 1))
    return LowRank(first, second, method="svd", ranks=(12,))


def test_seam_equalization_keeps_the_function_and_lowers_quantization_error():
    x = torch.randn(8, 16, 10, 10)
    errors = {}
    for equalize in (False, True):
        chain = _imbalanced_chain()
        with torch.no_grad():
            reference = chain(x)
        if equalize:
            assert equalize_seams(chain) == 1
            with torch.no_grad():
                torch.testing.assert_close(chain(x), reference, rtol=1e-4, atol=1e-4)
        for layer in chain:
            with torch.no_grad():
                layer.weight.copy_(torch.from_numpy(fake_quantize_weight(layer.weight.numpy(), 4)))
        with torch.no_grad():
            errors[equalize] = float((chain(x) - reference).norm() / reference.norm())
    assert errors[True] < 0.5 * errors[False]


@pytest.mark.parametrize("bits", [8, 4])
def test_data_aware_rounding_lowers_output_error_on_the_same_grid(bits):
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 16, 3, padding=1)
    mixing = torch.randn(12, 12) * 0.5 + torch.eye(12)
    x = torch.einsum("nchw,cd->ndhw", torch.randn(64, 12, 8, 8), mixing)  # correlated channels
    moments = input_second_moments(nn.Sequential(conv), ["0"], x)["0"]
    assert moments.shape == (12 * 9, 12 * 9)
    nearest = torch.from_numpy(fake_quantize_weight(conv.weight.detach().numpy(), bits))
    aware = copy.deepcopy(conv)
    quantize_layer(aware, bits, moments)

    def output_error(weight):
        return torch.nn.functional.conv2d(x, weight - conv.weight.detach(), padding=1).pow(2).mean().item()

    assert output_error(aware.weight.detach()) < 0.8 * output_error(nearest)
    # the exporter re-derives each channel's scale from its largest weight: it must find the same codes
    regrid = quantize_weight(aware.weight.detach().numpy(), bits)
    np.testing.assert_allclose(regrid.dequantize(), aware.weight.detach().numpy(), rtol=1e-6, atol=1e-8)
    assert np.abs(regrid.q).max() == 2 ** (bits - 1) - 1


def test_bias_correction_removes_the_mean_shift():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU()).eval()
    x = torch.rand(64, 4, 8, 8) + 0.5  # non-zero mean inputs: rounding error shifts the output
    quantized = torch.nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU())
    quantized.load_state_dict(model.state_dict())
    quantize_weights(quantized, {"0": 4})

    def shift(m):
        with torch.no_grad():
            return (m[0](x) - model[0](x)).mean((0, 2, 3)).abs().max()

    before = shift(quantized)
    correct_bias(model, quantized, ["0"], x)
    assert shift(quantized) < 0.01 * before


# -- QDQ export -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(32, 10)).eval()
    calib = torch.randn(96, 1, 12, 12)
    return model, calib


def _run(path, x, optimize=True):
    options = ort.SessionOptions()
    if not optimize:  # every QuantizeLinear / DequantizeLinear runs as written: the fake-quant reference
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("bits", [8, 4])
def test_qdq_export_stores_integers_and_agrees_with_the_fake_quantized_model(trained, tmp_path, bits):
    model, calib = trained
    layers = {"0": 32, "2": bits, "4": bits, "8": 32}
    path = tmp_path / f"q{bits}.onnx"
    nodes = export_quantized(model, layers, path, calib=calib, example_input=calib[:2])
    assert sorted(nodes.values()) == [bits, bits]
    proto = onnx.load(path)
    int_type = onnx.TensorProto.INT8 if bits == 8 else onnx.TensorProto.INT4
    weights = [i for i in proto.graph.initializer if i.data_type == int_type and len(i.dims) == 4]
    assert len(weights) == 2
    if bits == 4:
        assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 21
    # the stored integers times their scales are exactly the fake-quantized torch weights
    reference_model = _copy(model)
    reduce_range = int8_kernels().reduce_range  # what export_quantized chose for this CPU
    assert set(quantize_weights(reference_model, layers, calib=calib[:ROUNDING_SAMPLES],
                                reduce_range=reduce_range)) == {"2", "4"}
    scales = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    modules = dict(reference_model.named_modules())
    for w in weights:
        dequantized = numpy_helper.to_array(w).astype(np.float32) * scales[w.name[:-2] + "_wscale"][:, None, None, None]
        match = [n for n in ("2", "4") if modules[n].weight.shape == dequantized.shape]
        np.testing.assert_allclose(dequantized, modules[match[0]].weight.detach().numpy(), rtol=1e-6, atol=1e-7)
    x = calib[:64].numpy()
    integer, fake = _run(path, x), _run(path, x, optimize=False)
    assert np.abs(integer - fake).max() <= 0.05 * np.abs(fake).max()
    assert (integer.argmax(1) == fake.argmax(1)).mean() >= 0.95
    with torch.no_grad():
        float_out = model(calib[:64]).numpy()
    assert np.linalg.norm(fake - float_out) / np.linalg.norm(float_out) < (0.1 if bits == 8 else 0.5)
    size = onnx_size(path)
    float_weights = sum(p.numel() for p in model.parameters())
    assert size.params == float_weights
    assert size.weight_bytes < 4 * float_weights * (0.35 if bits == 8 else 0.25)


def test_one_scale_per_tensor_stays_within_half_a_step_and_reaches_the_top_code():
    w = np.random.default_rng(1).standard_normal((6, 4, 3, 3)).astype(np.float32)
    w[2] *= 10  # one channel far wider than the rest
    qw = quantize_weight(w, 4, per_tensor=True)
    assert np.all(qw.scale == qw.scale[0]) and np.abs(qw.q).max() == 7
    assert np.abs(qw.dequantize() - w).max() <= qw.scale[0] / 2 + 1e-6
    # the narrow channels lose: per channel they would have a step ten times finer
    per_channel = quantize_weight(w, 4)
    assert np.abs(qw.dequantize() - w)[0].max() > np.abs(per_channel.dequantize() - w)[0].max()


def test_per_tensor_layers_store_one_scale_and_four_bytes_less_per_channel(trained, tmp_path):
    model, calib = trained
    layers = {"0": 32, "2": 8, "4": 4, "8": 32}
    channel, tensor = tmp_path / "channel.onnx", tmp_path / "tensor.onnx"
    export_quantized(model, layers, channel, calib=calib, example_input=calib[:2])
    export_quantized(model, layers, tensor, calib=calib, example_input=calib[:2], per_tensor=["2", "4"])
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(tensor).graph.initializer}
    scales = [v for k, v in inits.items() if k.endswith("_wscale")]
    assert len(scales) == 2 and all(v.shape == () for v in scales)
    # conv 2 and conv 4 have 32 output channels each: 4 B per channel become 4 B per layer
    assert onnx_size(channel).weight_bytes - onnx_size(tensor).weight_bytes == 2 * (4 * 32 - 4)
    x = calib[:64].numpy()
    integer, fake = _run(tensor, x), _run(tensor, x, optimize=False)
    assert np.abs(integer - fake).max() <= 0.05 * np.abs(fake).max()
    with torch.no_grad():
        float_out = model(calib[:64]).numpy()
    assert np.linalg.norm(fake - float_out) / np.linalg.norm(float_out) < 0.5


def test_an_int32_bias_scale_is_computed_in_the_file_and_onnxruntime_still_fuses_integer_kernels(trained, tmp_path):
    """A bias's scale is the input's times the weight's: the file computes it by a Mul of the two
    (folded by onnxruntime at load, before its QDQ fusions) instead of storing 4 bytes a channel.
    The convolutions still run as integer kernels, as the fake-quantized graph computes, and the
    file holds the bytes the planner prices."""
    from rankfold.planner.options import quantized_layer_bytes

    model, calib = trained
    layers = {"0": 8, "2": 8, "4": 8, "8": 8}
    path = tmp_path / "q.onnx"
    export_quantized(model, layers, path, calib=calib, example_input=calib[:2])
    graph = onnx.load(path).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    made = {o: n for n in graph.node for o in n.output}
    biases = [n for n in graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
              and inits[n.input[0]].dtype == np.int32]
    assert len(biases) == 4
    for node in biases:
        mul = made[node.input[1]]
        assert mul.op_type == "Mul" and all(name in inits for name in mul.input)
        input_scale, weight_scale = (inits[name] for name in mul.input)
        assert input_scale.shape == () and weight_scale.shape == inits[node.input[0]].shape  # one per channel
    optimized = _as_onnxruntime_loads_it(path, tmp_path)
    kinds = [n.op_type for n in optimized.node]
    assert kinds.count("QLinearConv") == 3 and "Mul" not in kinds, kinds
    x = calib[:32].numpy()
    integer, fake = _run(path, x), _run(path, x, optimize=False)
    assert np.abs(integer - fake).max() <= 0.05 * np.abs(fake).max()
    expected = sum(quantized_layer_bytes(m.weight.numel(), m.weight.shape[0], True, layers[name])
                   for name, m in model.named_children() if name in layers)
    activation_scales = sum(v.nbytes for k, v in inits.items() if k.endswith(("_scale", "_zero_point")))
    assert onnx_size(path).weight_bytes == expected + activation_scales


def test_a_dead_filter_keeps_its_bias_in_int8_arithmetic(tmp_path):
    """A filter whose weights are nearly zero but whose bias is not (a BatchNorm folded into a
    dead filter: PP-OCRv4's recogniser has dozens) outputs its bias. Its int32 bias code at the
    scale input x weight would lie far past int32: it was clipped, so the filter output about
    nothing, and the network's int8-activation file lost its check. The channel's scale is raised
    until its bias fits; its weights, a rounding error of its output, round to zero."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    with torch.no_grad():
        for conv in (model[0], model[2]):
            conv.weight[:3] *= 1e-9  # dead: their outputs are their biases
            conv.bias[:3] = torch.tensor([0.9, -0.4, 1.5])
    calib = torch.randn(64, 3, 10, 10)
    path = tmp_path / "q.onnx"
    export_quantized(model, {"0": 8, "2": 8, "6": 8}, path, calib=calib, example_input=calib[:2])
    with torch.no_grad():
        expected = model(calib).numpy()
    for optimize in (False, True):  # the reference arithmetic, and the integer kernels
        got = _run(path, calib.numpy(), optimize=optimize)
        assert np.abs(got - expected).max() <= 0.05 * np.abs(expected).max(), optimize
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}
    codes = [v for v in inits.values() if v.dtype == np.int32]
    assert len(codes) == 3 and all(np.abs(c).max() <= 2**30 for c in codes)  # every bias an int32 code


def test_the_planner_takes_one_scale_per_tensor_only_where_per_channel_cannot_meet_the_budget(trained):
    from rankfold.planner.pricing import price_model

    model, calib = trained
    pricing = price_model(model, calib=calib, target="host", min_rank=4)
    for name in pricing.layer_names:  # each quantized option also comes with one scale per tensor
        options = pricing.options[name]
        assert {o.per_tensor for o in options if o.bits < 32} == {False, True}
        assert not any(o.per_tensor for o in options if o.bits == 32)
        pair = [o for o in options if o.bits == 8 and o.method == "none"]
        assert pair[0].weight_bytes - pair[1].weight_bytes == 4 * (pair[0].profile.sub_layers[0].out_ch - 1)
    roomy = pricing.plan({"weight_bytes": "20%"})
    assert roomy.feasible and not roomy.per_tensor_layers()
    smallest_per_channel = pricing.fixed["weight_bytes"] + sum(
        min(o.weight_bytes for o in pricing.options[n] if not o.per_tensor) for n in pricing.layer_names)
    tight = pricing.plan({"weight_bytes": f"{smallest_per_channel - 200:.0f}B"})
    assert tight.feasible and tight.per_tensor_layers()
    assert tight.after["weight_bytes"] <= smallest_per_channel - 200
    assert {layer.weight_scales for layer in tight.layers} <= {"channel", "tensor"}


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_planner_picks_bits_under_a_byte_budget(trained):
    model, calib = trained
    plan = make_plan(model, calib=calib, target="host", budgets={"weight_bytes": "20%"}, min_rank=4)
    assert plan.feasible and plan.after["weight_bytes"] <= plan.limits["weight_bytes"]
    assert plan.layers[0].bits in (32, 8) and plan.layers[-1].bits in (32, 8)  # never int4 at the edges
    assert any(layer.bits < 32 for layer in plan.layers)
    assert plan.before["weight_bytes"] == pytest.approx(4 * sum(p.numel() for p in model.parameters()))
    fixed = make_plan(model, calib=calib, target="host", budgets={"weight_bytes": "50%"}, bits=4, min_rank=4)
    assert {layer.bits for layer in fixed.layers[1:-1]} == {4}
    with pytest.raises(RankfoldError, match="runs weights at"):
        make_plan(model, calib=calib, target="cortex-m7", bits=32)


def test_quantized_compress_via_cli_writes_a_checked_qdq_file(trained, tmp_path):
    import subprocess
    import sys

    model, calib = trained
    rankfold.export_onnx(model, tmp_path / "m.onnx", example_input=calib[:1])
    np.savez(tmp_path / "calib.npz", x=calib.numpy())
    out = tmp_path / "q.onnx"
    proc = subprocess.run([sys.executable, "-m", "rankfold.cli", "compress", str(tmp_path / "m.onnx"), "--calib",
                           str(tmp_path / "calib.npz"), "--max-weight-bytes", "30%", "--min-rank", "4", "-o",
                           str(out), "--min-agreement", "0.5"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "self-check (quantized, onnxruntime default session)" in proc.stderr
    assert "self-check (int8 kernels)" in proc.stderr
    assert onnx_size(out).weight_bytes <= 0.3 * onnx_size(tmp_path / "m.onnx").weight_bytes
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(out).graph.node)


def test_a_quantized_layer_that_matches_no_onnx_node_is_an_error(trained, tmp_path, monkeypatch):
    import rankfold.quantize.export as export

    model, calib = trained
    monkeypatch.setattr(export, "node_bits", lambda proto, leaves: {})  # as if the exporter renamed nodes
    with pytest.raises(RankfoldError, match="could not be matched"):
        export.export_quantized(model, {"2": 8}, tmp_path / "q.onnx", calib=calib, example_input=calib[:2])
    assert not (tmp_path / "q.onnx").exists()


def test_conv_outputs_read_only_by_relu_or_clip_are_left_unquantized():
    from rankfold.quantize.onnx_qdq import relu_fused_outputs

    w = onnx.numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w")
    nodes = [onnx.helper.make_node("Conv", ["x", "w"], ["a"]), onnx.helper.make_node("Relu", ["a"], ["b"]),
             onnx.helper.make_node("Conv", ["b", "w"], ["c"]), onnx.helper.make_node("Clip", ["c"], ["d"]),
             onnx.helper.make_node("Conv", ["d", "w"], ["e"]), onnx.helper.make_node("Relu", ["e"], ["f"]),
             onnx.helper.make_node("Add", ["e", "f"], ["y"])]
    vi = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, 4, 2, 2]) for n in ("x", "y")]
    model = onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", vi[:1], vi[1:], [w]))
    assert relu_fused_outputs(model) == {"a", "c"}  # "e" is also read by the Add: it must be quantized


def test_constants_are_not_activations():
    from rankfold.quantize.onnx_qdq import float_activations

    bound = onnx.helper.make_tensor("v", onnx.TensorProto.FLOAT, [], [6.0])
    nodes = [onnx.helper.make_node("Constant", [], ["six"], value=bound),
             onnx.helper.make_node("Clip", ["x", "", "six"], ["y"])]
    vi = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, 4]) for n in ("x", "y")]
    model = onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", vi[:1], vi[1:]))
    assert float_activations(model) == ["x", "y"]


def test_a_layer_kept_float_is_not_quantized_by_the_runtime(tmp_path):
    """Between quantized activations, onnxruntime would quantize a float Conv's weights itself (per
    tensor): here that rounds every channel but the first to zero. A float layer must stay float."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        model[0].weight.abs_()
        model[0].weight[0] *= -1000  # always negative on positive inputs: Relu removes it
    calib = torch.randn(64, 1, 8, 8).abs()
    path = tmp_path / "q.onnx"
    export_quantized(model, {"0": 32, "2": 8}, path, calib=calib, example_input=calib[:1])
    proto = onnx.load(path)
    producers = {o: n.op_type for n in proto.graph.node for o in n.output}
    first_conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    assert producers.get(first_conv.input[0]) != "DequantizeLinear"
    x = calib[:16].numpy()
    integer, fake = _run(path, x), _run(path, x, optimize=False)
    assert np.abs(integer - fake).max() <= 0.02 * np.abs(fake).max()


# -- int4 with one scale per group of input elements ---------------------------------------------
@pytest.fixture(scope="module")
def mlp_with_loud_inputs():
    """Linear layers whose inputs have a few loud columns: one scale per channel must cover them,
    one per group of 16 covers them only in their own group."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 10)).eval()
    with torch.no_grad():
        model[2].weight[:, :4] *= 20
    return model, torch.randn(256, 64)


def test_grouped_data_aware_rounding_keeps_the_exporters_grid_and_beats_per_channel(mlp_with_loud_inputs):
    model, calib = mlp_with_loud_inputs
    moments = input_second_moments(model, ["2"], calib)["2"]
    errors = {}
    for group in (None, 16):
        layer = copy.deepcopy(model[2])
        quantize_layer(layer, 4, moments, group_size=group)
        regrid = quantize_weight(layer.weight.detach().numpy(), 4, group)  # what the exporter finds
        np.testing.assert_allclose(regrid.dequantize(), layer.weight.detach().numpy(), rtol=1e-6, atol=1e-8)
        delta = layer.weight.detach().double() - model[2].weight.detach().double()
        errors[group] = float(torch.trace(delta @ moments @ delta.T))
    assert errors[16] < 0.5 * errors[None]


def _heavy_tailed_linear(inputs: int, outputs: int, rows: int, mixing: float, seed: int):
    """A bias-free Linear with Student-t weights (outliers, as trained layers have), correlated
    inputs, and their second moment."""
    torch.manual_seed(seed)
    layer = nn.Linear(inputs, outputs, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.distributions.StudentT(3.0).sample((outputs, inputs)) * 0.05)
    x = torch.randn(rows, inputs) @ (torch.randn(inputs, inputs) * mixing + torch.eye(inputs))
    return layer, x, input_second_moments(nn.Sequential(layer), ["0"], x)["0"]


@pytest.mark.parametrize("group", [16, 32, None])
def test_data_aware_rounding_keeps_its_gain_on_heavy_tailed_weights(group):
    """Weights with outliers, as trained layers have: the error feedback often moves a group's
    largest weight off +-qmax. Reverting such groups to plain rounding (as before) left the later
    columns compensating errors that were gone (groups of 16: 0.71 of plain rounding's output
    error); pinning each scale's largest weight keeps the gain (0.54)."""
    layer, x, moments = _heavy_tailed_linear(128, 48, 1024, mixing=0.2, seed=0)
    aware = copy.deepcopy(layer)
    quantize_layer(aware, 4, moments, group_size=group)
    regrid = quantize_weight(aware.weight.detach().numpy(), 4, group)  # what the exporter finds
    np.testing.assert_allclose(regrid.dequantize(), aware.weight.detach().numpy(), rtol=1e-6, atol=1e-8)
    plain = torch.from_numpy(quantize_weight(layer.weight.detach().numpy(), 4, group).dequantize())

    def output_error(weight):
        return float((x @ (weight - layer.weight.detach()).T).pow(2).mean())

    assert output_error(aware.weight.detach()) < 0.6 * output_error(plain)


@pytest.mark.parametrize("group", [16, None])
def test_planners_rounding_noise_estimate_is_the_data_aware_roundings(group):
    """The planner prices int4 by the output error data-aware rounding leaves (each column's error
    compensated by the later ones), not plain rounding's, which is some three times larger on
    correlated inputs: measured here on the rounding the export does."""
    from rankfold.planner.options import int8_noise_loss, rounding_costs
    from rankfold.planner.sensitivity import LayerStats

    layer, x, moments = _heavy_tailed_linear(128, 48, 4096, mixing=0.2, seed=2)
    stats = LayerStats("0", moments, torch.full((48,), 2.0, dtype=torch.float64), (128,), (48,))  # loss = sum dy^2
    costs = rounding_costs(layer, stats)
    estimate = int8_noise_loss(layer, stats, group_size=group, costs=costs) * (127 / 7) ** 2
    plain_estimate = int8_noise_loss(layer, stats, group_size=group) * (127 / 7) ** 2
    aware = copy.deepcopy(layer)
    quantize_layer(aware, 4, moments, group_size=group)
    measured = float((x @ (aware.weight.detach() - layer.weight.detach()).T).pow(2).sum(1).mean())
    assert 0.7 < estimate / measured < 1.4
    assert estimate < 0.6 * plain_estimate


def test_data_aware_rounding_with_one_scale_keeps_the_tensors_grid():
    layer, _x, moments = _heavy_tailed_linear(64, 24, 512, mixing=0.3, seed=1)
    quantize_layer(layer, 8, moments, per_tensor=True)
    codes = layer.weight.detach().double() / (layer.weight.detach().abs().max().double() / 127)
    assert float((codes - codes.round()).abs().max()) < 1e-4 and float(codes.abs().max()) == pytest.approx(127)


def _grouped_export(model, calib, bits, groups, tmp_path):
    """(the weight-only QDQ file, the torch copy it must compute as, its blocked DequantizeLinear nodes)."""
    from rankfold.quantize.export import quantized_copy

    reference, _leaves = quantized_copy(model, bits, calib=calib, groups=groups)
    path = tmp_path / "g.onnx"
    export_quantized(model, bits, path, calib=calib, example_input=calib[:2], weight_only=True, groups=groups,
                     reduce_range=False)
    blocked = [n for n in onnx.load(path).graph.node
               if n.op_type == "DequantizeLinear" and any(a.name == "block_size" for a in n.attribute)]
    return path, reference, blocked


def test_grouped_int4_export_runs_in_onnxruntime_as_the_torch_copy_computes(mlp_with_loud_inputs, tmp_path):
    model, calib = mlp_with_loud_inputs
    path, reference, blocked = _grouped_export(model, calib, {"0": 4, "2": 4, "4": 8}, {"0": 16, "2": 16}, tmp_path)
    assert len(blocked) == 2 and all({a.name: a.i for a in b.attribute}["block_size"] == 16 for b in blocked)
    with torch.no_grad():
        np.testing.assert_allclose(_run(path, calib[:32].numpy()), reference(calib[:32]).numpy(), atol=1e-5)
    # bytes as the planner prices them: packed codes, a float32 scale per group, float biases (the
    # int8 layer's too: weight-only, no activation scale for an int32 bias)
    from rankfold.planner.options import quantized_layer_bytes

    expected = quantized_layer_bytes(96 * 64, 96, True, 4, group_size=16) + \
        quantized_layer_bytes(96 * 96, 96, True, 4, group_size=16) + quantized_layer_bytes(10 * 96, 10, False, 8) + 40
    assert onnx_size(path).weight_bytes == expected


@pytest.fixture(scope="module")
def pointwise_cnn():
    """A 3x3 stem, then pointwise (1x1) convolutions with a few loud input channels (PP-LCNet's bulk)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 1), nn.ReLU(),
                          nn.Conv2d(64, 64, 1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()
    with torch.no_grad():
        model[4].weight[:, :4] *= 20
    return model, torch.randn(128, 3, 8, 8)


def test_grouped_int4_pointwise_convolutions_run_in_onnxruntime_as_the_torch_copy_computes(pointwise_cnn, tmp_path):
    """A 1x1 convolution is a Linear on every position: its int4 groups run along its inputs (a 4-D
    blocked DequantizeLinear), which onnxruntime runs as the torch copy computes, at the bytes the
    planner prices; the planner offers them for 1x1 convolutions, not for 3x3 ones."""
    import dataclasses

    from rankfold.planner.options import quantized_layer_bytes
    from rankfold.planner.pricing import price_model
    from rankfold.target import load_target

    model, calib = pointwise_cnn
    path, reference, blocked = _grouped_export(model, calib, {"2": 4, "4": 4, "6": 8}, {"2": 16, "4": 16}, tmp_path)
    graph = onnx.load(path).graph
    shapes = {i.name: list(i.dims) for i in graph.initializer}
    assert len(blocked) == 2 and all(shapes[n.input[0]][2:] == [1, 1] for n in blocked)
    assert all(shapes[n.input[1]] == [64, -(-shapes[n.input[0]][1] // 16), 1, 1] for n in blocked), \
        [(shapes[n.input[0]], shapes[n.input[1]]) for n in blocked]
    with torch.no_grad():
        np.testing.assert_allclose(_run(path, calib[:32].numpy()), reference(calib[:32]).numpy(), atol=1e-5)
    float_bytes = 4 * sum(p.numel() for i in ("0", "10") for p in model[int(i)].parameters())
    expected = quantized_layer_bytes(64 * 32, 64, True, 4, group_size=16) + \
        quantized_layer_bytes(64 * 64, 64, True, 4, group_size=16) + \
        quantized_layer_bytes(64 * 64 * 9, 64, False, 8) + 4 * 64 + float_bytes  # weight-only: a float bias
    assert onnx_size(path).weight_bytes == expected
    target = dataclasses.replace(load_target("host"), weight_group_size=16, reduce_range=False)
    pricing = price_model(model, calib=calib, target=target, min_rank=4)
    assert any(o.group_size == 16 for o in pricing.options["4"])
    assert not any(o.group_size for o in pricing.options["6"])  # 3x3: no groups
    loud = {o.key: o for o in pricing.options["4"] if o.bits == 4 and not o.per_tensor}
    grouped = [o for o in loud.values() if o.group_size]
    plain = {o.key: o for o in pricing.options["4"] if o.bits == 4 and not o.group_size and not o.per_tensor}
    assert all(o.quant_loss < 0.5 * plain[o.key].quant_loss for o in grouped)


def test_the_planner_offers_grouped_int4_where_the_target_has_groups(mlp_with_loud_inputs, tmp_path):
    import dataclasses

    from rankfold.planner.plan import load_plan, plan_problem
    from rankfold.planner.pricing import price_model
    from rankfold.target import load_target, target_from_dict

    model, calib = mlp_with_loud_inputs
    target = dataclasses.replace(load_target("host"), weight_group_size=16, reduce_range=False)
    pricing = price_model(model, calib=calib, target=target, min_rank=4)
    assert not any(o.group_size for n in ("0", "4") for o in pricing.options[n])  # edges: never int4
    grouped = [o for o in pricing.options["2"] if o.group_size]
    assert grouped and {o.bits for o in grouped} == {4} and {o.group_size for o in grouped} == {16}
    plain = {o.key: o for o in pricing.options["2"] if o.bits == 4 and not o.group_size and not o.per_tensor}
    for o in grouped:  # far less lossy on the loud layer; unfactorized, dearer than a scale per channel
        assert o.quant_loss < 0.5 * plain[o.key].quant_loss
        assert o.method != "none" or o.weight_bytes > plain[o.key].weight_bytes
    plan = pricing.plan({"weight_bytes": "15%"})
    assert plan.feasible and plan.grouped_layers() == {"2": 16}
    layer = next(x for x in plan.layers if x.name == "2")
    assert layer.weight_scales == "group16" and layer.bits == 4
    assert plan_problem(dataclasses.replace(plan, layers=[dataclasses.replace(layer, bits=8)])) \
        == "layer '2': weight_scales group16 (groups) needs bits 4, got 8"
    assert "weight_scales must be one of" in plan_problem(
        dataclasses.replace(plan, layers=[dataclasses.replace(layer, weight_scales="group0")]))
    plan.save(tmp_path / "plan.json")
    assert load_plan(tmp_path / "plan.json").grouped_layers() == {"2": 16}
    with pytest.raises(RankfoldError, match="weight_group_size needs int4"):
        target_from_dict({"name": "t", "weight_bits": [8], "weight_group_size": 32})
    with pytest.raises(RankfoldError, match="weight_group_size must be a positive integer"):
        target_from_dict({"name": "t", "weight_bits": [4], "weight_group_size": 0})


def test_saved_weights_keep_their_groups(mlp_with_loud_inputs):
    from rankfold.saved import loaded_weights, stored_weights

    model, _calib = mlp_with_loud_inputs
    grid = copy.deepcopy(model)
    quantize_weights(grid, {"2": 4}, groups={"2": 16})
    arrays, quantized = stored_weights(grid, {"2": 4}, per_tensor=set(), reduce_range=False, groups={"2": 16})
    assert quantized["2.weight"] == {"bits": 4, "shape": [96, 96], "group_size": 16}
    assert arrays["2.weight:scale"].shape == (96, 6) and arrays["2.weight"].nbytes == 96 * 96 // 2
    state = loaded_weights(arrays, quantized)
    np.testing.assert_allclose(state["2.weight"].numpy(), grid[2].weight.detach().numpy(), rtol=1e-6, atol=1e-8)


def test_layers_without_bias_are_priced_with_the_bias_that_bias_correction_gives_them(tmp_path):
    """Convolutions without a bias (squeeze-excitation blocks, convolutions before batch norm) get
    one from bias correction once quantized: the plan counts it, so the file's weight bytes are
    the plan's and stay under the budget."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(16, 32, 1, bias=False),
                          nn.ReLU(), nn.Conv2d(32, 16, 1, bias=False), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16 * 8 * 8, 10, bias=False)).eval()
    calib = torch.randn(160, 1, 8, 8)
    result = rankfold.compress_to_budget(model, calib=calib, budgets={"weight_bytes": "30%"}, bits="auto",
                                         min_rank=2, check=False)
    plan = result.plan
    assert plan.quantized and any(layer.method == "none" for layer in plan.layers)
    result.save(tmp_path / "q.onnx")
    stored = onnx_size(tmp_path / "q.onnx").weight_bytes
    assert stored <= plan.limits["weight_bytes"], (stored, plan.limits)
    assert stored == pytest.approx(plan.after["weight_bytes"], rel=0.03)


def test_the_rounding_moments_of_large_maps_come_from_a_subset_of_positions():
    from rankfold.quantize import gptq

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 8, 3, padding=1)
    x = torch.randn(4, 4, 64, 64)
    full = gptq._input_rows(conv, x, 0, limit=10**9)
    assert full.shape == (4 * 64 * 64, 36)
    assert torch.equal(gptq._input_rows(conv, x[:, :, :8, :8], 0, limit=64),
                       gptq._input_rows(conv, x[:, :, :8, :8], 0, limit=10**9))  # small maps: every row
    part = gptq._input_rows(conv, x, 0, limit=2048)  # rows per sample
    assert part.shape == (4 * 2048, 36)
    # Which rows a sample gives follows its index in the data, not its place in the batch.
    assert torch.equal(gptq._input_rows(conv, x[2:], 2, limit=2048), part[2 * 2048 :])
    h_full, h_part = full.T @ full / len(full), part.T @ part / len(part)
    assert float((h_part - h_full).norm() / h_full.norm()) < 0.1  # sampling noise, about sqrt(36 / 8192)


def test_many_samples_give_fewer_rows_each_to_the_rounding_moments(monkeypatch):
    """A pass takes about MOMENT_ROWS rows a layer, spread over every sample: 2,048 a sample for a
    few samples, fewer for many (224 pages of a detector: 586 each)."""
    from rankfold.quantize import gptq

    assert gptq.rows_per_sample(16) == gptq.ROWS_PER_SAMPLE and gptq.rows_per_sample(224) == 586
    assert gptq.rows_per_sample(10**7) == 1
    monkeypatch.setattr(gptq, "MOMENT_ROWS", 4 * 1024)  # 64 samples of 32x32 maps: 64 rows each
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 8, 3, padding=1)
    x = torch.randn(64, 4, 32, 32)
    seen = []
    real = gptq._input_rows
    monkeypatch.setattr(gptq, "_input_rows", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    capped = gptq.input_second_moments(torch.nn.Sequential(conv), ["0"], x)["0"]
    assert sum(len(rows) for rows in seen) == 64 * 64
    full = real(conv, x, 0, limit=10**9)
    h_full = (full.T @ full / len(full)).double()
    assert float((capped - h_full).norm() / h_full.norm()) < 0.1


@pytest.mark.parametrize("kernel, stride, padding, dilation", [
    ((3, 3), 1, (1, 1), 1), ((3, 3), 2, (0, 0), 1), ((5, 5), 1, (4, 4), 2), ((1, 1), 1, (0, 0), 1),
    ((1, 7), 2, (0, 3), 1), ((2, 3), (2, 1), (1, 0), (1, 2))])
def test_rounding_rows_are_unfold_rows_gathered_at_the_kept_positions(kernel, stride, padding, dilation):
    """Rows are gathered tap by tap at the positions kept, not unfolded whole and then picked:
    the same rows, in unfold's column order, for any kernel, stride, padding and dilation."""
    import torch.nn.functional as F

    from rankfold.analyze import rows_of_each_sample
    from rankfold.quantize import gptq

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, kernel, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(3, 3, 37, 29)
    for limit in (50, 10**9):  # a subset of each sample's positions, and all of them
        expected = torch.cat([rows_of_each_sample(F.unfold(s, conv.kernel_size, dilation=conv.dilation,
                                                           padding=conv.padding, stride=conv.stride)[0].T,
                                                  1, 5 + i, limit) for i, s in enumerate(x.split(1))])
        assert torch.equal(gptq._input_rows(conv, x, 5, limit=limit), expected)


def test_rounding_moments_are_shared_only_between_layers_that_unfold_alike():
    """A 1x1 and a 3x3 convolution reading one tensor need different input moments (C against
    C*9 columns); a shared product made the 3x3 layer's rounding fail (ddddocr's detector)."""
    from rankfold.quantize.gptq import input_second_moments

    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.point, self.wide = nn.Conv2d(4, 8, 1), nn.Conv2d(4, 8, 3, padding=1)

        def forward(self, x):
            return self.point(x) + self.wide(x)

    moments = input_second_moments(Fork().eval(), ["point", "wide"], torch.randn(6, 4, 5, 5))
    assert moments["point"].shape == (4, 4) and moments["wide"].shape == (36, 36)


class _BoxesAndScores(nn.Module):
    """A detector's head in small: boxes in pixels and scores from 1e-4 to 0.01, joined in one output."""

    def __init__(self):
        super().__init__()
        self.boxes, self.scores = nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x):
        return torch.cat([self.boxes(x) * 300, torch.sigmoid(self.scores(x) * 3 - 4) * 0.01], 1)


@pytest.mark.parametrize("float_outputs", [True, False])
def test_float_outputs_keep_the_small_half_of_a_joined_output(float_outputs, tmp_path):
    """One int8 scale over the joined output (as YOLOv8n's boxes and scores) rounds every score to
    0; with float_outputs (what a result for onnxruntime gets) the graph's outputs, and the tail
    after the last layer (the sigmoid, whose one scale would round the small scores), stay float."""
    torch.manual_seed(0)
    model, calib = _BoxesAndScores().eval(), torch.randn(128, 8)
    path = tmp_path / "q.onnx"
    export_quantized(model, {"boxes": 8, "scores": 8}, path, calib=calib, example_input=calib[:2],
                     float_outputs=float_outputs)
    with torch.no_grad():
        scores = model(calib)[:, 4:].numpy()
    error = np.linalg.norm(_run(path, calib.numpy())[:, 4:] - scores) / np.linalg.norm(scores)
    assert (error < 0.02) if float_outputs else (error > 0.9)
    quantized = {n.input[0] for n in onnx.load(path).graph.node if n.op_type == "QuantizeLinear"}
    assert ("/Sigmoid_output_0" in quantized) is not float_outputs


def test_a_result_for_onnxruntime_is_written_with_float_outputs(tmp_path):
    torch.manual_seed(0)
    model, calib = _BoxesAndScores().eval(), torch.randn(256, 8)
    result = rankfold.compress_to_budget(model, calib=calib, budgets={"weight_bytes": "70%"}, bits="auto",
                                         min_rank=1)
    assert set(result.plan.layer_bits().values()) == {8}
    result.save(tmp_path / "q.onnx")
    graph = onnx.load(tmp_path / "q.onnx").graph
    producer = next(n for n in graph.node if n.output[0] == graph.output[0].name)
    assert producer.op_type == "Concat"
    with torch.no_grad():
        scores = model(calib)[:, 4:].numpy()
    assert np.linalg.norm(_run(tmp_path / "q.onnx", calib.numpy())[:, 4:] - scores) < 0.05 * np.linalg.norm(scores)


def test_a_tail_kept_float_for_onnxruntime_is_refused_by_the_c_export_by_name(tmp_path):
    """A file planned for onnxruntime keeps its softmax in float; the C export names what to do."""
    from rankfold.cexport.run import export_c

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.Softmax(1)).eval()
    calib = torch.randn(256, 8)
    result = rankfold.compress_to_budget(model, calib=calib, budgets={"weight_bytes": "70%"}, bits="auto",
                                         min_rank=1)
    result.save(tmp_path / "q.onnx")
    with pytest.raises(RankfoldError, match="planned for onnxruntime keep the ops after their last layer in float"):
        export_c(onnx.load(tmp_path / "q.onnx"), str(tmp_path / "c"))


def test_rounding_price_of_a_convolution_sees_its_correlated_pixels():
    """Neighbouring pixels are correlated and data-aware rounding uses that: priced from the channel
    moment alone, a 3x3 convolution's int4 looked several times dearer than it rounds; with the taps'
    correlation (the im2col moment as channel moment (x) tap correlation) the price is the measure."""
    from rankfold.planner.options import int8_noise_loss, rounding_costs
    from rankfold.planner.sensitivity import LayerStats, tap_correlation, tap_products

    torch.manual_seed(3)
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    x = torch.nn.functional.interpolate(torch.randn(64, 8, 6, 6), scale_factor=3, mode="bilinear")  # smooth
    rows = x.permute(0, 2, 3, 1).reshape(-1, 8).double()
    channel_moment = rows.T @ rows / rows.shape[0]
    stats = LayerStats("0", channel_moment, torch.full((16,), 2.0, dtype=torch.float64), (8, 18, 18), (16, 18, 18),
                       tap_correlation=tap_correlation(tap_products(conv, x), (3, 3)))
    estimate = int8_noise_loss(conv, stats, costs=rounding_costs(conv, stats)) * (127 / 7) ** 2
    channels_only = int8_noise_loss(conv, dataclasses.replace(stats, tap_correlation=None),
                                    costs=rounding_costs(conv, dataclasses.replace(stats, tap_correlation=None)))
    aware = copy.deepcopy(conv)
    quantize_layer(aware, 4, input_second_moments(nn.Sequential(conv), ["0"], x)["0"])
    error = torch.nn.functional.conv2d(x, aware.weight.detach() - conv.weight.detach(), padding=1)
    measured = float(error.pow(2).sum(1).mean())
    assert 0.6 < estimate / measured < 1.6
    assert channels_only * (127 / 7) ** 2 > 2 * estimate


def test_taps_correlation_of_a_small_map_is_positive_semidefinite_and_its_price_finite():
    """Products over different crops of a map lit in its middle (squeezenet-like 13x13 maps after
    a ReLU) made an indefinite matrix whose Cholesky factor failed: a traceback while pricing."""
    from rankfold.planner.options import rounding_costs
    from rankfold.planner.sensitivity import LayerStats, tap_correlation, tap_products
    from rankfold.quantize.gptq import error_feedback_weights

    conv = nn.Conv2d(2, 4, 3)
    x = torch.zeros(3, 2, 5, 5)
    x[..., 1:4, 1:4] = 1.0
    taps = tap_correlation(tap_products(conv, x), (3, 3))
    assert torch.linalg.eigvalsh(taps).min() > -1e-9
    stats = LayerStats("conv", torch.eye(2, dtype=torch.float64), torch.ones(4, dtype=torch.float64), (2, 5, 5),
                       (4, 3, 3), tap_correlation=taps)
    costs = rounding_costs(conv, stats)
    assert costs.shape == (18,) and torch.isfinite(costs).all()
    indefinite = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # what the crops made, as any moment may come
    weights = error_feedback_weights(indefinite)
    assert torch.isfinite(weights).all() and (weights > 0).all()


class _FramesHead(nn.Module):
    """Linear layers on every frame of (N, T, C) input, with biases: torch.onnx writes each as
    MatMul then Add, the pair onnxruntime's MatMulAddFusion turns into a Gemm (AECMOS's head)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(64, 128), nn.Linear(128, 128), nn.Linear(128, 128), nn.Linear(128, 8)])

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x).mean(1)


def test_an_int4_plan_with_a_matmul_and_add_on_frames_loads_in_onnxruntime(tmp_path):
    """int4 weights make the file opset 21, where onnxruntime's MatMul + Add fusion quantizes the
    reshaped input with output_dtype int8 but a uint8 zero point and the session fails to load
    (microsoft/onnxruntime#25526): rankfold refused every such plan. The activations it reads are
    written uint8 (same values), and the file loads and runs. onnxruntime fuses only where every
    size is static."""
    from tests.helpers import run_cli

    x = torch.randn(96, 10, 64)
    # every size static (the batch fixed at 1, as AECMOS's): onnxruntime fuses only then
    torch.onnx.export(_FramesHead().eval(), (x[:1],), str(tmp_path / "frames.onnx"), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["scores"])
    np.savez(tmp_path / "calib.npz", x=x.numpy())
    out = tmp_path / "small.onnx"
    code, stdout, stderr = run_cli("compress", tmp_path / "frames.onnx", "--calib", tmp_path / "calib.npz",
                                   "--max-weight-bytes", "17%", "--min-agreement", "0", "--max-output-error", "10",
                                   "-o", out)
    assert code == 0, stderr
    model = onnx.load(str(out))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 21
    assert any(t.data_type == onnx.TensorProto.INT4 for t in model.graph.initializer)
    unsigned = [t for t in model.graph.initializer if t.name.endswith("_zero_point")
                and t.data_type == onnx.TensorProto.UINT8]
    assert len(unsigned) == 1  # the last layer's input: its output is read unquantized by the Add
    got = ort.InferenceSession(str(out)).run(None, {"input": x[:1].numpy()})[0]
    assert got.shape == (1, 8) and np.isfinite(got).all()


def _as_onnxruntime_loads_it(path, tmp_path) -> onnx.GraphProto:
    """The graph onnxruntime runs after its optimizations at load (constant folding, fusions)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(tmp_path / "optimized.onnx").graph


def test_weight_only_convolutions_are_scaled_by_constants_onnxruntime_folds_at_load(pointwise_cnn, tmp_path):
    """Weight-only convolutions (float inputs: no integer kernel takes them) keep their int8 / int4
    codes in the file, scaled by Cast and Mul, which onnxruntime folds into float weights at load:
    no DequantizeLinear left to run at every call (ResNet-18: 9.5 ms a call against 4.0 float)."""
    from rankfold.quantize.export import quantized_copy

    model, calib = pointwise_cnn
    bits = {"0": 8, "2": 4, "4": 8, "6": 4, "10": 8}
    reference, _leaves = quantized_copy(model, bits, calib=calib)
    path = tmp_path / "w.onnx"
    export_quantized(model, bits, path, calib=calib, example_input=calib[:2], weight_only=True, reduce_range=False)
    graph = onnx.load(path).graph
    codes = {i.name for i in graph.initializer if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT4)}
    assert len(codes) == 5 and not any(n.op_type == "DequantizeLinear" for n in graph.node)
    with torch.no_grad():
        np.testing.assert_allclose(_run(path, calib[:32].numpy()), reference(calib[:32]).numpy(), atol=1e-5)
    optimized = _as_onnxruntime_loads_it(path, tmp_path)
    assert not [n.op_type for n in optimized.node if n.op_type in ("Cast", "Mul", "DequantizeLinear")]
    # the Linear head (a Gemm of the traced export) as well; the file's bytes are the codes' and scales'
    from rankfold.planner.options import quantized_layer_bytes

    expected = sum(quantized_layer_bytes(int(np.prod(m.weight.shape)), m.weight.shape[0], False, bits[name])
                   for name, m in model.named_children() if name in bits)
    biases = sum(m.bias.numel() * 4 for name, m in model.named_children() if name in bits)
    assert onnx_size(path).weight_bytes == expected + biases


class _TwiceLinear(nn.Module):
    """One Linear called at two steps on (N, T, features) inputs: two MatMuls read its weight."""

    def __init__(self) -> None:
        super().__init__()
        self.step = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(torch.relu(self.step(torch.relu(self.step(x)))).mean(1))


def test_a_weight_only_matmul_weight_read_by_several_steps_is_folded_at_load(tmp_path):
    """onnxruntime fuses a DequantizeLinear into MatMulNBits only where one MatMul reads it; read
    by several (a recurrence's steps), it would run at every call, once per step: those codes are
    scaled by Cast and Mul, folded at load, so no DequantizeLinear is left to run."""
    from rankfold.quantize.export import quantized_copy

    torch.manual_seed(0)
    model, calib = _TwiceLinear().eval(), torch.randn(64, 6, 32)
    bits = {"step": 8, "head": 8}
    reference, _leaves = quantized_copy(model, bits, calib=calib)
    path = tmp_path / "twice.onnx"
    export_quantized(model, bits, path, calib=calib, example_input=calib[:2], weight_only=True, reduce_range=False)
    graph = onnx.load(path).graph
    made = {o: n for n in graph.node for o in n.output}
    readers = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in made
               and made[n.input[1]].op_type == "Mul"]
    assert len(readers) == 2 and readers[0].input[1] == readers[1].input[1]
    with torch.no_grad():
        np.testing.assert_allclose(_run(path, calib[:16].numpy()), reference(calib[:16]).numpy(), atol=1e-5)
    assert not [n for n in _as_onnxruntime_loads_it(path, tmp_path).node if n.op_type == "DequantizeLinear"]


@pytest.mark.parametrize("layout", ["row int8", "row int4", "group int4", "tensor int8"])
def test_a_quantized_table_gathered_by_rows_and_read_whole_computes_as_its_dequantize_did(layout):
    """A table behind one DequantizeLinear, read by a Gather of ids of any rank and by a tied head's
    Transpose: rewritten (rows gathered as codes, then scaled; the whole table through Cast and Mul),
    both readers compute exactly what the DequantizeLinear gave, at every layout the export writes."""
    from onnx import TensorProto, helper

    from rankfold.quantize.onnx_qdq import TABLE_OPS, _int4_tensor, _tables_dequantized_by_row

    rng = np.random.default_rng(0)
    rows, width, bits = 40, 64, 4 if "int4" in layout else 8
    codes = rng.integers(-(2 ** (bits - 1)) + 1, 2 ** (bits - 1), size=(rows, width))
    attrs, scales = {"axis": 0}, rng.random(rows).astype(np.float32) / 10 + 0.01
    if layout.startswith("group"):
        attrs, scales = {"axis": 1, "block_size": 16}, rng.random((rows, width // 16)).astype(np.float32) / 10 + 0.01
    elif layout.startswith("tensor"):
        attrs, scales = {}, np.array(0.05, np.float32)
    table = _int4_tensor("t_q", codes) if bits == 4 else numpy_helper.from_array(codes.astype(np.int8), "t_q")
    inits = [table, numpy_helper.from_array(scales, "t_wscale")]
    nodes = [helper.make_node("DequantizeLinear", ["t_q", "t_wscale"], ["t_dq"], **attrs),
             helper.make_node("Gather", ["t_dq", "ids"], ["rows"], axis=0),
             helper.make_node("Transpose", ["t_dq"], ["head"]), helper.make_node("MatMul", ["x", "head"], ["logits"])]
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "T"]),
              helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])]
    outputs = [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["N", "T", width]),
               helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", rows])]

    def model(graph_nodes, graph_inits):
        graph = helper.make_graph(graph_nodes, "table", inputs, outputs, graph_inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()

    feeds = {"ids": rng.integers(-rows, rows, size=(3, 5)), "x": rng.normal(size=(3, width)).astype(np.float32)}
    wanted = ort.InferenceSession(model(nodes, inits), providers=["CPUExecutionProvider"]).run(None, feeds)
    rewritten = _tables_dequantized_by_row(nodes, inits, TABLE_OPS)
    assert not any(n.op_type == "DequantizeLinear" for n in rewritten)
    got = ort.InferenceSession(model(rewritten, inits), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_allclose(got[0], wanted[0], rtol=0, atol=0)  # the same products, row by row
    np.testing.assert_allclose(got[1], wanted[1], rtol=1e-6, atol=1e-6)


def test_calibration_runs_as_many_samples_at_once_as_their_observed_tensors_allow(trained, tmp_path, monkeypatch):
    """A run's observed tensors are kept to about OBSERVED_BYTES_PER_RUN (fresh pages for gigabytes
    of outputs cost more than the larger batch saves): sized by one sample's, the batch shrinks."""
    from rankfold.export.onnx import export_onnx
    from rankfold.quantize import onnx_qdq

    model, calib = trained
    export_onnx(model, tmp_path / "f.onnx", example_input=calib[:2])
    proto = onnx.load(tmp_path / "f.onnx")
    x = calib.numpy()
    roomy = onnx_qdq.calibrate(proto, x, batch_size=32)
    assert onnx_qdq.calibrate(proto, x, batch_size=3) != roomy  # the batching shows in the ranges
    one_sample = (16 + 32) * 12 * 12 * 4 + 32 * 5 * 5 * 4  # the layers' outputs, float32
    monkeypatch.setattr(onnx_qdq, "OBSERVED_BYTES_PER_RUN", 3 * one_sample + 10)
    assert onnx_qdq.calibrate(proto, x, batch_size=32) == onnx_qdq.calibrate(proto, x, batch_size=3)


def test_activation_ranges_of_large_maps_are_observed_on_samples_spread_over_the_calibration_data(
        trained, tmp_path, monkeypatch):
    """Beyond OBSERVED_BYTES_IN_ALL of activations (at least RANGE_SAMPLES_AT_LEAST samples), the
    ranges come from samples spread evenly over all of them, not from the first ones (a sorted
    file), and the log says how many; below it, every sample is observed."""
    from rankfold.export.onnx import export_onnx
    from rankfold.quantize import onnx_qdq

    assert onnx_qdq.range_samples(224, 2**20) is None  # a classifier's maps: every sample
    spread = onnx_qdq.range_samples(224, 168 * 2**20)  # PP-OCRv4's detector: 168 MB observed a page
    assert len(spread) == 64 and spread[0] == 0 and spread[-1] == 223 and np.all(np.diff(spread) >= 3)
    assert len(onnx_qdq.range_samples(1000, 16 * 2**20)) == 512  # 8 GB at 16 MB a sample
    assert len(onnx_qdq.range_samples(1000, 2**40)) == onnx_qdq.RANGE_SAMPLES_AT_LEAST

    model, calib = trained
    export_onnx(model, tmp_path / "f.onnx", example_input=calib[:2])
    proto = onnx.load(tmp_path / "f.onnx")
    x = calib.numpy()
    one_sample = (16 + 32) * 12 * 12 * 4 + 32 * 5 * 5 * 4  # the layers' outputs, float32
    monkeypatch.setattr(onnx_qdq, "RANGE_SAMPLES_AT_LEAST", 4)
    monkeypatch.setattr(onnx_qdq, "OBSERVED_BYTES_IN_ALL", 10 * one_sample + 10)
    said = []
    capped = onnx_qdq.calibrate(proto, x, batch_size=10, progress=said.append)
    found = [re.search(rf"activation ranges on (\d+) of {len(x)} calibration samples, spread evenly", s) for s in said]
    count = int(next(f for f in found if f).group(1))
    assert 8 <= count <= 10  # about 10 samples' bytes (the input and output are observed too)
    chosen = np.linspace(0, len(x) - 1, count).round().astype(int)
    monkeypatch.setattr(onnx_qdq, "OBSERVED_BYTES_IN_ALL", 1 << 40)
    assert capped == onnx_qdq.calibrate(proto, x[chosen], batch_size=10)
    assert capped != onnx_qdq.calibrate(proto, x[:count], batch_size=10)
    assert capped != onnx_qdq.calibrate(proto, x, batch_size=10)
