import numpy as np
import onnx
import pytest
import torch
from torch import nn

import rankfold
from rankfold.errors import RankfoldError
from rankfold.evaluate import accuracy, onnx_peak_activation_bytes, onnx_size


def test_known_layer_counts_are_exact():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),  # out 8x8x8 from 16x16
        nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),
    )
    cost = rankfold.model_cost(model, torch.randn(2, 3, 16, 16))
    by_name = {layer.name: layer for layer in cost.layers}
    assert by_name["0"].params == 8 * 3 * 9 + 8
    assert by_name["0"].macs == 8 * 8 * 8 * 3 * 9
    assert by_name["1"].params == 8 * 2 * 9
    assert by_name["1"].macs == 8 * 8 * 8 * 2 * 9
    assert by_name["3"].macs == 512 * 10
    assert cost.params == 224 + 144 + 5130
    assert cost.weight_bytes == 4 * cost.params
    assert cost.macs == 8 * 8 * 8 * 27 + 8 * 8 * 8 * 18 + 5120


def test_onnx_counts_agree_with_torch_counts(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2),
                          nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    x = torch.randn(2, 3, 16, 16)
    path = tmp_path / "m.onnx"
    rankfold.export_onnx(model, path, example_input=x)
    size = onnx_size(path)
    cost = rankfold.model_cost(model, x)
    assert size.params == cost.params
    assert size.macs == cost.macs
    assert size.weight_bytes == cost.weight_bytes
    assert size.file_bytes == path.stat().st_size


def test_counting_and_export_leave_the_training_mode_alone(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).train()
    x = torch.randn(2, 3, 8, 8)
    rankfold.model_cost(model, x)
    rankfold.export_onnx(model, tmp_path / "m.onnx", example_input=x)
    assert model.training and model[1].training


def _graph(nodes, inits, shape_in, shape_out, path, elem=onnx.TensorProto.FLOAT):
    graph = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", elem, shape_in)],
                                   [onnx.helper.make_tensor_value_info("y", elem, shape_out)], inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return model


def test_peak_activation_counts_the_live_residual_branch(tmp_path):
    w = onnx.numpy_helper.from_array(np.ones((8, 8, 1, 1), np.float32), "w")
    nodes = [onnx.helper.make_node("Conv", ["x", "w"], ["a"]), onnx.helper.make_node("Relu", ["a"], ["b"]),
             onnx.helper.make_node("Add", ["x", "b"], ["y"])]
    model = _graph(nodes, [w], ["N", 8, 4, 4], ["N", 8, 4, 4], tmp_path / "res.onnx")
    one = 8 * 4 * 4 * 4  # bytes of one float tensor of this shape
    # while Relu runs, x (kept for the Add), a and b are alive
    assert onnx_peak_activation_bytes(model) == 3 * one


def test_peak_activation_of_a_graph_with_open_sizes_is_taken_at_the_samples_size(tmp_path):
    """Height and width left open counted nothing (a BERT file, its tokens open, read 4 kB): they
    take the data's size, as the MACs do."""
    w = onnx.numpy_helper.from_array(np.ones((8, 8, 1, 1), np.float32), "w")
    nodes = [onnx.helper.make_node("Conv", ["x", "w"], ["a"]), onnx.helper.make_node("Relu", ["a"], ["b"]),
             onnx.helper.make_node("Add", ["x", "b"], ["y"])]
    model = _graph(nodes, [w], ["N", 8, "h", "w"], ["N", 8, "h", "w"], tmp_path / "open.onnx")
    assert onnx_peak_activation_bytes(model, sample_shape=(8, 5, 6)) == 3 * 8 * 5 * 6 * 4


def test_peak_activation_of_a_qdq_graph_counts_the_fused_int8_tensors(tmp_path):
    inits = [onnx.numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             onnx.numpy_helper.from_array(np.array(0, np.int8), "z"),
             onnx.numpy_helper.from_array(np.ones((8, 8, 1, 1), np.int8), "wq"),
             onnx.numpy_helper.from_array(np.ones(8, np.float32), "ws")]
    nodes = [onnx.helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             onnx.helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             onnx.helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], axis=0),
             onnx.helper.make_node("Conv", ["xd", "wd"], ["c"]),
             onnx.helper.make_node("QuantizeLinear", ["c", "s", "z"], ["cq"]),
             onnx.helper.make_node("DequantizeLinear", ["cq", "s", "z"], ["y"])]
    model = _graph(nodes, inits, ["N", 8, 4, 4], ["N", 8, 4, 4], tmp_path / "qdq.onnx")
    elems = 8 * 4 * 4
    # the float input, then the int8 input and the int8 output of the fused conv, then the float output
    assert onnx_peak_activation_bytes(model) == max(4 * elems + elems, 2 * elems, elems + 4 * elems)


def test_accuracy_runs_a_model_exported_for_a_fixed_batch(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    path = tmp_path / "fixed.onnx"
    torch.onnx.export(model, (torch.randn(5, 3, 4),), str(path), dynamo=False)  # batch fixed at 5
    x = torch.randn(20, 3, 4)
    with torch.no_grad():
        y = model(x).argmax(1).numpy()
    assert accuracy(str(path), x.numpy(), y) == 1.0
    with pytest.raises(RankfoldError, match="fixed at 5"):
        accuracy(str(path), x[:7].numpy(), y[:7])
