"""Wide output layers held as the rows the data reads and the rest (rankfold.exact_rows): found on
calibration data, planned as two layers, saved into the user's graph, and applied again from the
plan file."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from rankfold.exact_rows import UNREAD_MASS, calibration_rows, split_stats, with_exact_rows
from rankfold.frontends.onnx import load_onnx
from rankfold.layers import ExactRows

CLASSES, READ = 400, 12  # a recogniser's alphabet, and the classes its lines use
HEAD = "head_MatMul"  # the head's layer as the ONNX front-end names it


class _Recogniser(nn.Module):
    """Frames of a line (N, 1, 8, 32) -> (N, 16, CLASSES) probabilities, through a convolution, a
    Linear and a wide head that favours the first READ classes: the data never predicts the rest.
    `spread` flattens the head's scores, as a language model's next-token distribution is flat."""

    def __init__(self, spread: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 24, 3, padding=1)
        self.mix = nn.Linear(24 * 8, 48)
        self.head = nn.Linear(48, CLASSES)
        with torch.no_grad():
            self.head.weight.mul_(0.05 if spread else 1.0)
            self.head.weight[:READ] *= 1.0 if spread else 40.0  # each frame read as one of them, decisively
            self.head.bias.copy_(torch.zeros(CLASSES) if spread else torch.cat([torch.full((READ,), 14.0),
                                                                               torch.zeros(CLASSES - READ)]))

    def forward(self, x):
        h = torch.relu(self.conv(x))  # (N, 24, 8, 32)
        frames = h.permute(0, 3, 1, 2).flatten(2)  # (N, 32, 192)
        return torch.softmax(self.head(torch.relu(self.mix(frames[:, ::2]))), -1)


def _exported(tmp_path, spread: bool = False):
    path = tmp_path / ("flat.onnx" if spread else "recogniser.onnx")
    torch.onnx.export(_Recogniser(spread).eval(), (torch.randn(2, 1, 8, 32),), str(path), dynamo=False,
                      opset_version=17, input_names=["x"], dynamic_axes={"x": {0: "n"}})
    return str(path)


def test_the_rows_the_data_predicts_are_found_and_split_off_with_the_same_outputs(tmp_path):
    model, calib = load_onnx(_exported(tmp_path)), torch.randn(64, 1, 8, 32)
    rows = calibration_rows(model, calib)
    assert list(rows) == [HEAD] and 0 < len(rows[HEAD]) <= READ
    assert set(rows[HEAD]) <= set(range(READ))
    split = with_exact_rows(model, rows)
    assert isinstance(split.get_submodule(HEAD), ExactRows) and not isinstance(model.get_submodule(HEAD), ExactRows)
    with torch.no_grad():
        torch.testing.assert_close(split(calib), model(calib), rtol=1e-5, atol=1e-7)
    # a flat distribution (a language model's) holds more than UNREAD_MASS outside what it predicts
    flat = load_onnx(_exported(tmp_path, spread=True))
    assert calibration_rows(flat, calib) == {}
    with torch.no_grad():
        p = flat(calib).reshape(-1, CLASSES)
    predicted = torch.unique(p.argmax(-1))
    assert 1 - p[:, predicted].sum(-1).mean() > UNREAD_MASS


def test_the_split_layers_statistics_are_those_the_sensitivity_pass_measures_on_the_split_model(tmp_path):
    """The planner finds the rows in its sensitivity pass over the whole model (no pass of its
    own) and derives the two parts' statistics from the head's: the same as measured on them."""
    from rankfold.planner.sensitivity import layer_statistics

    model, calib = load_onnx(_exported(tmp_path)), torch.randn(64, 1, 8, 32)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    whole = layer_statistics(model, names, calib)
    assert whole[HEAD].class_tally is not None and whole[HEAD].class_tally.sequence
    rows = calibration_rows(model, calib)
    split = with_exact_rows(model, rows)
    split_names = [n for n, m in split.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    measured, derived = layer_statistics(split, split_names, calib), split_stats(whole, rows)
    assert sorted(measured) == sorted(derived) and f"{HEAD}.read" in derived and HEAD not in derived
    for name, got in derived.items():
        want = measured[name]
        torch.testing.assert_close(got.input_moment, want.input_moment, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(got.sensitivity, want.sensitivity, rtol=1e-5, atol=1e-12)
        assert (got.input_shape, got.output_shape) == (want.input_shape, want.output_shape), name
        assert (got.output_metric is None) == (want.output_metric is None), name


def test_a_plan_holds_the_split_and_its_file_applies_it_again_into_the_users_graph(tmp_path):
    from rankfold.planner.pipeline import apply_and_check, compress_to_budget
    from rankfold.planner.plan import load_plan

    path = _exported(tmp_path)
    calib = torch.randn(160, 1, 8, 32)
    result = compress_to_budget(load_onnx(path), calib=calib, budgets={"params": "40%"}, check=False)
    assert list(result.plan.exact_rows) == [HEAD]
    planned = {layer.name for layer in result.plan.layers}
    assert {f"{HEAD}.rest", f"{HEAD}.read"} <= planned and HEAD not in planned
    rest = result.module.get_submodule(f"{HEAD}.rest")
    assert sum(p.numel() for p in rest.parameters()) < 48 * CLASSES / 2  # the rest is factorized deep
    result.plan.save(tmp_path / "plan.json")
    again = apply_and_check(load_onnx(path), load_plan(tmp_path / "plan.json"), calib=calib, min_agreement=0.0,
                            check=False)
    for mine, theirs in zip(result.module.state_dict().values(), again.module.state_dict().values()):
        assert torch.equal(mine, theirs)
    # written into the file's own graph: onnxruntime computes what the result computes
    out = tmp_path / "small.onnx"
    result.save(out)
    x = calib[:8]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, result.module(x).numpy(), rtol=1e-4, atol=1e-6)


def test_a_plan_file_with_bad_exact_rows_is_refused(tmp_path):
    import json

    from rankfold.errors import RankfoldError
    from rankfold.planner.pipeline import compress_to_budget
    from rankfold.planner.plan import apply_plan, load_plan

    path = _exported(tmp_path)
    calib = torch.randn(96, 1, 8, 32)
    plan = compress_to_budget(load_onnx(path), calib=calib, budgets={"params": "60%"}, check=False).plan
    raw = plan.to_dict()
    for bad, said in (([], "must be a list of row indices"), ([1.5], "must be a list of row indices"),
                      ([-1], "must be a list of row indices")):
        raw["exact_rows"] = {HEAD: bad}
        (tmp_path / "bad.json").write_text(json.dumps(raw))
        with pytest.raises(RankfoldError, match=said):
            load_plan(tmp_path / "bad.json")
    raw["exact_rows"] = {HEAD: [CLASSES]}
    (tmp_path / "far.json").write_text(json.dumps(raw))
    with pytest.raises(RankfoldError, match=f"row indices below {CLASSES}"):
        apply_plan(load_onnx(path), load_plan(tmp_path / "far.json"), calib=calib)
    raw["exact_rows"] = {"nothing": [0]}
    (tmp_path / "gone.json").write_text(json.dumps(raw))
    with pytest.raises(RankfoldError, match="no Linear 'nothing'"):
        apply_plan(load_onnx(path), load_plan(tmp_path / "gone.json"), calib=calib)
