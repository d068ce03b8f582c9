"""Graphs with several inputs (issue 14): calibration .npz files keyed by input name, inputs given
once (a sample rate, an initial state) bound as constants, so that an If on them folds."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import rankfold
from rankfold.data import graph_data
from rankfold.errors import RankfoldError
from rankfold.frontends.onnx import bind_inputs, graph_inputs, read_onnx
from tests.helpers import run_cli


def _voice_like(path) -> None:
    """x (N, 16) through one Gemm chosen by an If on the sample rate `sr`, plus a state (1, 8) added
    to the result: the shape of a streaming audio model's interface."""
    rng = np.random.default_rng(0)
    weights = {name: numpy_helper.from_array(rng.normal(size=(16, 8)).astype(np.float32), name)
               for name in ("w16k", "w8k")}

    def branch(name: str, weight: str):
        out = helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, ["N", 8])
        return helper.make_graph([helper.make_node("MatMul", ["x", weight], [f"{name}_y"])], name, [], [out])

    nodes = [
        helper.make_node("Constant", [], ["rate"], value=helper.make_tensor("r", TensorProto.INT64, [], [16000])),
        helper.make_node("Equal", ["sr", "rate"], ["is16k"]),
        helper.make_node("If", ["is16k"], ["h"], then_branch=branch("then", "w16k"), else_branch=branch("else", "w8k")),
        helper.make_node("Add", ["h", "state"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16]),
              helper.make_tensor_value_info("sr", TensorProto.INT64, []),
              helper.make_tensor_value_info("state", TensorProto.FLOAT, [1, 8])]
    graph = helper.make_graph(nodes, "voice", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
                              initializer=list(weights.values()))
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _original(path, x, sr, state):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x, "sr": np.array(sr, np.int64), "state": state})[0]


def test_inputs_given_once_are_bound_and_an_if_on_them_folds(tmp_path):
    _voice_like(tmp_path / "voice.onnx")
    x = np.random.default_rng(1).normal(size=(64, 16)).astype(np.float32)
    state = np.full((1, 8), 0.5, np.float32)
    np.savez(tmp_path / "calib.npz", x=x, sr=np.array(16000), state=state)
    data, fixed = graph_data(tmp_path / "calib.npz", graph_inputs(read_onnx(tmp_path / "voice.onnx")),
                             need_labels=False)
    assert data.x.shape == (64, 16) and sorted(fixed) == ["sr", "state"] and fixed["sr"].dtype == np.int64
    model = rankfold.load_onnx(tmp_path / "voice.onnx", fixed)
    assert model.input_names == ["x"] and model.fixed_inputs == ["sr", "state"]
    for rate in (16000, 8000):  # each sample rate takes its own branch
        bound = rankfold.load_onnx(tmp_path / "voice.onnx", {**fixed, "sr": np.array(rate)})
        np.testing.assert_allclose(bound(torch.from_numpy(x)).detach().numpy(),
                                   _original(tmp_path / "voice.onnx", x, rate, state), rtol=1e-5, atol=1e-5)


def test_a_graph_with_inputs_given_once_compresses_and_says_so(tmp_path):
    _voice_like(tmp_path / "voice.onnx")
    x = np.random.default_rng(1).normal(size=(64, 16)).astype(np.float32)
    state = np.full((1, 8), 0.5, np.float32)
    np.savez(tmp_path / "calib.npz", x=x, sr=np.array(16000), state=state)
    out = tmp_path / "small.onnx"
    code, stdout, stderr = run_cli("compress", tmp_path / "voice.onnx", "--calib", tmp_path / "calib.npz",
                                   "--method", "svd", "--keep", "0.99", "-o", out)
    assert code == 0, stderr
    # its layer lies inside an If's branch: written traced, the inputs given once as constants, and said so
    assert "inputs given once (sr, state) are constants of the written file" in stdout + stderr
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x"]
    got = session.run(None, {"x": x})[0]
    want = _original(tmp_path / "voice.onnx", x, 16000, state)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.2


@pytest.mark.parametrize("arrays, message", [
    (dict(x=np.zeros((8, 16), np.float32), sr=np.array(16000)), "no array for the graph input.*'state'"),
    (dict(x=np.zeros((8, 16), np.float32), sr=np.array(16000), state=np.zeros((1, 8), np.float32),
          rate=np.array(1)), "'rate' name no input of the graph"),
    (dict(x=np.zeros((8, 16), np.float32), sr=np.array(16000), state=np.zeros((2, 8), np.float32)),
     r"'state' given once must have the graph's shape \[1, 8\]"),
    (dict(x=np.zeros((8, 16), np.float32), sr=np.array(np.nan), state=np.zeros((1, 8), np.float32)),
     "'sr' has NaN"),
])
def test_bad_graph_data_is_refused_by_name(tmp_path, arrays, message):
    _voice_like(tmp_path / "voice.onnx")
    np.savez(tmp_path / "calib.npz", **arrays)
    with pytest.raises(RankfoldError, match=message):
        graph_data(tmp_path / "calib.npz", graph_inputs(read_onnx(tmp_path / "voice.onnx")), need_labels=False)


def _state_in_batch(path) -> None:
    """x (N, 4) plus a state (2, N, 4) whose batch is its second axis, as an LSTM's state is."""
    nodes = [helper.make_node("ReduceSum", ["state", "axis0"], ["s"], keepdims=0),
             helper.make_node("Add", ["x", "s"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
                     helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=[numpy_helper.from_array(np.array([0], np.int64), "axis0")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_a_state_per_sample_on_another_axis_is_refused_with_the_fix(tmp_path):
    _state_in_batch(tmp_path / "g.onnx")
    inputs = graph_inputs(read_onnx(tmp_path / "g.onnx"))
    np.savez(tmp_path / "per_sample.npz", x=np.zeros((8, 4), np.float32), state=np.zeros((2, 8, 4), np.float32))
    with pytest.raises(RankfoldError, match="one value per sample on axis 1.*make that axis 1"):
        graph_data(tmp_path / "per_sample.npz", inputs, need_labels=False)
    np.savez(tmp_path / "once.npz", x=np.zeros((8, 4), np.float32), state=np.ones((2, 1, 4), np.float32))
    data, fixed = graph_data(tmp_path / "once.npz", inputs, need_labels=False)
    assert data.x.shape == (8, 4) and fixed["state"].shape == (2, 1, 4)


def test_a_mask_given_once_as_long_as_the_samples_are_many_is_not_read_as_per_sample(tmp_path):
    """128 token windows of 128 tokens, their all-ones mask given once (1, 128): the graph names the
    mask's axis apart from the batch, so its length is not taken for one value per sample."""
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["mask"], ["count"], keepdims=0),
         helper.make_node("Cast", ["count"], ["scale"], to=TensorProto.FLOAT),
         helper.make_node("Cast", ["ids"], ["fids"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["fids", "scale"], ["y"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "tokens"]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "total_tokens"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "tokens"])])
    inputs = graph_inputs(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    np.savez(tmp_path / "windows.npz", ids=np.zeros((128, 128), np.int64), mask=np.ones((1, 128), np.int64))
    data, fixed = graph_data(tmp_path / "windows.npz", inputs, need_labels=False)
    assert data.x.shape == (128, 128) and fixed["mask"].shape == (1, 128)


def test_two_inputs_that_vary_per_sample_are_packed_and_one_the_same_for_all_is_given_once(tmp_path):
    """An all-ones attention mask stored per sample (khmersm's) is the same for every sample: given
    once. Two inputs that differ per sample (ids and a padding mask) are packed as one
    (tests/test_packed_inputs.py follows them through compress)."""
    _state_in_batch(tmp_path / "g.onnx")
    graph = read_onnx(tmp_path / "g.onnx")
    inputs = [graph_inputs(graph)[0], graph_inputs(graph)[0]._replace(name="x2")]
    x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    np.savez(tmp_path / "two.npz", x=x, x2=x[::-1].copy())
    data, fixed = graph_data(tmp_path / "two.npz", inputs, need_labels=False)
    assert data.packed == ("x", "x2") and not fixed and np.array_equal(data.x[:, 1], x[::-1])
    np.savez(tmp_path / "mask.npz", x=x, x2=np.ones((8, 4), np.float32))
    data, fixed = graph_data(tmp_path / "mask.npz", inputs, need_labels=False)
    assert data.x.shape == (8, 4) and np.array_equal(data.x, x) and fixed["x2"].shape == (1, 4)


def test_a_multi_input_graph_without_named_arrays_is_refused_on_the_cli(tmp_path):
    _voice_like(tmp_path / "voice.onnx")
    np.savez(tmp_path / "calib.npz", x=np.zeros((8, 16), np.float32))
    code, _stdout, stderr = run_cli("compress", tmp_path / "voice.onnx", "--calib", tmp_path / "calib.npz",
                                    "--keep", "0.5", "-o", tmp_path / "o.onnx")
    assert code == 2 and "Traceback" not in stderr
    assert "no array for the graph input(s) 'sr', 'state'" in stderr
    assert not (tmp_path / "o.onnx").exists()


def _if_on_shape(path, axis: int) -> None:
    """An If on Shape(x)[axis] == 1 (as exporters write `if x.shape[-1] == 1`), Relu or Neg of x."""
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "T"])
    then_out = helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N", 4, "T"])
    else_out = helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", 4, "T"])
    neg = helper.make_graph([helper.make_node("Neg", ["x"], ["t"])], "t", [], [then_out])
    relu = helper.make_graph([helper.make_node("Relu", ["x"], ["e"])], "e", [], [else_out])
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "axis"], ["d"], axis=0),
             helper.make_node("Equal", ["d", "one"], ["c"]),
             helper.make_node("Not", ["c"], ["nc"]),
             helper.make_node("If", ["nc"], ["y"], then_branch=neg, else_branch=relu)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, "T"])], [out],
                              initializer=[numpy_helper.from_array(np.array(axis, np.int64), "axis"),
                                           numpy_helper.from_array(np.array(1, np.int64), "one")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_an_if_that_shapes_alone_decide_is_decided_on_the_calibration_samples(tmp_path):
    _if_on_shape(tmp_path / "g.onnx", -1)
    x = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32)
    with pytest.raises(RankfoldError, match="If whose condition depends on the input"):
        rankfold.load_onnx(tmp_path / "g.onnx")  # without samples it cannot be decided
    model = rankfold.load_onnx(tmp_path / "g.onnx", probe=torch.from_numpy(x))
    np.testing.assert_allclose(model(torch.from_numpy(x)).detach().numpy(), -x)  # T = 5: not 1, so Neg
    assert "decided at the calibration samples' size" in model.size_note
    _if_on_shape(tmp_path / "batch.onnx", 0)  # on the batch size: batch 1 and batch 2 disagree
    with pytest.raises(RankfoldError, match="depends on the batch size"):
        rankfold.load_onnx(tmp_path / "batch.onnx", probe=torch.from_numpy(x))


def test_eval_measures_a_multi_input_graph_and_its_result_on_one_file(tmp_path):
    _voice_like(tmp_path / "voice.onnx")
    x = np.random.default_rng(1).normal(size=(64, 16)).astype(np.float32)
    state = np.full((1, 8), 0.5, np.float32)
    labels = _original(tmp_path / "voice.onnx", x, 16000, state).argmax(1)
    np.savez(tmp_path / "data.npz", x=x, y=labels, sr=np.array(16000), state=state)
    code, stdout, stderr = run_cli("eval", tmp_path / "voice.onnx", "--data", tmp_path / "data.npz", "--json",
                                   "--no-latency")
    assert code == 0, stderr
    assert json.loads(stdout)["accuracy"] == 1.0  # the labels are the original's own argmax
    assert "inputs given once (sr, state) are bound as constants" in stderr
    assert run_cli("compress", tmp_path / "voice.onnx", "--calib", tmp_path / "data.npz", "--method", "svd",
                   "--keep", "0.99", "-o", tmp_path / "small.onnx")[0] == 0
    code, stdout, stderr = run_cli("eval", tmp_path / "small.onnx", "--data", tmp_path / "data.npz", "--json",
                                   "--no-latency")
    assert code == 0, stderr
    assert json.loads(stdout)["accuracy"] >= 0.9


def test_a_bound_state_is_expanded_to_the_batch_for_onnxruntime(tmp_path):
    """onnxruntime's LSTM wants its initial state at the batch's size: a state given once with a
    batch axis of 1 is expanded to the per-sample input's batch in the bound copy."""
    nodes = [helper.make_node("Identity", ["state"], ["state_out"]), helper.make_node("Relu", ["x"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
                     helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [2, "batch", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    state = np.arange(6, dtype=np.float32).reshape(2, 1, 3)
    bound = bind_inputs(model, {"state": state})
    onnx.checker.check_model(bound)
    session = ort.InferenceSession(bound.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x"]
    _y, out = session.run(None, {"x": np.ones((5, 4), np.float32)})
    np.testing.assert_array_equal(out, np.broadcast_to(state, (2, 5, 3)))


def test_weights_inside_if_branches_are_counted(tmp_path):
    """Exporters put whole networks inside If branches (Silero VAD: one per sample rate): their
    initializers and Constant nodes are the file's weights too."""
    from rankfold.evaluate import onnx_size

    def branch(name: str, rows: int):
        weight = numpy_helper.from_array(np.ones((4, rows), np.float32), f"{name}_w")
        zeros = numpy_helper.from_array(np.zeros(rows, np.float32))
        bias = helper.make_node("Constant", [], [f"{name}_b"], value=zeros)
        out = helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, ["N", rows])
        nodes = [bias, helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_m"]),
                 helper.make_node("Add", [f"{name}_m", f"{name}_b"], [f"{name}_y"])]
        return helper.make_graph(nodes, name, [], [out], initializer=[weight])

    nodes = [helper.make_node("If", ["flag"], ["y"], then_branch=branch("a", 3), else_branch=branch("b", 3))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
                                           helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "if.onnx")
    size = onnx_size(tmp_path / "if.onnx")
    assert size.params == 2 * (4 * 3 + 3) and size.weight_bytes == 4 * size.params


def test_training_samples_of_a_multi_input_graph_are_read_like_the_calibration(tmp_path):
    """compress --train (and finetune --train, pareto --data) read one array per input, as --calib
    does; an input given once must be the value --calib gave (a constant of the result)."""
    _voice_like(tmp_path / "voice.onnx")
    rng = np.random.default_rng(1)
    state = np.full((1, 8), 0.5, np.float32)
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(128, 16)).astype(np.float32), sr=np.array(16000), state=state)
    x = rng.normal(size=(64, 16)).astype(np.float32)
    np.savez(tmp_path / "train.npz", x=x, sr=np.array(16000), state=state)
    np.savez(tmp_path / "other.npz", x=x, sr=np.array(16000), state=state + 1)
    np.savez(tmp_path / "bare.npz", x=x)
    common = ["compress", tmp_path / "voice.onnx", "--calib", tmp_path / "calib.npz", "--max-weight-bytes", "50%",
              "--finetune-steps", "2", "-o", tmp_path / "small.onnx"]
    for name, message in (("other", "input 'state' must be given once as --calib gives it"),
                          ("bare", "no array for the graph input")):
        code, _out, err = run_cli(*common, "--train", tmp_path / f"{name}.npz")
        assert code == 2 and message in err and "Traceback" not in err, err
        assert not (tmp_path / "small.onnx").exists()
    code, stdout, stderr = run_cli(*common, "--train", tmp_path / "train.npz", "--check", "relerr:0.5")
    assert code == 0, stderr
    assert "fine-tuning on 64 samples" in stdout + stderr


def _byte_classifier(path) -> None:
    """int32 bytes (N, 32) -> an embedding Gather (257 ids, padding 256 as Magika pads) -> flatten ->
    two MatMuls: a graph whose input is integer ids, as token and byte classifiers are."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(size=(257, 4)).astype(np.float32), "table"),
             numpy_helper.from_array((rng.normal(size=(128, 6)) @ rng.normal(size=(6, 64)) * 0.1  # a trained
                                      + rng.normal(size=(128, 64)) * 0.01).astype(np.float32), "w1"),  # one's spectrum
             numpy_helper.from_array((rng.normal(size=(64, 10)) * 0.4).astype(np.float32), "w2")]
    nodes = [helper.make_node("Gather", ["table", "bytes"], ["e"]),
             helper.make_node("Flatten", ["e"], ["m"], axis=1),
             helper.make_node("MatMul", ["m", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "bytes", [helper.make_tensor_value_info("bytes", TensorProto.INT32, ["N", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)


def test_a_graph_that_takes_integer_ids_calibrates_on_them_and_refuses_floats(tmp_path):
    """Magika (Google's file-type detector) takes int32 bytes: its data was refused ('must be
    floating point'), then the planner fed it floats. Integer data is taken where the graph
    declares an integer input, kept integer through planning, timing and the check; float data
    for it is refused by name."""
    path = tmp_path / "bytes.onnx"
    _byte_classifier(path)
    ids = np.random.default_rng(4).integers(0, 257, size=(160, 32)).astype(np.int32)
    np.savez(tmp_path / "calib.npz", x=ids)
    out = tmp_path / "small.onnx"
    code, _out, err = run_cli("compress", path, "--calib", tmp_path / "calib.npz", "--max-weight-bytes", "60%",
                              "-o", out)
    assert code == 0, err
    want, got = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"bytes": ids[:32]})[0]
                 for p in (path, out))
    assert (want.argmax(1) == got.argmax(1)).mean() > 0.8
    np.savez(tmp_path / "floats.npz", x=ids.astype(np.float32))
    code, _out, err = run_cli("compress", path, "--calib", tmp_path / "floats.npz", "--max-weight-bytes", "60%",
                              "-o", tmp_path / "no.onnx")
    assert code == 2 and "must be integers the graph's int32 input holds, got float32" in err
    assert not (tmp_path / "no.onnx").exists()



def test_layers_behind_an_integer_input_made_float_have_a_sensitivity(tmp_path):
    """Magika casts its int32 bytes to a float one-hot inside the graph: no gradient reached its
    layers, every sensitivity read zero, and the planner took every layer's smallest option (28 %
    top-1 agreement at 95 % of the bytes). Each layer behind a Cast must weigh something."""
    from rankfold.planner.sensitivity import layer_statistics

    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.normal(size=(32, 48)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=(48, 10)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Cast", ["bytes"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["f", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "cast", [helper.make_tensor_value_info("bytes", TensorProto.INT32, ["N", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "cast.onnx")
    model = rankfold.load_onnx(str(tmp_path / "cast.onnx"))
    layers = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    ids = torch.from_numpy(rng.integers(0, 256, size=(64, 32)).astype(np.int32))
    stats = layer_statistics(model, layers, ids)
    assert len(layers) == 2 and all(float(stats[name].sensitivity.sum()) > 0 for name in layers)


def test_a_state_given_at_batch_one_that_onnxruntime_does_not_broadcast_fixes_the_batch_at_one(tmp_path, capsys):
    """AECMOS (speechmos): a GRU whose initial state is given once at batch 1, and a Squeeze that drops
    the batch. rankfold's GRU broadcasts the state, onnxruntime's does not: the file runs one sample
    at a time, and its result said [batch, 4] while computing (4,) at one sample and failing at two."""
    from rankfold.cli import main

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "w"),
             numpy_helper.from_array((rng.normal(size=(1, 12, 8)) * 0.3).astype(np.float32), "gru_w"),
             numpy_helper.from_array((rng.normal(size=(1, 12, 4)) * 0.3).astype(np.float32), "gru_r")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]),
             helper.make_node("Transpose", ["m"], ["steps"], perm=[1, 0, 2]),
             helper.make_node("GRU", ["steps", "gru_w", "gru_r", "", "", "h0"], ["", "last"], hidden_size=4),
             helper.make_node("Squeeze", ["last"], ["y"])]
    graph = helper.make_graph(nodes, "state", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8]),
                                               helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, 1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch_size"])], inits)
    path, calib, out = tmp_path / "state.onnx", tmp_path / "calib.npz", tmp_path / "out.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), path)
    x = rng.normal(size=(64, 3, 8)).astype(np.float32)
    np.savez(calib, x=x, h0=np.zeros((1, 1, 4), np.float32))
    assert main(["compress", str(path), "--calib", str(calib), "--keep", "0.9", "--check", "relerr:0.5",
                 "-o", str(out)]) == 0, capsys.readouterr().err
    assert "runs one sample at a time" in capsys.readouterr().err
    small = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert small.get_inputs()[0].shape[0] == 1
    assert small.run(None, {"x": x[:1]})[0].shape == (4,)
    assert [d.dim_value for d in onnx.load(out).graph.output[0].type.tensor_type.shape.dim] == [4]
