"""The planner's loss probe (planner/probe.py): what it measures on each kind of output, and on an
ONNX graph, measurements from each layer's step on that equal whole passes'."""

import pytest
import torch

from rankfold.analyze import COMPRESSIBLE
from rankfold.frontends.onnx import load_onnx
from rankfold.planner.probe import OUTLIER, SEQUENCE_OUTLIER, LossProbe, divergence
from rankfold.planner.sensitivity import layer_statistics
from tests.test_exact_rows import _exported


def test_divergence_is_kl_at_every_position_of_a_class_sequence_and_half_the_squared_error_elsewhere():
    torch.manual_seed(0)
    p, q = (torch.softmax(torch.randn(3, 5, 7, dtype=torch.float64), -1) for _ in range(2))
    assert divergence(p, q) == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-9)
    assert divergence(p, p) == pytest.approx(0.0, abs=1e-12)
    logits = torch.randn(4, 10)  # a classifier's: the KL of its softmax
    shifted = logits + torch.randn(4, 10)
    lp, lq = torch.log_softmax(logits.double(), -1), torch.log_softmax(shifted.double(), -1)
    assert divergence(logits, shifted) == pytest.approx(float((lp.exp() * (lp - lq)).sum()), rel=1e-9)
    dense = torch.randn(2, 3, 4, 4, dtype=torch.float64)  # a map: a Gaussian, as the estimate reads it
    assert divergence(dense, dense + 0.5) == pytest.approx(0.5 * 0.25 * dense.numel(), rel=1e-9)


def _recogniser(tmp_path):
    model = load_onnx(_exported(tmp_path))
    calib = torch.randn(48, 1, 8, 32)
    names = [n for n, m in model.named_modules() if isinstance(m, COMPRESSIBLE)]
    return model, calib, names, layer_statistics(model, names, calib)


def test_a_recogniser_is_probed_from_each_layers_step_with_what_whole_passes_measure(tmp_path, monkeypatch):
    """A class-score sequence gets the sequence probe; measure_all runs each measurement from its
    layer's step on (no whole pass), and each equals a whole pass's measure of the same option."""
    model, calib, names, stats = _recogniser(tmp_path)
    assert len(names) == 3
    probe = LossProbe.for_model(model, calib, stats)
    assert probe is not None and probe.outlier == SEQUENCE_OUTLIER != OUTLIER
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wanted = [(names[2], ("svd", (4,)), 1.0), (names[0], ("svd", (2,)), 1.0), (names[1], ("svd", (8,)), 1.0)]
    with monkeypatch.context() as patched:
        patched.setattr(LossProbe, "_whole_pass", lambda self: pytest.fail("a whole pass ran"))
        probe.measure_all(wanted)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights restored
    whole = LossProbe.for_model(model, calib, stats)
    for name, key, estimate in wanted:
        from_step = probe.values[name][key][0]
        assert from_step > 0
        assert from_step == pytest.approx(whole.measure(name, key, estimate), rel=1e-6)
    full_rank = whole.measure(names[0], ("svd", (9,)), 1.0)  # 9 taps of 1 channel: the same network, rounding aside
    assert full_rank < 1e-3 * probe.values[names[0]][("svd", (2,))][0]


def test_a_dense_map_is_not_probed(tmp_path):
    """A detector's map: its estimate and a measure would be in the same Gaussian units (measured:
    YOLOv8n's score IoU 0.595 -> 0.613 at half its parameters, for 40 s more): no probe."""
    import torch.nn as nn

    path = tmp_path / "map.onnx"
    torch.onnx.export(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval(),
                      (torch.randn(2, 3, 8, 8),), str(path), dynamo=False, opset_version=17, input_names=["x"],
                      dynamic_axes={"x": {0: "n"}})
    model, calib = load_onnx(path), torch.randn(32, 3, 8, 8)
    names = [n for n, m in model.named_modules() if isinstance(m, COMPRESSIBLE)]
    assert LossProbe.for_model(model, calib, layer_statistics(model, names, calib)) is None


def test_a_declared_embedding_is_measured_as_a_gaussian_not_as_class_logits():
    """A sentence encoder's (N, hidden) output (output_kinds "embedding"): the planner's likelihood
    reads it as a Gaussian, so the probe measures half its squared error, not the KL of a softmax."""
    embedding = torch.randn(4, 16, dtype=torch.float64)
    moved = embedding + 0.1
    assert divergence(embedding, moved, "embedding") == pytest.approx(0.5 * 0.01 * embedding.numel(), rel=1e-9)
    assert divergence(embedding, moved) != pytest.approx(divergence(embedding, moved, "embedding"))
    assert divergence(torch.arange(4), torch.arange(4) + 1) == 0.0  # integer outputs (indices): nothing to measure


def test_a_recognisers_outlier_multiple_carries_to_the_ranks_above_it():
    """A sequence probe's outlier is a layer the estimate misjudges at every rank: a rank above it
    is raised by its multiple over the typical one."""
    probe = LossProbe.__new__(LossProbe)
    probe.values, probe.typical, probe.outlier, probe.carries_up = {}, None, SEQUENCE_OUTLIER, True
    for i in range(4):
        probe.record(f"l{i}", ("svd", (8,)), 2e-3, 1e-3)  # the typical multiple: 2
    probe.record("bad", ("svd", (8,)), 2e-2, 1e-3)  # 20x its estimate: 10 times the typical multiple
    assert probe.typical == pytest.approx(2.0)
    assert probe.structural_loss("bad", ("svd", (8,)), 1e-3) == pytest.approx(1e-2)  # 2e-2 / 2
    assert probe.structural_loss("bad", ("svd", (4,)), 3e-3) == pytest.approx(1e-2)  # lower: at least that
    assert probe.structural_loss("bad", ("svd", (16,)), 5e-4) == pytest.approx(5e-3)  # higher: 10 x its estimate
    assert probe.structural_loss("l0", ("svd", (16,)), 5e-4) == 5e-4  # above a typical one: kept
    probe.record("bad", ("svd", (24,)), 4e-4, 2e-4)  # a rank above at the typical multiple: still misjudged
    assert probe.structural_loss("bad", ("svd", (32,)), 1e-4) == pytest.approx(1e-3)
    probe.carries_up = False  # a classifier's: a rank too small for the layer, the estimate holds above it
    assert probe.structural_loss("bad", ("svd", (16,)), 5e-4) == 5e-4


def test_in_eval_mode_gives_back_the_training_mode_however_the_block_ends():
    from torch import nn

    from rankfold.analyze import in_eval_mode

    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    with in_eval_mode(model) as same:
        assert same is model and not model.training and not model[1].training
    assert model.training and model[1].training
    with pytest.raises(ValueError), in_eval_mode(model):
        raise ValueError("a failed pass")
    assert model.training
    model.eval()
    with in_eval_mode(model):
        pass
    assert not model.training  # a model in eval mode stays so
