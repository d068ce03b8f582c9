"""The output metric of layers whose softmax is a model output (rankfold/output_metric.py)."""

import torch
from torch import nn

from rankfold.apply import compress_with_report
from rankfold.config import SkipConfig, SVDConfig
from rankfold.decompose import sqrt_psd
from rankfold.methods import method_named
from rankfold.output_metric import factorize_weighted, softmax_head_metrics
from rankfold.planner.sensitivity import layer_statistics

CLASSES, ACTIVE = 200, 8


def _network(softmax: bool = True) -> nn.Module:
    torch.manual_seed(0)
    head = nn.Linear(24, CLASSES)
    with torch.no_grad():
        head.bias.zero_()
        head.bias[:ACTIVE] = 10.0  # the data only ever predicts the first ACTIVE classes
    layers = [nn.Linear(12, 24), nn.Tanh(), head]
    return nn.Sequential(*layers, nn.Softmax(-1)) if softmax else nn.Sequential(*layers)


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    p, q = p.double(), q.double()
    return float((p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log())).sum(-1).mean())


def test_the_softmax_head_is_found_and_only_it():
    model, calib = _network(), torch.randn(256, 12)
    metrics = softmax_head_metrics(model, ["0", "2"], calib)
    assert set(metrics) == {"2"}
    metric = metrics["2"]
    assert 1 <= len(metric.active) < CLASSES // 4  # a few classes carry the probability
    w = model[2].weight
    assert torch.allclose(metric.unweigh(metric.weigh(w)), w.double(), atol=1e-8)


def test_logit_outputs_have_no_metric_so_nothing_changes():
    assert softmax_head_metrics(_network(softmax=False), ["0", "2"], torch.randn(64, 12)) == {}


class _SequenceFirstLogits(nn.Module):
    """(N, 12) -> (4 frames, N, CLASSES) logits, no softmax: a CNN+LSTM recogniser's layout."""

    def __init__(self, decisive: bool = True):
        super().__init__()
        self.body, self.head = _network(softmax=False)[:2], _network(softmax=False)[2]
        with torch.no_grad():  # decisive: one of the active classes stands out at each frame, mostly 0
            if decisive:
                self.head.weight.mul_(10.0)
                self.head.bias[0] += 8.0
            else:
                self.head.bias.zero_()

    def forward(self, x):
        return self.head(self.body(x).unsqueeze(0).expand(4, -1, -1))


def test_a_sequence_of_ctc_logits_has_a_metric_and_one_deciding_nothing_has_none():
    calib = torch.randn(64, 12, generator=torch.Generator().manual_seed(1))
    metric = softmax_head_metrics(_SequenceFirstLogits(), ["head"], calib)["head"]
    assert 1 <= len(metric.active) < CLASSES // 4
    assert softmax_head_metrics(_SequenceFirstLogits(decisive=False), ["head"], calib) == {}


def test_factorizing_under_the_metric_keeps_the_prediction_closer():
    model, calib, fresh = _network(), torch.randn(512, 12), torch.randn(512, 12)
    head = model[2]
    with torch.no_grad():
        x = torch.tanh(model[0](calib)).double()
    input_sqrt = sqrt_psd(x.T @ x / len(x))
    metric = softmax_head_metrics(model, ["2"], calib)["2"]
    svd = method_named("svd")
    with torch.no_grad():
        reference = model(fresh)
        kls = {}
        for label, used in (("plain", None), ("metric", metric)):
            built = factorize_weighted(svd, head, (4,), input_sqrt, svd.config([4]), used)
            variant = nn.Sequential(model[0], model[1], built.module, model[3])
            kls[label] = _kl(reference, variant(fresh))
            # approx_weight is the product of the factors, in the original weight's space
            product = built.module[1].weight.double() @ built.module[0].weight.double()
            assert torch.allclose(product, built.approx_weight.double(), atol=1e-4)
    assert kls["metric"] < 0.5 * kls["plain"], kls


def test_the_apply_uses_the_metric_and_says_so():
    model, calib = _network(), torch.randn(256, 12)
    _out, report = compress_with_report(model, calib=calib, layers={"2": SVDConfig(rank=4), "*": SkipConfig()})
    record = next(r for r in report.layers if r.name == "2")
    assert record.method == "svd" and "softmax output" in record.note


def test_softmax_probabilities_have_the_fisher_of_their_logits():
    """A classifier that ends in a softmax is the same categorical as its logits: the same
    sensitivities (they used to be read as logits themselves)."""
    logits, probs, calib = _network(softmax=False), _network(), torch.randn(128, 12)
    a = layer_statistics(logits, ["0", "2"], calib)
    b = layer_statistics(probs, ["0", "2"], calib)
    for name in ("0", "2"):
        assert torch.allclose(a[name].sensitivity, b[name].sensitivity, rtol=1e-4, atol=1e-9)
    assert b["2"].output_metric is not None and a["2"].output_metric is None
