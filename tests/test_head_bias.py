"""The softmax heads' biases refit to the original's output distribution after apply
(rankfold.head_bias): the shift that minimizes the KL, into the bias that computes the read
classes, for a plain head and a split one (ExactRows)."""

import copy

import torch
from torch import nn

from rankfold import head_bias
from rankfold.apply import compress_with_report
from rankfold.frontends.onnx import load_onnx
from rankfold.head_bias import FitTerms, fit_shift, refit_head_biases, softmax_heads
from rankfold.layers import ExactRows

CLASSES = 40


def _kl(original: torch.Tensor, compressed: torch.Tensor) -> float:
    p = torch.softmax(original.double(), -1)
    return float((p * (torch.log_softmax(original.double(), -1) - torch.log_softmax(compressed.double(), -1)))
                 .sum(-1).mean())


def test_the_fitted_shift_undoes_a_shift_of_the_read_logits_and_its_kl_is_the_kl():
    torch.manual_seed(0)
    original = 3 * torch.randn(2000, CLASSES, dtype=torch.float64)
    read = torch.tensor([1, 5, 7, 20])
    moved = torch.tensor([0.8, -1.2, 0.5, 2.0], dtype=torch.float64)
    compressed = original.clone()
    compressed[:, read] += moved
    terms = FitTerms.gathered([(original[:1000], compressed[:1000]), (original[1000:], compressed[1000:])], read)
    assert abs(float(terms.kl(torch.zeros(4, dtype=torch.float64))) - _kl(original, compressed)) < 1e-9
    shift, before, after = fit_shift(terms)
    assert before > 0.05 and after < 1e-8
    assert torch.allclose(shift, -moved, atol=1e-3)


def test_a_shift_that_cannot_lower_the_kl_is_zero():
    original = torch.randn(500, CLASSES, dtype=torch.float64)
    shift, before, after = fit_shift(FitTerms.of(original, original.clone(), torch.arange(6)))
    assert before == after and not shift.any()


class _Recogniser(nn.Module):
    """Frames (N, T, 16) -> (N, T, CLASSES) probabilities through a hidden Linear and a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.mix = nn.Linear(16, 32)
        self.head = nn.Linear(32, CLASSES)
        with torch.no_grad():
            self.head.weight.mul_(4.0)

    def forward(self, x):
        return torch.softmax(self.head(torch.relu(self.mix(x))), -1)


def test_the_head_of_a_softmax_output_is_found_and_no_other_layer():
    model = _Recogniser().eval()
    assert softmax_heads(model, torch.randn(2, 5, 16)) == {"head": False}
    model.forward = lambda x: model.head(torch.relu(model.mix(x)))  # logits out, not CTC frames
    assert softmax_heads(model, torch.randn(2, 5, 16)) == {}


def test_a_plain_head_and_a_split_head_get_their_logits_back_through_the_bias():
    reference = _Recogniser().eval()
    calib = torch.randn(64, 20, 16)
    for split in (False, True):
        result = copy.deepcopy(reference)
        if split:  # the first 30 classes as ExactRows' read part, its rows in another order
            rows = torch.arange(30).flip(0)
            rest, read = copy.deepcopy(reference.head), nn.Linear(32, 30)
            with torch.no_grad():
                read.weight.copy_(reference.head.weight[rows])
                read.bias.copy_(reference.head.bias[rows] + torch.linspace(-1, 1, 30))  # the damage
                rest.weight[rows] = 0.0
                rest.bias[rows] = 0.0
            result.head = ExactRows(rest, read, rows)
            reference_split = copy.deepcopy(result)
            with torch.no_grad():
                reference_split.head.read.bias.copy_(reference.head.bias[rows])
        else:
            with torch.no_grad():
                result.head.bias[:10] += 1.5
            reference_split = reference
        with torch.no_grad():
            damaged = _kl(reference(calib).log(), result(calib).clamp_min(1e-30).log())
        shifts = refit_head_biases(reference_split, result, calib)
        assert torch.is_grad_enabled()  # no pass left gradients off behind it
        with torch.no_grad():
            repaired = _kl(reference(calib).log(), result(calib).clamp_min(1e-30).log())
        assert [s.name for s in shifts] == ["head"], split
        assert damaged > 0.01 and repaired < 1e-3 * damaged, (split, damaged, repaired)
        assert abs(shifts[0].kl_after - repaired) < 1e-4


def test_apply_refits_the_head_after_the_layers_before_it_changed_and_says_so():
    model = _Recogniser().eval()
    calib = torch.randn(256, 20, 16)
    compressed, report = compress_with_report(model, method="svd", keep=0.3, calib=calib, min_rank=1)
    notes = {r.name: r.note for r in report.layers}
    assert "refit to the original's distribution" in notes["head"]
    assert "refit to the original's distribution" not in notes["mix"]
    assert not torch.equal(compressed.head[-1].bias, model.head.bias)


def test_on_an_onnx_graph_the_refit_reads_the_heads_inputs_from_applys_cursors_with_the_same_shift(
        tmp_path, monkeypatch):
    path = tmp_path / "recogniser.onnx"
    torch.onnx.export(_Recogniser().eval(), (torch.randn(2, 20, 16),), str(path), dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "n"}})
    calib = torch.randn(256, 20, 16)

    def refit_note(**patches):
        for name, value in patches.items():
            monkeypatch.setattr(head_bias, name, value)
        compressed, report = compress_with_report(load_onnx(path), method="svd", keep=0.3, calib=calib,
                                                  min_rank=1)
        monkeypatch.undo()
        head = next(r for r in report.layers if "refit to the original's distribution" in r.note)
        return head.name, head.note, compressed

    def no_network_pass(*_args):
        raise AssertionError("the refit ran the whole network")

    name, from_cursors, compressed = refit_note(_head_logits=no_network_pass)
    same_name, from_passes, _ = refit_note(_logit_streams=lambda *a: real_streams(*a[:4], None))
    assert (name, from_cursors) == (same_name, from_passes)
    assert not torch.equal(compressed.get_submodule(name)[-1].bias,
                           load_onnx(path).get_submodule(name).bias)


real_streams = head_bias._logit_streams
