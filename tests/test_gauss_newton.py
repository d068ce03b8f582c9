"""The Gauss-Newton output metric of every layer (rankfold/gauss_newton.py): the factorization
spends its rank on the output directions the network's outputs read."""

import copy

import torch
from torch import nn

from rankfold.apply import compress_with_report
from rankfold.config import SkipConfig, SVDConfig
from rankfold.decompose import sqrt_psd
from rankfold.gauss_newton import METRIC_BYTES, dense_metric, metric_layers, output_metrics

READ = 8  # hidden channels the last layer reads


def _network() -> nn.Module:
    """16 -> 32 -> 4, the last layer reading only the first READ hidden channels, which are the
    quietest: an input-weighted rank-READ truncation keeps the loud, unread ones."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 4))
    with torch.no_grad():
        model[0].weight[READ:] *= 10.0
        model[1].weight[:, READ:] = 0.0
    return model


def _relative_error(model: nn.Module, small: nn.Module, x: torch.Tensor) -> float:
    """Of the logits less their mean: a shift of every logit changes no prediction (the metric
    of a classifier's output ignores it)."""
    with torch.no_grad():
        a, b = model(x), small(x)
        a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
        return float((b - a).norm() / a.norm())


def test_factorization_under_the_metric_keeps_what_the_output_reads():
    model, calib, fresh = _network(), torch.randn(512, 16), torch.randn(256, 16)
    small, _report = compress_with_report(model, calib=calib, min_rank=1,
                                          layers={"0": SVDConfig(rank=READ), "1": SkipConfig("kept")})
    assert _relative_error(model, small, fresh) < 0.1
    # The input-weighted truncation alone, at the same rank, loses most of the output.
    w = model[0].weight.detach().double()
    root = sqrt_psd(calib.double().T @ calib.double() / len(calib))
    u, s, vh = torch.linalg.svd(w @ root)
    plain = nn.Sequential(nn.Linear(16, 32), model[1])
    with torch.no_grad():
        plain[0].weight.copy_((u[:, :READ] * s[:READ]) @ vh[:READ] @ torch.linalg.pinv(root))
        plain[0].bias.copy_(model[0].bias)
    assert _relative_error(model, plain, fresh) > 0.3


def test_metrics_only_where_a_gradient_reaches_and_the_layer_is_narrow_enough():
    torch.manual_seed(0)
    wide = 1 + int((METRIC_BYTES / 8) ** 0.5)  # one G of this width alone is over the budget
    model = nn.Sequential(nn.Linear(8, wide), nn.ReLU(), nn.Linear(wide, 3))
    metrics = output_metrics(model, ["0", "2"], torch.randn(64, 8))
    assert set(metrics) == {"2"}
    assert dense_metric(torch.zeros(3, 3)) is None


def test_metric_layers_take_whole_widths_narrowest_first():
    layers = {"a": nn.Linear(4, 30), "b": nn.Linear(4, 10), "c": nn.Linear(4, 30), "d": nn.Conv2d(3, 20, 3),
              "e": nn.Conv2d(4, 4, 3, groups=4)}
    names = list(layers)
    assert metric_layers(layers, names, budget=10**9) == ["a", "b", "c", "d"]
    both = (10 * 10 + 20 * 20) * 8
    assert metric_layers(layers, names, budget=both) == ["b", "d"]
    assert metric_layers(layers, names, budget=both + 30 * 30 * 8) == ["b", "d"]  # never one of a width's two
    assert metric_layers(layers, names, budget=both + 2 * 30 * 30 * 8) == ["a", "b", "c", "d"]


def test_metrics_are_deterministic_and_invert():
    model, calib = _network(), torch.randn(128, 16)
    first, second = output_metrics(model, ["0", "1"], calib), output_metrics(model, ["0", "1"], calib)
    assert set(first) == {"0", "1"} and len(first) == 2
    assert torch.equal(first["0"].root, second["0"].root)
    w = model[0].weight
    assert torch.allclose(first["0"].unweigh(first["0"].weigh(w)), w.double(), atol=1e-6)


class _MaxPooled(nn.Module):
    """A convolution read through a global max pool, as Magika's is: the gradient reaches only each
    channel's largest position, which the metric takes as independent of the inputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv, self.head = nn.Conv2d(32, 128, (5, 1)), nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head(torch.amax(nn.functional.gelu(self.conv(x)), dim=(2, 3))), -1)


def test_the_metric_is_kept_only_where_the_network_measures_it_closer(monkeypatch):
    """Each layer under a Gauss-Newton metric is factorized both ways and the one whose network
    outputs stay closer to the original's on the judged calibration samples is kept, and named."""
    import rankfold.apply as apply_module
    from rankfold.config import Tucker2Config
    from rankfold.gauss_newton import OutputMetrics
    from rankfold.metric_judge import JUDGE_SAMPLES, relative_output_error

    model, calib = _MaxPooled().eval(), torch.randn(256, 32, 64, 1)
    layers = {"conv": Tucker2Config(ranks=[8, 16]), "head": SkipConfig("kept")}

    def judged_error(small: nn.Module) -> float:
        with torch.no_grad():
            return relative_output_error([[small(calib[:JUDGE_SAMPLES])]], [[model(calib[:JUDGE_SAMPLES])]])

    judged, report = compress_with_report(model, calib=calib, layers=layers)
    monkeypatch.setattr(apply_module, "judge_samples", lambda *_a: 0)
    weighted, weighted_report = compress_with_report(model, calib=calib, layers=layers)
    monkeypatch.setattr(apply_module, "output_metrics", lambda *_a, **_k: OutputMetrics({}, {}))
    plain, _ = compress_with_report(model, calib=calib, layers=layers)
    errors = judged_error(weighted), judged_error(plain)
    assert errors[0] != errors[1] and judged_error(judged) == min(errors)
    note = report.layers[0].note
    assert ("without its Gauss-Newton output metric" in note) == (errors[1] < errors[0])
    assert "Gauss-Newton" in weighted_report.layers[0].note


class _Skipped(nn.Module):
    """Three convolutions and a skip connection around the middle one: the values held between
    steps include the skip, which a comparison from the middle layer on must read."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.c(torch.relu(self.b(h)) + h).mean((2, 3)), h.amax((2, 3))


def test_the_judge_runs_an_onnx_graph_from_the_swapped_layer_on_and_measures_what_whole_passes_do(tmp_path):
    """On an ONNX graph the judge's comparisons run only the steps from the swapped layer on, from
    values a cursor holds; the errors equal whole passes', layers replaced before included."""
    from rankfold.analyze import set_submodule
    from rankfold.frontends.onnx import load_onnx
    from rankfold.metric_judge import NetworkJudge

    torch.manual_seed(0)
    path = tmp_path / "skipped.onnx"
    torch.onnx.export(_Skipped().eval(), (torch.randn(2, 3, 8, 8),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], dynamic_axes={"x": {0: "n"}})
    reference, model = load_onnx(path), load_onnx(path)
    samples = torch.randn(12, 3, 8, 8)
    from_layers, whole = NetworkJudge(reference, samples, model), NetworkJudge(reference, samples)
    assert from_layers.cursor is not None and whole.cursor is None
    layers = [step.module for step in model.steps if step.module is not None]
    assert len(layers) == 3
    runs = []
    model.register_forward_pre_hook(lambda *_a: runs.append(1))  # a whole pass calls forward
    for name in layers:
        noisy = copy.deepcopy(model.get_submodule(name))
        with torch.no_grad():
            noisy.weight.add_(0.1 * torch.randn_like(noisy.weight))
        got = from_layers.error_with(model, name, noisy)
        assert not runs and from_layers.cursor.at == from_layers.cursor.step_of(name)
        expected = whole.error_with(model, name, noisy)
        assert expected > 1e-4 and abs(got - expected) <= 1e-5 * expected
        runs.clear()
        set_submodule(model, name, noisy)  # as the apply replaces it, before the next layer is judged
