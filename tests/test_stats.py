import torch
from torch import nn

import rankfold
from rankfold.evaluate import onnx_size


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
