"""The self-check covers every output of the model, refuses outputs that are not class scores when
they drift, and a check that cannot run is an error unless the user says --no-check (issue 20, case 6)."""


import numpy as np
import pytest
import torch
from torch import nn

import rankfold
from rankfold.apply import compress_with_report
from rankfold.errors import RankfoldError
from rankfold.selfcheck import agreement, refuse_if_poor
from tests.helpers import run_cli, tiny_classifier


class TwoHeads(nn.Module):
    def __init__(self, second_scale: float = 1.0):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(8, 16)
        self.classes = nn.Linear(16, 5)
        self.dense = nn.Linear(16, 12)
        self.second_scale = second_scale

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.classes(h), self.dense(h) * self.second_scale


def test_a_wrecked_second_output_is_found():
    x = torch.randn(64, 8)
    check = agreement(TwoHeads(), TwoHeads(second_scale=-1.0), x)
    assert len(check.outputs) == 2
    assert check.outputs[0].top1_agreement == 1.0 and check.outputs[0].rel_output_error == 0.0
    assert check.outputs[1].top1_agreement is not None  # (N, 12) counts as class scores
    assert check.top1_agreement < 0.8  # the summary is the worst output's
    with pytest.raises(RankfoldError, match="output 1"):
        refuse_if_poor(check, 0.8)


class DenseMap(nn.Module):
    def __init__(self, noise: float = 0.0):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.noise = noise

    def forward(self, x):
        y = self.conv(x)
        return y + self.noise * torch.sin(37.0 * y)


def test_a_dense_output_is_refused_beyond_the_error_limit():
    x = torch.randn(32, 3, 8, 8)
    good = agreement(DenseMap(), DenseMap(noise=0.01), x)
    assert good.top1_agreement is None and good.rel_output_error < 0.05
    refuse_if_poor(good, 0.8, 0.2)
    bad = agreement(DenseMap(), DenseMap(noise=1.0), x)
    assert bad.rel_output_error > 0.2
    with pytest.raises(RankfoldError, match="--max-output-error"):
        refuse_if_poor(bad, 0.8, 0.2)
    refuse_if_poor(bad, 0.8, 10.0)  # the user's own limit


def test_non_finite_outputs_always_fail():
    x = torch.randn(16, 3, 8, 8)
    check = agreement(DenseMap(), DenseMap(noise=float("nan")), x)
    with pytest.raises(RankfoldError):
        refuse_if_poor(check, 0.0, 1e9)


class MaskedScores(nn.Module):
    """A dense output that holds -inf by design where a mask drops a position (masked attention scores)."""

    def __init__(self, noise: float = 0.0, leak: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.noise, self.leak = noise, leak

    def forward(self, x):
        y = self.conv(x) + self.noise * torch.sin(37.0 * x[:, :1])
        dropped = (x[:, :1] > 1.0).expand_as(y)
        if self.leak:  # a position the original keeps, lost
            dropped = dropped | (x[:, :1] < -1.5).expand_as(y)
        return y.masked_fill(dropped, float("-inf"))


def test_an_output_with_infinities_by_design_is_judged_where_both_are_finite():
    """The same -inf in both outputs agrees (it was refused as "not finite" at any size); a small
    change elsewhere is measured as usual; an infinity the original does not have fails."""
    x = torch.randn(16, 3, 8, 8)
    same = agreement(MaskedScores(), MaskedScores(), x)
    assert same.rel_output_error == 0.0
    close = agreement(MaskedScores(), MaskedScores(noise=0.01), x)
    assert 0 < close.rel_output_error < 0.05
    refuse_if_poor(close, 0.0, 0.2)
    leaked = agreement(MaskedScores(), MaskedScores(leak=True), x)
    with pytest.raises(RankfoldError):
        refuse_if_poor(leaked, 0.0, 1e9)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("check")
    model = tiny_classifier()
    x = np.random.default_rng(0).standard_normal((32, 1, 12, 12)).astype(np.float32)
    rankfold.export_onnx(model, root / "m.onnx", example_input=torch.from_numpy(x[:1]))
    np.savez(root / "few.npz", x=x)  # 32 samples: too few to hold 16 back from planning
    return root


def test_a_planned_check_that_cannot_run_is_an_error_unless_no_check(model_dir, tmp_path):
    args = ["compress", model_dir / "m.onnx", "--calib", model_dir / "few.npz", "--max-params", "60%",
            "--min-rank", "2", "-q"]
    code, _out, err = run_cli(*args, "-o", tmp_path / "a.onnx", cwd=tmp_path)
    assert code == 2 and "at least 64" in err and "--no-check" in err and "Traceback" not in err
    assert not (tmp_path / "a.onnx").exists()
    code, out, err = run_cli(*args, "-o", tmp_path / "b.onnx", "--no-check", cwd=tmp_path)
    assert code == 0, err
    assert "self-check: not run (--no-check)" in out  # said on stdout, even with -q
    assert (tmp_path / "b.onnx").is_file()


def test_uniform_mode_is_checked_and_data_free_needs_no_check(model_dir, tmp_path):
    code, out, err = run_cli("compress", model_dir / "m.onnx", "--calib", model_dir / "few.npz", "--keep", "0.5",
                             "--min-rank", "2", "-q", "-o", tmp_path / "u.onnx", cwd=tmp_path)
    assert code == 0, err
    assert "self-check: top-1 agreement" in out and "calibration samples" in out
    code, _out, err = run_cli("compress", model_dir / "m.onnx", "--keep", "0.5", "--min-rank", "2", "-q", "-o",
                              tmp_path / "free.onnx", cwd=tmp_path)
    assert code == 2 and "--no-check" in err and not (tmp_path / "free.onnx").exists()
    code, out, err = run_cli("compress", model_dir / "m.onnx", "--keep", "0.5", "--min-rank", "2", "-q", "-o",
                             tmp_path / "free.onnx", "--no-check", cwd=tmp_path)
    assert code == 0 and "not run (--no-check)" in out, err


def test_uniform_mode_refuses_a_wrecked_result(model_dir, tmp_path):
    code, _out, err = run_cli("compress", model_dir / "m.onnx", "--calib", model_dir / "few.npz", "--keep", "0.02",
                              "--min-rank", "1", "--min-agreement", "1", "-q", "-o", tmp_path / "w.onnx", cwd=tmp_path)
    assert code == 2 and "self-check failed" in err, err
    assert not (tmp_path / "w.onnx").exists()


class Branches(nn.Module):
    """A shared stem and two heads; the second head's layers feed only the second output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.a_conv, self.a_fc = nn.Conv2d(16, 32, 3, padding=1), nn.Linear(32, 10)
        self.b_conv, self.b_fc = nn.Conv2d(16, 32, 3, padding=1), nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        a = torch.relu(self.a_conv(h)).mean((2, 3))
        b = torch.relu(self.b_conv(h)).mean((2, 3))
        return self.a_fc(a), self.b_fc(b)


def test_the_planner_prices_layers_that_feed_only_the_second_output():
    from rankfold.planner.sensitivity import layer_statistics

    model = Branches().eval()
    calib = torch.randn(64, 1, 8, 8)
    stats = layer_statistics(model, ["a_conv", "b_conv", "b_fc"], calib)
    for name in ("b_conv", "b_fc"):
        assert float(stats[name].sensitivity.sum()) > 0, name  # was 0: only the first output was read
    ratio = float(stats["b_conv"].sensitivity.sum() / stats["a_conv"].sensitivity.sum())
    assert 0.01 < ratio < 100  # the heads are symmetric: comparable sensitivities


def test_a_planned_two_headed_model_is_checked_on_both_heads():
    model = Branches().eval()
    calib = torch.randn(128, 1, 8, 8)
    out = rankfold.compress(model, calib=calib, max_params="40%", min_rank=2, min_agreement=0.0)
    assert len(out.rankfold_check.outputs) == 2
    layers = {layer.name: layer for layer in out.rankfold_plan.layers}
    assert layers["b_conv"].method == "none" or layers["b_conv"].est_loss > 0


@pytest.mark.parametrize("mode", ["planned", "uniform"])
def test_the_input_module_is_never_modified(mode):
    """State, buffers (BatchNorm running statistics) and train/eval mode stay as the caller left them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = torch.randn(128, 1, 8, 8) * 3 + 1
    if mode == "planned":
        rankfold.compress(model, calib=calib, max_params="60%", min_rank=2, min_agreement=0.0)
    else:
        rankfold.compress(model, calib=calib, method="svd", keep=0.5, min_rank=2)
    assert model.training
    after = model.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.ff = nn.Linear(32, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h, _ = self.attn(x, x, x)
        return self.head(torch.relu(self.ff(h)).mean(1))


def test_a_layer_read_through_weight_by_its_parent_is_left_alone_with_the_reason():
    model = Attention().eval()
    x = torch.randn(64, 6, 32)
    for kwargs in ({"method": "svd", "keep": 0.3, "min_rank": 2}, {"max_params": "95%", "min_rank": 2,
                                                                   "min_agreement": 0.0}):
        small = rankfold.compress(model, calib=x, **kwargs)
        assert small(x).shape == (64, 10)  # it runs: out_proj was not replaced
        assert isinstance(small.attn.out_proj, nn.Linear)
    uniform = rankfold.compress(model, calib=x, method="svd", keep=0.3, min_rank=2)
    record = next(r for r in uniform.rankfold_report.layers if r.name == "attn.out_proj")
    assert "MultiheadAttention" in (record.note or "")


def test_export_c_runs_a_model_with_two_outputs_and_run_c_checks_both(tmp_path):
    import json
    import shutil

    if shutil.which("cc") is None:
        pytest.skip("no host C compiler")
    model = TwoHeads().eval()
    x = torch.randn(64, 8)
    rankfold.export_onnx(model, tmp_path / "two.onnx", example_input=x[:1])
    np.savez(tmp_path / "c.npz", x=x.numpy())
    code, _out, err = run_cli("export-c", tmp_path / "two.onnx", "-o", tmp_path / "c", "--calib", tmp_path / "c.npz",
                              cwd=tmp_path)
    assert code == 0, err
    assert "#define MODEL_OUTPUTS 2" in (tmp_path / "c" / "model.h").read_text()
    code, out, err = run_cli("run-c", tmp_path / "c", "--data", tmp_path / "c.npz", "--json", cwd=tmp_path)
    assert code == 0, err
    result = json.loads(out)
    assert result["outputs"] == 2 and result["golden_mismatches"] == 0 and result["accuracy"] is None
    assert result["onnx_max_unit_difference"] <= 3  # both heads, in their own units


def test_layers_rankfold_does_not_factorize_are_listed_with_the_reason():
    class WithUnhandled(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(1, 8, 2, stride=2)
            self.conv = nn.Conv2d(8, 16, 3)
            self.lstm = nn.LSTM(16, 16, batch_first=True)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            y, _ = self.lstm(self.conv(self.up(x)).mean((2, 3)).unsqueeze(1))
            return self.fc(y[:, 0])

    torch.manual_seed(0)
    _module, report = compress_with_report(WithUnhandled(), method="svd", keep=0.5, calib=torch.randn(20, 1, 6, 6),
                                           min_rank=2)
    listed = {r.name: r for r in report.layers}
    assert set(listed) == {"up", "conv", "lstm", "fc"}
    for name, kind in (("up", "ConvTranspose2d"), ("lstm", "LSTM")):
        assert listed[name].method == "none" and kind in listed[name].note
        assert listed[name].params_before == listed[name].params_after > 0


def test_the_api_refuses_a_planned_check_that_cannot_run_unless_check_is_false():
    model, calib = Branches().eval(), torch.randn(40, 1, 8, 8)
    with pytest.raises(RankfoldError, match="check=False"):
        rankfold.compress(model, calib=calib, max_params="60%", min_rank=2)
    out = rankfold.compress(model, calib=calib, max_params="60%", min_rank=2, check=False)
    assert out.rankfold_check is None


def test_the_api_refuses_uniform_settings_in_planned_mode_as_the_cli_does():
    model, calib = Branches().eval(), torch.randn(96, 1, 8, 8)
    for extra in ({"method": "svd"}, {"keep": 0.3}, {"layers": {"*": rankfold.SVDConfig(rank=2)}}):
        with pytest.raises(RankfoldError, match="one or the other"):
            rankfold.compress(model, calib=calib, max_params="60%", min_rank=2, **extra)


def test_the_interval_of_a_fraction_narrows_with_the_samples():
    from rankfold.selfcheck import proportion_interval

    low, high = proportion_interval(0.5, 100)
    assert abs(low - 0.4038) < 1e-3 and abs(high - 0.5962) < 1e-3  # Wilson's, z = 1.96
    low, high = proportion_interval(11 / 32, 32)
    assert 0.19 < low < 0.21 and 0.51 < high < 0.53
    assert proportion_interval(1.0, 32)[1] == 1.0 and proportion_interval(1.0, 32)[0] > 0.89
    wide, narrow = proportion_interval(0.9, 32), proportion_interval(0.9, 1000)
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 4


def test_a_refused_relative_error_is_shown_with_the_digits_that_tell_it_from_the_limit():
    from rankfold.selfcheck import _apart

    assert _apart(0.2004, 0.2) == "0.2004"  # Silero VAD v4's state read "0.2 away ... at most 0.2"
    assert _apart(0.239, 0.2) == "0.239" and _apart(1.0, 0.2) == "1"


class _LoudChannels(nn.Module):
    """Two hidden channels 300x louder than the rest, read with 300x smaller weights: one int8 scale
    for the whole activation tensor rounds the quiet channels, which carry the answer, to nothing."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2, self.l3 = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 10)
        loud = torch.ones(64)
        loud[:2] = 300.0
        self.register_buffer("loud", loud)
        with torch.no_grad():
            self.l2.weight[:, :2] /= 300.0

    def forward(self, x):
        return self.l3(torch.relu(self.l2(torch.relu(self.l1(x)) * self.loud)))


def test_int8_activations_the_check_refuses_are_written_again_weight_only(tmp_path):
    """The same quantized weights with float activations (the same weight bytes) are written where
    int8 activations fail the self-check and nothing was planned on them; with a latency budget
    (planned on int8 kernels) the result is refused instead."""
    import warnings

    x = torch.randn(256, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_LoudChannels().eval(), (x[:2],), str(tmp_path / "m.onnx"), input_names=["x"],
                          dynamic_axes={"x": {0: "n"}}, dynamo=False)
    np.savez(tmp_path / "calib.npz", x=x.numpy())
    args = ["compress", tmp_path / "m.onnx", "--calib", tmp_path / "calib.npz", "--max-weight-bytes", "30%"]
    code, stdout, stderr = run_cli(*args, "-o", tmp_path / "o.onnx")
    assert code == 0, stderr
    assert "written again weight-only" in stderr
    assert stderr.count("quantizing weights") == 1  # rounded once: both forms hold the same weights
    import onnx

    graph = onnx.load(str(tmp_path / "o.onnx")).graph
    assert not any(n.op_type == "QuantizeLinear" for n in graph.node)  # float activations
    assert any(i.data_type == onnx.TensorProto.INT8 for i in graph.initializer)  # quantized weights (codes)
    code, _stdout, stderr = run_cli(*args, "--max-latency", "200%", "-o", tmp_path / "timed.onnx")
    assert code == 2 and "written again weight-only" not in stderr and not (tmp_path / "timed.onnx").exists()


class _FaceAndClasses(nn.Module):
    """Per-position scores of 5 characters (a recogniser's CTC logits, a Linear's output as it
    is) and an unnormalized 32-d vector (a face embedding, read as class scores by the data)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.face, self.classes = nn.Linear(8, 16), nn.Linear(16, 32), nn.Linear(16, 5)
        with torch.no_grad():  # decisive frames, most of them the blank (class 0), as CTC's are
            self.classes.weight.mul_(8)
            self.classes.bias.copy_(torch.tensor([6.0, 0, 0, 0, 0]))

    def forward(self, x):
        hidden = torch.relu(self.body(x))
        return self.classes(hidden), self.face(hidden.mean(1))


def test_the_api_declares_an_embedding_output_as_the_cli_does_and_the_others_stay_as_found():
    """rankfold.declare_embeddings (the CLI's --embedding): the face vector is checked by cosine; the
    sequence beside it is still found to be one (it was judged as a dense map once another output
    was declared); an output the model does not have is refused."""
    import copy

    import rankfold
    from rankfold.selfcheck import agreement

    torch.manual_seed(0)
    model, x = _FaceAndClasses().eval(), torch.randn(64, 6, 8)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.face.weight.mul_(1.1)
    assert [o.kind for o in agreement(model, changed, x).outputs] == ["sequence", "classes"]
    rankfold.declare_embeddings(model, [1])
    outputs = agreement(model, changed, x).outputs
    assert [o.kind for o in outputs] == ["sequence", "embedding"]
    assert outputs[1].metrics["cosine"] > 0.99  # a vector scaled by 1.1 points the same way
    with pytest.raises(RankfoldError, match="no such output"):
        rankfold.declare_embeddings(model, ["face"])


def test_an_accepted_check_says_how_sure_its_figure_is():
    """32 held-back samples accepted PP-LCNet at 84 % (27 of 32) where 68 % of fresh inputs agreed: the
    accepted line shows the interval too."""
    from rankfold.selfcheck import Agreement, OutputAgreement, proportion_interval

    classes = Agreement(32, 26 / 32, 0.1, [OutputAgreement(0, 26 / 32, 0.1, "classes", "y", {"top1": 26 / 32})])
    low, high = proportion_interval(26 / 32, 32)
    assert f"top-1 agreement 81.2% (95 % interval {low:.0%}-{high:.0%})" in classes.describe()
    frames = Agreement(32, 0.99, 0.1, [OutputAgreement(0, 0.99, 0.1, "sequence", "y",
                                                         {"top1": 0.99, "sequence": 0.75})])
    text = frames.describe()  # top-1 over positions has no per-sample interval; the lines have one
    assert "top-1 agreement 99.0%, " in text and "sequences read alike 75.0% (95 % interval" in text


class _CountingNet(nn.Module):
    """A small net that counts the samples it has run."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(6, 4)
        self.samples = 0

    def forward(self, x):
        self.samples += x.shape[0]
        return self.layer(x)


def test_the_original_runs_once_for_checks_on_the_same_samples():
    torch.manual_seed(0)
    original, calib = _CountingNet(), torch.randn(40, 6)
    candidate = nn.Sequential(nn.Linear(6, 4))

    def samples_run(inputs, batch_size):  # beyond the one sample that finds which outputs are logits
        before = original.samples
        check = agreement(original, candidate, inputs, batch_size=batch_size)
        return original.samples - before - 1, check

    run, first = samples_run(calib[24:], 8)
    assert run == 16
    # the same samples sliced anew (as each caller slices its held-back ones): the original's outputs are reused
    run, again = samples_run(calib[24:].clone(), 8)
    assert run == 0 and again.rel_output_error == first.rel_output_error
    assert samples_run(calib[24:], 4)[0] == 16  # other batches: computed again
    assert samples_run(calib[20:36], 4)[0] == 16  # other samples
    held = calib[20:36]
    assert samples_run(held, 4)[0] == 0
    held[0] += 1  # the samples changed in place: the original runs on them again
    assert samples_run(held, 4)[0] == 16
    with torch.no_grad():  # the original's weights changed in place: its outputs are computed again
        original.layer.weight.mul_(2)
    run, changed = samples_run(held, 4)
    assert run == 16 and changed.rel_output_error != first.rel_output_error


def test_outputs_too_large_to_keep_are_computed_again(monkeypatch):
    import rankfold.selfcheck as selfcheck

    monkeypatch.setattr(selfcheck, "REMEMBERED_BYTES", 8 * 4 * 4)  # two batches of 4 samples' 4 outputs
    original, candidate, calib = _CountingNet(), nn.Linear(6, 4), torch.randn(12, 6)
    for inputs, runs in ((calib[:8], (9, 1)), (calib, (13, 13))):  # the 12 samples' outputs take 192 bytes
        before = original.samples
        agreement(original, candidate, inputs, batch_size=4)
        between = original.samples
        agreement(original, candidate, inputs, batch_size=4)
        assert (between - before, original.samples - between) == runs
