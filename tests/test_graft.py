"""A float result of a graph with inputs given once is written into the user's own graph
(rankfold.export.graft): it takes those inputs again. Before, they were constants of the written
file: a decoder's result could not take a cache to generate from, a streaming model its state."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import rankfold
from rankfold.export.graft import GraftRefused, grafted_model
from rankfold.layers import ColumnBlocks
from tests.helpers import run_cli
from tests.test_onnx_gqa import KV, SIZE, VOCAB, WIDTH, N, _decoder_feeds, _decoder_file, _perplexity


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("packed", [False, True], ids=["qkv", "packed"])
@pytest.mark.parametrize("budget", [["--max-params", "90%"], ["--max-weight-bytes", "30%"]])
def test_a_decoder_compressed_on_prompts_takes_its_caches_again_and_generates_with_them(tmp_path, budget, packed):
    """Float (factorized) or weight-only quantized (int8 and int4 weights, the table tied to the
    head stored once): the user's graph with its GroupQueryAttention, taking its caches. Packed
    q, k, v (one MatMul) are three layers, written as three and joined (ColumnBlocks)."""
    path, calib, out = _decoder_file(tmp_path, packed), tmp_path / "prompts.npz", tmp_path / "small.onnx"
    feeds = _decoder_feeds(96, 12)
    for name in ("attention_mask", "past_key_values.0.key", "past_key_values.0.value"):
        feeds[name] = feeds[name][:1]  # prompts: the mask and the empty caches given once
    np.savez(calib, **feeds)
    code, stdout, stderr = run_cli("compress", path, "--calib", calib, *budget, "-o", out)
    assert code == 0, stderr
    assert "written into the original graph" in stdout + stderr
    original, small = _session(path), _session(out)
    assert [i.name for i in small.get_inputs()] == [i.name for i in original.get_inputs()]
    assert [o.name for o in small.get_outputs()] == [o.name for o in original.get_outputs()]
    written = onnx.load(str(out)).graph
    assert any(n.op_type == "GroupQueryAttention" for n in written.node)  # onnxruntime's own op stays
    if packed:
        module = rankfold.load_onnx(path)
        blocks = [m for m in module.modules() if isinstance(m, ColumnBlocks)]
        assert [[b.out_features for b in m.blocks] for m in blocks] == [[N * SIZE, KV * SIZE, KV * SIZE]]
    if budget[0] == "--max-params":
        assert sum(int(np.prod(t.dims)) for t in written.initializer) < \
            sum(int(np.prod(t.dims)) for t in onnx.load(path).graph.initializer)
    else:
        assert os.path.getsize(out) < 0.4 * os.path.getsize(path)
    tables = [t for t in written.initializer if sorted(t.dims) == sorted([VOCAB, WIDTH])]
    assert len(tables) == 1  # tied: the head reads the table through a Transpose
    if budget[0] == "--max-weight-bytes":
        assert tables[0].data_type == TensorProto.INT8
        assert any(t.data_type == TensorProto.INT4 for t in written.initializer)
        # onnxruntime dequantizes no whole table at a call: its Gather reads the rows' codes, and the
        # head the table dequantized once at load (constant folding); only MatMulNBits read int4 codes
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(str(tmp_path / "optimized.onnx")).graph
        sizes = {t.name: int(np.prod(t.dims)) for t in optimized.initializer}
        whole_table = [n.op_type for n in optimized.node if any(sizes.get(i) == VOCAB * WIDTH for i in n.input)]
        assert sorted(set(whole_table)) in (["Gather", "MatMul"], ["FusedMatMul", "Gather"]), whole_table
    # Nine tokens at once, or eight and then one more after the caches the first eight left: the same
    fresh = _decoder_feeds(2, 9)
    whole = small.run(None, fresh)[0]
    head = {k: (v[:, :8] if k in ("input_ids", "attention_mask") else v) for k, v in fresh.items()}
    _, key, value = small.run(None, head)
    after = small.run(None, {"input_ids": fresh["input_ids"][:, 8:], "attention_mask": fresh["attention_mask"],
                             "past_key_values.0.key": key, "past_key_values.0.value": value})[0]
    np.testing.assert_allclose(after[:, -1], whole[:, -1], rtol=1e-4, atol=1e-4 * np.abs(whole).max())
    wanted = original.run(["logits"], fresh)[0]
    assert not np.array_equal(whole, wanted)
    assert _perplexity(whole, fresh["input_ids"]) < 1.5 * _perplexity(wanted, fresh["input_ids"])


def _cnn_with_offset(path, opset: int = 17) -> None:
    """Conv + BatchNormalization + Relu, an offset given as an input added, a strided Conv, global
    pooling and a Gemm: the offset is what a streaming model's state is to it."""
    rng = np.random.default_rng(0)
    inits = {"w1": rng.normal(size=(32, 16, 3, 3)) / 12, "b1": rng.normal(size=32) / 10,
             "scale": 1 + rng.random(32) / 2, "shift": rng.normal(size=32) / 10, "mean": rng.normal(size=32) / 10,
             "var": 1 + rng.random(32), "w2": rng.normal(size=(24, 32, 3, 3)) / 17, "b2": rng.normal(size=24) / 10,
             "w3": rng.normal(size=(10, 24)) / 5, "b3": np.zeros(10)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "scale", "shift", "mean", "var"], ["n1"]),
             helper.make_node("Relu", ["n1"], ["r1"]), helper.make_node("Add", ["r1", "offset"], ["shifted"]),
             helper.make_node("Conv", ["shifted", "w2", "b2"], ["c2"], strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"]), helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], transB=1)]
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 12, 12]),
                       helper.make_tensor_value_info("offset", TensorProto.FLOAT, [1, 32, 1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in inits.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)


@pytest.mark.parametrize("method, opset", [("tucker2", 17), ("svd", 17), ("cp", 17), ("tucker2", 9)])
def test_factorized_convolutions_are_written_into_the_graph_and_the_input_given_once_stays(tmp_path, method, opset):
    """Opset 9: the graph as rankfold reads it, converted to opset 11, is the one written into."""
    path, calib, out = tmp_path / "cnn.onnx", tmp_path / "calib.npz", tmp_path / "small.onnx"
    _cnn_with_offset(path, opset)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(48, 16, 12, 12)).astype(np.float32)
    offset = np.full((1, 32, 1, 1), 0.25, np.float32)
    np.savez(calib, x=x, offset=offset)
    code, stdout, stderr = run_cli("compress", path, "--calib", calib, "--method", method, "--keep", "0.6",
                                   "--check", "relerr:0.9", "-o", out)
    assert code == 0, stderr
    assert "written into the original graph" in stdout + stderr
    small = onnx.load(str(out)).graph
    assert [i.name for i in small.input] == ["x", "offset"]
    assert sum(n.op_type == "Conv" for n in small.node) >= 4 and not any(n.op_type == "BatchNormalization"
                                                                        for n in small.node)
    for value in (offset, -offset):  # another offset than the calibration's computes as the original does
        got = _session(out).run(None, {"x": x[:8], "offset": value})[0]
        want = _session(path).run(None, {"x": x[:8], "offset": value})[0]
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.5


def test_a_quantized_cnn_keeps_its_input_given_once_weight_only_unless_int8_activations_were_planned(tmp_path):
    """A byte budget: the int8 weights go into the user's graph with float activations (int8 ones
    are calibrated on the traced graph, the offset a constant there), so the file takes the offset
    again. With a latency budget (planned on int8 activations) it is the traced file, said why."""
    path, calib, out = tmp_path / "cnn.onnx", tmp_path / "calib.npz", tmp_path / "small.onnx"
    _cnn_with_offset(path)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(96, 16, 12, 12)).astype(np.float32)
    offset = np.full((1, 32, 1, 1), 0.25, np.float32)
    np.savez(calib, x=x, offset=offset)
    code, stdout, stderr = run_cli("compress", path, "--calib", calib, "--max-weight-bytes", "30%",
                                   "--check", "relerr:0.9", "-o", out)
    assert code == 0, stderr
    assert "written into the original graph" in stdout + stderr
    small = onnx.load(str(out)).graph
    assert [i.name for i in small.input] == ["x", "offset"]
    assert not any(n.op_type == "QuantizeLinear" for n in small.node)  # float activations
    assert any(i.data_type == TensorProto.INT8 for i in small.initializer)  # int8 weights
    for value in (offset, -offset):  # another offset than the calibration's computes as the original does
        got = _session(out).run(None, {"x": x[:8], "offset": value})[0]
        want = _session(path).run(None, {"x": x[:8], "offset": value})[0]
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.2
    timed = tmp_path / "timed.onnx"
    code, stdout, stderr = run_cli("compress", path, "--calib", calib, "--max-weight-bytes", "30%",
                                   "--max-latency", "400%", "--check", "relerr:0.9", "-o", timed)
    assert code == 0, stderr
    assert "which the plan counted on" in stderr
    assert [i.name for i in onnx.load(str(timed)).graph.input] == ["x"]


def test_a_result_that_changed_more_than_its_layers_is_not_grafted(tmp_path):
    path = tmp_path / "cnn.onnx"
    _cnn_with_offset(path)
    fixed = {"offset": np.zeros((1, 32, 1, 1), np.float32)}
    original = rankfold.load_onnx(path, fixed)
    result = rankfold.load_onnx(path, fixed)
    unchanged = onnx.load(str(path))
    with pytest.raises(GraftRefused, match="no layer changed"):
        grafted_model(unchanged, result, original)
    buffer = next(iter(result.buffer_of.values()))
    with torch.no_grad():
        getattr(result, buffer).add_(1)
    with pytest.raises(GraftRefused, match="changed"):
        grafted_model(unchanged, result, original)


def _opset17_graph(*nodes) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.ones(4, np.float32), "gain")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_int4_lifts_a_graph_with_onnxruntimes_own_ops_to_opset_21_only_where_its_ops_mean_the_same():
    """onnx's version converter knows no schema for onnxruntime's SimplifiedLayerNormalization (in
    the default domain, as its model builder writes it): the opset is raised where every standard op
    only gained types by 21 (Cast), and refused by name where one changed (ReduceMean's axes)."""
    from rankfold.errors import RankfoldError
    from rankfold.quantize.onnx_qdq import raised_opset

    norm = helper.make_node("SimplifiedLayerNormalization", ["x", "gain"], ["h"], axis=-1, epsilon=1e-5)
    model = _opset17_graph(norm, helper.make_node("Cast", ["h"], ["y"], to=TensorProto.FLOAT))
    raised = raised_opset(model, 21)
    assert [o.version for o in raised.opset_import if o.domain == ""] == [21]
    assert [n.op_type for n in raised.graph.node] == ["SimplifiedLayerNormalization", "Cast"]
    np.testing.assert_allclose(_session_of(raised).run(None, {"x": np.full((2, 4), 2, np.float32)})[0], 1, rtol=1e-5)
    changed = _opset17_graph(norm, helper.make_node("ReduceMean", ["h"], ["y"], axes=[1]))
    with pytest.raises(RankfoldError, match="ReduceMean change meaning from opset 17"):
        raised_opset(changed, 21)


def _session_of(model: onnx.ModelProto):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


class _TypedEncoder(torch.nn.Module):
    """Token ids and a padding mask per sample, token types beside them (a BERT export's three inputs)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.types = torch.nn.Embedding(VOCAB, WIDTH), torch.nn.Embedding(2, WIDTH)
        self.hidden, self.head = torch.nn.Linear(WIDTH, WIDTH), torch.nn.Linear(WIDTH, 8)
        with torch.no_grad():  # rank 12 plus a little noise: rank 16 keeps nearly all of it
            self.hidden.weight.copy_(torch.randn(WIDTH, 12) @ torch.randn(12, WIDTH) / 4
                                     + 0.01 * torch.randn(WIDTH, WIDTH))

    def forward(self, ids, mask, types):
        kept = mask.unsqueeze(-1).to(torch.float32)
        tokens = torch.relu(self.hidden(self.embed(ids) + self.types(types)))
        return self.head((tokens * kept).sum(1) / kept.sum(1).clamp(min=1))


def test_packed_inputs_and_an_input_given_once_are_all_inputs_of_the_written_file(tmp_path):
    """ids and mask differ per sample (read packed), the token types are given once as zeros: the
    written file takes all three again, the types as an input that still counts."""
    path, calib, out = tmp_path / "encoder.onnx", tmp_path / "calib.npz", tmp_path / "small.onnx"
    names = ["input_ids", "attention_mask", "token_type_ids"]
    example = (torch.randint(1, VOCAB, (2, 10)), torch.ones(2, 10, dtype=torch.int64),
               torch.zeros(2, 10, dtype=torch.int64))
    torch.onnx.export(_TypedEncoder().eval(), example, str(path), dynamo=False, opset_version=17, input_names=names,
                      output_names=["logits"], dynamic_axes={**{n: {0: "batch", 1: "seq"} for n in names},
                                                             "logits": {0: "batch"}})
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 11, 128)
    mask = (np.arange(10)[None] < lengths[:, None]).astype(np.int64)
    np.savez(calib, input_ids=rng.integers(1, VOCAB, (128, 10)) * mask, attention_mask=mask,
             token_type_ids=np.zeros((1, 10), np.int64))
    code, stdout, stderr = run_cli("compress", path, "--calib", calib, "--max-params", "85%", "--min-agreement", "0.5",
                                   "-o", out)
    assert code == 0, stderr
    assert "written into the original graph" in stdout + stderr
    original, small = _session(path), _session(out)
    assert [i.name for i in small.get_inputs()] == names
    fresh = {"input_ids": rng.integers(1, VOCAB, (4, 7)), "attention_mask": np.ones((4, 7), np.int64),
             "token_type_ids": np.zeros((4, 7), np.int64)}
    got, wanted = small.run(None, fresh)[0], original.run(None, fresh)[0]
    assert not np.array_equal(got, wanted) and np.linalg.norm(got - wanted) / np.linalg.norm(wanted) < 0.3
    other = small.run(None, {**fresh, "token_type_ids": np.ones((4, 7), np.int64)})[0]
    assert np.linalg.norm(other - got) / np.linalg.norm(got) > 0.01  # the types count: not a constant


def test_one_sample_runs_are_joined_on_each_outputs_sample_axis():
    """A file run one sample at a time (a state given once at batch 1) gives a sequence-first
    output as (T, 1, classes) per sample: the samples join on axis 1, a batch-first one on axis 0,
    and outputs whose sizes vary (selected rows) on axis 0."""
    from types import SimpleNamespace

    from rankfold.export.graft import given_feeds_run

    class _Runner:
        def get_inputs(self):
            return [SimpleNamespace(name="x")]

        def run(self, _names, feeds):
            v = float(feeds["x"].sum())
            return [np.full((5, 1, 3), v), np.full((1, 4), v), np.full((int(v) % 3 + 1, 2), v)]

    module = SimpleNamespace(input_names=["x"], given_values={}, packing=None)
    x = torch.arange(3, dtype=torch.float32).reshape(3, 1)
    sequence, batch_first, rows = given_feeds_run(_Runner(), module, x)
    assert sequence.shape == (5, 3, 3) and sequence[:, :, 0].tolist() == [[0.0, 1.0, 2.0]] * 5
    assert batch_first.shape == (3, 4) and batch_first[:, 0].tolist() == [0.0, 1.0, 2.0]
    assert rows.shape == (6, 2)


def test_a_fixed_batch_files_pieces_are_joined_on_each_outputs_sample_axis():
    """run_batched on a file that fixes its batch at 2: a sequence-first output's pieces (T, 2, C)
    join on axis 1, a batch-first one's on axis 0."""
    from types import SimpleNamespace

    from rankfold.runtime import run_batched

    class _Session:
        def get_inputs(self):
            return [SimpleNamespace(name="x", shape=[2, 1], type="tensor(float)")]

        def run(self, _names, feeds):
            v = feeds["x"][:, 0]
            return [np.broadcast_to(v[None, :, None], (5, len(v), 3)).copy(), v[:, None] * np.ones((1, 4))]

    sequence, batch_first = run_batched(_Session(), None, "x", np.arange(6, dtype=np.float32).reshape(6, 1))
    assert sequence.shape == (5, 6, 3) and sequence[0, :, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert batch_first.shape == (6, 4) and batch_first[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
