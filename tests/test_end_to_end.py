"""Train a real (small) CNN, compress it data-aware and check accuracy and size hold."""

import pytest
import torch

import rankfold
from rankfold.demo import run_demo, small_cnn, train, trained_model
from rankfold.demo_data import demo_dataset, digits


@pytest.fixture(scope="module")
def trained():
    data = digits()
    torch.manual_seed(0)
    model = small_cnn(classes=10)
    train(model, data.x_train, data.y_train, epochs=6, log=lambda _m: None, batch_size=64)
    return model, data


def top1(model, x, y):
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def test_tucker2_keep_03_holds_accuracy_at_under_40_percent_params(trained, tmp_path):
    model, data = trained
    base = top1(model, data.x_test, data.y_test)
    assert base > 0.9  # the network really learned
    calib = torch.from_numpy(data.x_train[:512])
    compressed = rankfold.compress(model, method="tucker2", keep=0.3, calib=calib)
    params = sum(p.numel() for p in compressed.parameters()) / sum(p.numel() for p in model.parameters())
    assert params <= 0.40
    # 360 test images: one image is 0.28 points; the 1-point acceptance is measured on Fashion-MNIST
    assert top1(compressed, data.x_test, data.y_test) >= base - 0.03
    # and the compressed network exports and runs in onnxruntime with the same predictions
    path = tmp_path / "c.onnx"
    rankfold.export_onnx(compressed, path, example_input=calib[:2])
    from rankfold.evaluate import accuracy

    assert abs(accuracy(str(path), data.x_test, data.y_test) - top1(compressed, data.x_test, data.y_test)) < 0.003


def test_data_aware_beats_data_free_on_a_trained_network(trained):
    model, data = trained
    calib = torch.from_numpy(data.x_train[:512])
    x = torch.from_numpy(data.x_test)
    with torch.no_grad():
        reference = model(x)
        errors = {}
        for name, kwargs in (("free", {}), ("aware", {"calib": calib})):
            out = rankfold.compress(model, method="tucker2", keep=0.15, **kwargs)(x)
            errors[name] = float((out - reference).norm() / reference.norm())
    assert errors["aware"] < errors["free"]


@pytest.mark.slow
def test_demo_plans_exports_c_and_reuses_its_training(tmp_path):
    # The network an earlier demo trained with the same settings: the demo reuses it, file untouched
    # (trained here alone, so that the whole demo runs once).
    first, reused = trained_model(str(tmp_path), demo_dataset(), epochs=1, train_limit=3000, log=lambda _m: None)
    assert not reused
    with open(first, "rb") as handle:
        trained_bytes = handle.read()
    logs = []
    result = run_demo(str(tmp_path), epochs=1, train_limit=3000, c_samples=50, log=logs.append)
    for name in ("original.onnx", "planned.onnx", "uniform.onnx", "front.png", "demo.json", "c/model.c"):
        assert (tmp_path / name).is_file(), name
    models = result["models"]
    original, planned = models["original (float)"], models["planned for cortex-m4 (int8/int4)"]
    assert planned["weight_bytes"] <= 0.08 * original["weight_bytes"] * 1.02  # the budget, as written
    assert result["plan"]["feasible"] and result["plan"]["target"] == "cortex-m4"
    assert any(layer["bits"] < 32 for layer in result["plan"]["layers"])  # quantized in tandem
    assert result["c"]["golden_mismatches"] == 0 and result["c"]["samples"] == 50
    assert result["reused_training"] and any("reusing" in line for line in logs)
    with open(first, "rb") as handle:
        assert handle.read() == trained_bytes
    # other settings train again
    assert not trained_model(str(tmp_path), demo_dataset(), epochs=1, train_limit=2000, log=lambda _m: None)[1]


def test_demo_refuses_bad_settings_before_training(tmp_path):
    from rankfold.errors import RankfoldError

    for kwargs in ({"target": "cortex-m99"}, {"max_weight_bytes": "8 parsecs"}):
        with pytest.raises(RankfoldError):
            run_demo(str(tmp_path / "d"), epochs=1, train_limit=100, log=lambda _m: None, **kwargs)
    assert not (tmp_path / "d").exists()
