"""Fine-tuning by distillation (issue 17): the student moves toward the teacher, a run resumed
from its checkpoint ends where an unbroken one does, two torchrun processes give one process's
weights, and the CLI checks the result before writing it."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import rankfold
from rankfold.errors import RankfoldError
from rankfold.training import FinetuneConfig, finetune
from rankfold.training.losses import distillation_loss
from tests.helpers import run_cli, tiny_classifier


def _inputs(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 1, 12, 12)).astype(np.float32))


def _teacher():
    """tiny_classifier trained briefly on a task its inputs decide (a fresh one says one class)."""
    teacher = tiny_classifier().train()
    x = _inputs(512, seed=7)
    y = (x.flatten(1) @ torch.randn(144, 10, generator=torch.Generator().manual_seed(7))).argmax(1)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(teacher(x), y).backward()
        optimizer.step()
    return teacher.eval()


@pytest.fixture(scope="module")
def pair():
    teacher = _teacher()
    student = rankfold.compress(teacher, method="svd", keep=0.3, min_rank=1)
    return teacher, student


def _weights(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_distillation_brings_the_student_toward_the_teacher(pair):
    teacher, student = pair
    before = _weights(student)
    config = FinetuneConfig(steps=60, batch_size=32, lr=3e-3, log_every=20)
    tuned, log = finetune(student, teacher, _inputs(512), config=config, held=_inputs(64, seed=1))
    held = _inputs(64, seed=1)
    with torch.no_grad():
        loss_of = {name: float(distillation_loss([m(held)], [teacher(held)], ["classes"], temperature=4.0))
                   for name, m in (("before", student), ("after", tuned))}
    assert loss_of["after"] < 0.75 * loss_of["before"], loss_of
    assert log.steps == 60 and log.samples_seen == 60 * 32 and [h["step"] for h in log.history] == [0, 20, 40, 60]
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())  # the input is left alone


def test_a_detector_head_pays_for_its_scores_as_much_as_for_its_boxes():
    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(4, 2, 50, generator=g) * 320  # pixels
    scores = torch.rand(4, 3, 50, generator=g) ** 8  # mostly near 0, a few peaks
    teacher = torch.cat([boxes, scores], 1)
    lost_scores = torch.cat([boxes, torch.zeros_like(scores)], 1)
    loss = float(distillation_loss([lost_scores], [teacher], ["dense"], temperature=4.0))
    pooled = float((lost_scores - teacher).pow(2).sum() / teacher.pow(2).sum())
    assert pooled < 1e-4 and loss == pytest.approx(0.5, rel=1e-5)  # the score group's whole error, halved
    assert float(distillation_loss([teacher.clone()], [teacher], ["dense"], temperature=4.0)) == 0.0
    probabilities = scores[:, :1]  # a map of scores alone (a text detector's): one relative error
    assert float(distillation_loss([torch.zeros_like(probabilities)], [probabilities], ["dense"],
                                   temperature=4.0)) == pytest.approx(1.0, rel=1e-5)


def test_a_resumed_run_ends_where_an_unbroken_one_does(pair, tmp_path):
    teacher, student = pair
    config = FinetuneConfig(steps=20, batch_size=16, lr=3e-3, log_every=10, checkpoint_every=5)
    whole, _ = finetune(student, teacher, _inputs(128), config=config)

    def crash(message: str) -> None:  # called at step 10, after the checkpoint of step 5
        raise KeyboardInterrupt(message)

    with pytest.raises(KeyboardInterrupt):
        finetune(student, teacher, _inputs(128), config=config, checkpoint_dir=str(tmp_path), progress=crash)
    lines = []
    resumed, log = finetune(student, teacher, _inputs(128), config=config, checkpoint_dir=str(tmp_path),
                            progress=lines.append)
    assert log.resumed_from == 5 and "resumed from" in lines[0] and "step 5 of 20" in lines[0]
    for key, value in _weights(whole).items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0)
    other = FinetuneConfig(steps=20, batch_size=16, lr=1e-3)  # another run's settings: refused, not mixed
    with pytest.raises(RankfoldError, match="belongs to another run"):
        finetune(student, teacher, _inputs(128), config=other, checkpoint_dir=str(tmp_path))


@pytest.mark.parametrize("field, value, message", [
    ("steps", 0, "steps must be a positive integer"), ("lr", float("nan"), "lr must be"),
    ("temperature", -1.0, "temperature must be"), ("optimizer", "rmsprop", "optimizer must be one of"),
    ("label_weight", 1.5, "label_weight must be"), ("batch_size", 2.5, "batch_size must be a positive integer"),
])
def test_the_config_refuses_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        FinetuneConfig(**{"steps": 10, field: value})
    with pytest.raises(ValueError, match="give steps or minutes"):
        FinetuneConfig()


class _Overflowing(torch.nn.Module):
    """A teacher whose outputs are not finite: the loss is NaN from the first step."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) * float("inf")


def test_a_diverging_run_stops_with_the_reason(pair):
    teacher, student = pair
    with pytest.raises(RankfoldError, match="diverged at step 1 .*lower the learning rate"):
        finetune(student, _Overflowing(teacher), _inputs(64), config=FinetuneConfig(steps=5, batch_size=16))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    x = _inputs(256).numpy()
    teacher = _teacher()
    rankfold.export_onnx(teacher, root / "m.onnx", example_input=torch.from_numpy(x[:1]))
    np.savez(root / "calib.npz", x=x[:128])
    with torch.no_grad():
        y = teacher(torch.from_numpy(x)).argmax(1).numpy()
    np.savez(root / "train.npz", x=x, y=y)
    student = rankfold.compress(teacher, method="svd", keep=0.6, min_rank=1)
    rankfold.export_onnx(student, root / "student.onnx", example_input=torch.from_numpy(x[:1]))
    return root


def _initializers(path) -> dict:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def test_the_cli_checks_the_tuned_result_and_writes_it(files, tmp_path):
    args = [files / "m.onnx", "--student", files / "student.onnx", "--calib", files / "calib.npz", "--train",
            files / "train.npz", "--steps", "80", "--batch-size", "32", "--lr", "3e-3", "--log-every", "40"]
    code, out, err = run_cli("finetune", *args, "--min-agreement", "0", "-o", tmp_path / "tuned.onnx", "--report",
                             tmp_path / "r.json")
    assert code == 0, err
    history = json.loads((tmp_path / "r.json").read_text())["finetune"]["history"]
    assert history[0]["step"] == 0 and history[-1]["step"] == 80
    assert history[-1]["held_agreement"] > history[0]["held_agreement"], history  # closer to the teacher than before
    assert history[0]["held_measure"] == "top-1 agreement"
    assert "before fine-tuning: held-back top-1 agreement" in err and "step 80/80" in err
    assert "self-check: top-1 agreement" in out and "fine-tuned 80 steps" in out
    assert (tmp_path / "tuned.onnx").exists() and (tmp_path / "r.json").exists()
    code, out, err = run_cli("finetune", *args, "--check", "relerr:0", "-o", tmp_path / "refused.onnx")
    assert code == 2 and "self-check failed" in err and "Traceback" not in err
    assert not (tmp_path / "refused.onnx").exists()


def test_the_cli_resumes_from_its_checkpoint(files, tmp_path):
    args = [files / "m.onnx", "--student", files / "student.onnx", "--calib", files / "calib.npz", "--train",
            files / "train.npz", "--steps", "10", "--batch-size", "32", "--checkpoint", tmp_path / "ck",
            "--checkpoint-every", "5", "--min-agreement", "0"]
    assert run_cli("finetune", *args, "-o", tmp_path / "a.onnx")[0] == 0
    code, _out, err = run_cli("finetune", *args, "-o", tmp_path / "b.onnx")
    assert code == 0 and "resumed from" in err and "step 10 of 10" in err, err
    a, b = _initializers(tmp_path / "a.onnx"), _initializers(tmp_path / "b.onnx")
    assert all(np.array_equal(a[k], b[k]) for k in a)


def _torchrun_available() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


@pytest.mark.skipif(not _torchrun_available(), reason="torch.distributed with gloo is not available")
def test_two_torchrun_processes_give_one_process_weights(files, tmp_path):
    args = ["finetune", str(files / "m.onnx"), "--student", str(files / "student.onnx"), "--calib",
            str(files / "calib.npz"), "--train", str(files / "train.npz"), "--steps", "12", "--batch-size", "32",
            "--lr", "3e-3", "--min-agreement", "0"]
    assert run_cli(*args, "-o", tmp_path / "one.onnx")[0] == 0
    assert run_cli(*args, "--seed", "1", "-o", tmp_path / "other-order.onnx")[0] == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "rankfold.cli", *args, "-o", str(tmp_path / "two.onnx")], capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes, global batch 32" in done.stderr
    assert done.stdout.count("wrote ") == 1  # rank 0 alone writes and prints
    one, two, other = (_initializers(tmp_path / f"{n}.onnx") for n in ("one", "two", "other-order"))
    assert one.keys() == two.keys() == other.keys()
    worst = max(float(np.abs(one[k] - two[k]).max()) for k in one)
    apart = max(float(np.abs(one[k] - other[k]).max()) for k in one)  # what another data order changes
    assert worst < 0.01 * apart, (worst, apart)


def test_the_public_names():
    from rankfold.training import finetune_result

    assert rankfold.finetune is finetune and rankfold.FinetuneConfig is FinetuneConfig
    assert rankfold.finetune_result is finetune_result


def _dequantized_weights(path) -> list[np.ndarray]:
    """Every weight a QDQ file dequantizes (q * scale along its axis)."""
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and node.input[0].endswith("_q") \
                and node.input[1] in inits:  # not a bias: its scale is computed (the input's x the weight's)
            q, scale = inits[node.input[0]].astype(np.float32), inits[node.input[1]]
            if scale.ndim == 0:  # one scale for the tensor
                found.append(q * scale)
                continue
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * q.ndim
            shape[axis] = -1
            found.append(q * scale.reshape(shape))
    return found


@pytest.mark.parametrize("weight_steps, scales", [("max-abs", "channel"), ("lsq", "channel"),
                                                  ("max-abs", "tensor"), ("lsq", "tensor")])
def test_quantization_aware_training_exports_exactly_the_trained_weights(tmp_path, weight_steps, scales):
    import dataclasses

    from rankfold.quantize.core import weight_qmax
    from rankfold.training import finetune_result
    from rankfold.training.qat import PerChannelFakeQuant

    teacher, x = _teacher(), _inputs(256)
    plan = rankfold.make_plan(teacher, calib=x[:112], budgets={"weight_bytes": "20%"}, bits=8, min_rank=2)
    assert plan.quantized
    plan = dataclasses.replace(plan, layers=[dataclasses.replace(layer, weight_scales=scales) for layer in plan.layers])
    assert bool(plan.per_tensor_layers()) == (scales == "tensor")
    result = rankfold.apply_and_check(teacher, plan, calib=x[:128], min_agreement=0.0, check=False)
    tuned, _log = finetune_result(result, x, config=FinetuneConfig(steps=20, batch_size=32, lr=3e-3,
                                                                   weight_steps=weight_steps), check=False)
    assert tuned.weights_on_grid
    tuned.save(tmp_path / "qat.onnx")
    exported = _dequantized_weights(tmp_path / "qat.onnx")
    leaves = [m for m in tuned.module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    # the grid the plan's int8 uses: 7 bits where this CPU's onnxruntime needs them (reduce_range)
    on_grid = PerChannelFakeQuant(weight_qmax(8, plan.reduce_range), per_tensor=scales == "tensor")
    quantized = [m.weight.detach().numpy() for m in leaves
                 if torch.equal(on_grid(m.weight.detach()), m.weight.detach())]
    eight = [name for name, bits in plan.layer_bits().items() if bits == 8]
    assert quantized and len(quantized) >= len(eight) - 1 and exported, (plan.layer_bits(), len(quantized))
    for w in quantized:  # each trained weight is in the file as it was trained (to float rounding)
        assert any(e.shape == w.shape and np.allclose(e, w, rtol=1e-6, atol=1e-7) or
                   e.T.shape == w.shape and np.allclose(e.T, w, rtol=1e-6, atol=1e-7) for e in exported), w.shape


def test_compress_plans_fine_tunes_and_checks_in_one_go(files, tmp_path):
    code, out, err = run_cli("compress", files / "m.onnx", "--calib", files / "calib.npz", "--max-params", "60%",
                             "--min-rank", "2", "--train", files / "train.npz", "--finetune-steps", "10",
                             "--min-agreement", "0", "-o", tmp_path / "out.onnx", "--report", tmp_path / "r.json")
    assert code == 0, err
    assert "fine-tuning on 256 samples" in err and "step 10/10" in err and "self-check:" in out
    assert "fine-tuned 10 steps (640 samples seen" in out
    assert (tmp_path / "out.onnx").exists()
    trained = json.load(open(tmp_path / "r.json"))["finetune"]  # the report says what the training did
    assert trained["steps"] == 10 and trained["samples_seen"] == 640 and trained["history"][-1]["step"] == 10


def test_compress_fine_tunes_with_feature_matching_when_asked(files, tmp_path):
    """--finetune-feature-weight reaches the distillation: it matches the changed layers' outputs."""
    code, out, err = run_cli("compress", files / "m.onnx", "--calib", files / "calib.npz", "--max-params", "60%",
                             "--min-rank", "2", "--train", files / "train.npz", "--finetune-steps", "3",
                             "--finetune-feature-weight", "0.5", "--min-agreement", "0", "-o", tmp_path / "out.onnx")
    assert code == 0, err
    assert "feature matching at" in err and "weight 0.5" in err and "fine-tuned 3 steps" in out


def test_a_time_budget_sets_the_steps_from_the_first_ones(pair):
    teacher, student = pair
    lines = []
    _tuned, log = finetune(student, teacher, _inputs(128), config=FinetuneConfig(minutes=1e-4, batch_size=16),
                           progress=lines.append)
    # the first step, then the 5 timed ones
    assert log.steps == 6 and any("min allow 6 steps" in line for line in lines), lines


def test_a_time_budget_is_timed_after_the_first_step(pair, monkeypatch):
    """A slow first step (lazy initialization, a GPU's warm-up) spends its time but does not set the speed."""
    from rankfold.training import loop

    clock = {"now": 1000.0}
    monkeypatch.setattr(loop.time, "time", lambda: clock["now"])
    slow_first = {"steps": 0}
    real_step = loop._Distiller.loss

    def loss(self, rows, seed):  # each step: 1 s, the first 30 s
        slow_first["steps"] += 1
        clock["now"] += 30.0 if slow_first["steps"] == 1 else 1.0
        return real_step(self, rows, seed)

    monkeypatch.setattr(loop._Distiller, "loss", loss)
    teacher, student = pair
    _tuned, log = finetune(student, teacher, _inputs(128), config=FinetuneConfig(minutes=1.0, batch_size=16))
    assert log.steps == 6 + (60 - 35)  # 35 s spent on 6 steps, then 25 more of 1 s


def test_a_time_budget_stops_the_run_when_later_steps_slow_down(pair, monkeypatch):
    """Steps that slow down after the timed ones (work sharing the machine) do not overrun the budget
    by more than OVERRUN: the run stops there and says so."""
    from rankfold.training import loop

    clock = {"now": 1000.0}
    monkeypatch.setattr(loop.time, "time", lambda: clock["now"])
    calls = {"steps": 0}
    real_step = loop._Distiller.loss

    def loss(self, rows, seed):  # 1 s a step for the first 6, then 5 s
        calls["steps"] += 1
        clock["now"] += 1.0 if calls["steps"] <= 6 else 5.0
        return real_step(self, rows, seed)

    monkeypatch.setattr(loop._Distiller, "loss", loss)
    teacher, student = pair
    lines = []
    _tuned, log = finetune(student, teacher, _inputs(128), config=FinetuneConfig(minutes=1.0, batch_size=16),
                           progress=lines.append)
    # 6 + 54 steps planned from the timed ones (6 s); at 5 s a step, more than 66 s (1.1 minutes) are
    # spent first after step 19 (71 s)
    assert log.steps == 19 and log.history[-1]["step"] == 19 and log.seconds == 71.0, log
    assert any("min budget is spent at step 19 of 60" in line for line in lines), lines


def test_lsq_starts_at_the_least_error_clipping_and_learns_its_step():
    from rankfold.training.qat import LearnedStepFakeQuant, PerChannelFakeQuant, best_clipping_ratio

    torch.manual_seed(0)
    weight = torch.distributions.Laplace(0.0, 1.0).sample((8, 2048))  # long tails: clipping them pays at 4 bits
    ratio = best_clipping_ratio(weight, 7)
    assert (ratio < 0.9).all()
    learned = LearnedStepFakeQuant(7, weight)
    max_abs_error = ((PerChannelFakeQuant(7)(weight) - weight) ** 2).sum()
    assert ((learned(weight) - weight) ** 2).sum() < max_abs_error
    on_grid = torch.arange(-7, 8, dtype=torch.float32).repeat(2, 1) * 0.1  # already on a max-abs grid
    assert torch.equal(best_clipping_ratio(on_grid, 7), torch.ones(2, 1))
    # the step is trained: the loss reaches it through LSQ's gradient
    loss = ((learned(weight) - weight) ** 2).sum()
    loss.backward()
    assert learned.ratio.grad is not None and learned.ratio.grad.abs().sum() > 0
    # every channel's largest weight is on the top code: the exporter's max-abs rule finds the learned step
    with torch.no_grad():
        out = learned(weight)
        assert torch.allclose(PerChannelFakeQuant(7)(out), out, rtol=1e-6, atol=1e-7)
        step = learned.step(weight)
        assert torch.allclose(out.abs().amax(1, keepdim=True), 7 * step, rtol=1e-6)


def test_the_cli_qat_steps_are_the_registry():
    from rankfold.cli import QAT_STEP_NAMES
    from rankfold.training.qat import WEIGHT_STEPS

    assert set(QAT_STEP_NAMES) == set(WEIGHT_STEPS)
    from rankfold.cli import QAT_ACTIVATION_NAMES
    from rankfold.training.qat import ACTIVATION_STEPS

    assert set(QAT_ACTIVATION_NAMES) == set(ACTIVATION_STEPS)


def test_qat_steps_and_no_qat_are_refused_together(files, tmp_path):
    code, _out, err = run_cli("finetune", files / "m.onnx", "--student", files / "student.onnx", "--calib",
                              files / "calib.npz", "--train", files / "train.npz", "--steps", "1", "--no-qat",
                              "--qat-steps", "lsq", "-o", tmp_path / "o.onnx")
    assert code == 2 and "--no-qat" in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_learned_activation_steps_train_and_are_the_steps_in_the_file(tmp_path):
    from rankfold.training import finetune_result

    teacher, x = _teacher(), _inputs(256)
    plan = rankfold.make_plan(teacher, calib=x[:112], budgets={"weight_bytes": "20%"}, bits=8, min_rank=2)
    result = rankfold.apply_and_check(teacher, plan, calib=x[:128], min_agreement=0.0, check=False)
    config = FinetuneConfig(steps=30, batch_size=32, lr=3e-2, activation_steps="lsq")
    tuned, log = finetune_result(result, x, config=config, check=False)
    assert log.input_steps and set(log.input_steps) <= {n for n, _m in tuned.module.named_modules()}
    assert not any("rankfold_input_steps" in k for k in tuned.module.state_dict())  # removed after training
    # the steps moved from the calibrated ones (LSQ's gradient), within the kept range
    import copy

    from rankfold.training.qat import attach_activation_quant, detach_activation_quant

    start = copy.deepcopy(result.module)
    calibrated = detach_activation_quant(start, attach_activation_quant(start, list(log.input_steps), x[:256]))
    assert set(calibrated) == set(log.input_steps)
    ratios = [log.input_steps[n].scale / calibrated[n].scale for n in calibrated]
    assert all(0.25 - 1e-6 <= r <= 4 + 1e-6 for r in ratios) and any(abs(r - 1) > 1e-3 for r in ratios), ratios
    assert all(log.input_steps[n].zero_point == calibrated[n].zero_point for n in calibrated)
    tuned.save(tmp_path / "qat.onnx")
    model = onnx.load(str(tmp_path / "qat.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {n.output[0]: n for n in model.graph.node}
    file_steps = {}
    for node in model.graph.node:  # each quantized layer's input: DequantizeLinear <- QuantizeLinear(scale, zero)
        if node.op_type in ("Conv", "Gemm") and node.input[0] in producer \
                and producer[node.input[0]].op_type == "DequantizeLinear":
            dq = producer[node.input[0]]
            file_steps[node.name] = (float(inits[dq.input[1]]), int(inits[dq.input[2]]))
    learned = sorted((round(p.scale, 7), p.zero_point) for p in log.input_steps.values())
    found = sorted((round(s, 7), z) for s, z in file_steps.values())
    assert all(step in found for step in learned), (learned, found)
    json.dumps(log.to_dict())  # the report can hold them
    import shutil

    if shutil.which("cc"):  # the C export runs the learned steps bit-exact against the golden model
        from rankfold.cexport.golden import run_golden
        from rankfold.cexport.ir import read_program
        from rankfold.cexport.run import build_host, export_c, quantize_input, run_host

        export_c(model, str(tmp_path / "c"))
        program = read_program(onnx.load(str(tmp_path / "c" / "model.onnx")))
        x_q = quantize_input(program, x[:32].numpy())
        np.testing.assert_array_equal(run_host(build_host(str(tmp_path / "c")), program, x_q),
                                      run_golden(program, x_q).reshape(32, -1))


def test_learned_activation_steps_move_by_lsq_gradient():
    from rankfold.quantize.core import ActivationParams
    from rankfold.training.qat import LearnedActivationQuant

    quant = LearnedActivationQuant(ActivationParams(0.01, -128))  # covers [0, 2.55]: far too narrow
    x = torch.rand(4096) * 10
    optimizer = torch.optim.Adam(quant.parameters(), lr=0.05)
    first = None
    for _ in range(100):
        loss = ((quant(x) - x) ** 2).mean()
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert quant.params().scale > 0.02 and loss.item() < 0.2 * first  # the step grew to cover the inputs
    assert quant.params().zero_point == -128


def test_feature_matching_pulls_each_changed_layer_toward_the_original(pair):
    from rankfold.training.loop import changed_layers
    from rankfold.training.losses import feature_matching_loss

    teacher, student = pair
    names = changed_layers(student, teacher, None)
    assert names and all(isinstance(dict(student.named_modules())[n], rankfold.layers.LowRank) for n in names)
    x = _inputs(256, seed=3)

    def layer_error(module) -> float:
        outs: dict = {}
        handles = [dict(net.named_modules())[n].register_forward_hook(
            lambda _m, _i, o, n=n, key=key: outs.setdefault(key, {}).__setitem__(n, o))
            for key, net in (("s", module), ("t", teacher)) for n in names]
        with torch.no_grad():
            module(x), teacher(x)
        for h in handles:
            h.remove()
        return float(feature_matching_loss(outs["s"], outs["t"]))

    config = dict(steps=40, batch_size=32, lr=3e-3)
    plain, _ = finetune(student, teacher, x, config=FinetuneConfig(**config))
    matched, _ = finetune(student, teacher, x, config=FinetuneConfig(**config, feature_weight=10.0))
    assert layer_error(matched) < layer_error(plain) < layer_error(student) * 1.5
    with pytest.raises(ValueError, match="feature_weight"):
        FinetuneConfig(steps=1, feature_weight=-1.0)


def test_probability_outputs_are_distilled_unsoftened():
    """CTC frames over many characters: the KL of the probabilities as they are, whatever the
    temperature (softened, the characters never read would carry most of the mass)."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.softmax(8 * torch.randn(4, 10, 300, generator=g), -1)
    student = torch.softmax(8 * torch.randn(4, 10, 300, generator=g), -1)
    plain = float((teacher * (teacher.clamp_min(1e-8).log() - student.clamp_min(1e-8).log())).sum(-1).mean())
    for temperature in (1.0, 4.0):
        got = float(distillation_loss([student], [teacher], ["sequence"], temperature=temperature))
        assert got == pytest.approx(plain, rel=1e-4)


def test_a_step_under_a_memory_limit_runs_in_micro_batches_that_add_up_to_the_batch(pair, monkeypatch):
    from rankfold.host_memory import MemoryPlan
    from rankfold.training import loop

    teacher, student = pair
    config = FinetuneConfig(steps=8, batch_size=32, lr=3e-3, optimizer="sgd", momentum=0.0)
    whole, _ = finetune(student, teacher, _inputs(128), config=config)
    # A limit that holds 5 samples of a step: the 32 run as 5+5+5+5+5+5+2, gradients summed.
    monkeypatch.setattr(loop, "training_memory", lambda *a, **k: MemoryPlan(10**9, 0, 10**8, 5))
    lines = []
    split, _ = finetune(student, teacher, _inputs(128), config=config, progress=lines.append)
    assert any("micro-batches of 5" in line for line in lines), lines
    for key, value in _weights(whole).items():
        torch.testing.assert_close(split.state_dict()[key], value, rtol=1e-4, atol=1e-6)


def test_a_memory_limit_too_small_for_one_sample_is_refused_before_any_step(pair):
    teacher, student = pair
    config = FinetuneConfig(steps=8, batch_size=32)
    lines = []
    with pytest.raises(RankfoldError, match="too little to fine-tune"):
        finetune(student, teacher, _inputs(128), config=config, max_memory=1 << 20, progress=lines.append)
    assert not any(line.startswith("step ") for line in lines)


@pytest.mark.parametrize("name, message", [("tpu", "expected cpu, cuda or cuda:N"),
                                           ("gpu:0", "expected cpu, cuda or cuda:N"),
                                           ("cuda:99", "CUDA device")])
def test_a_training_device_torch_cannot_use_is_refused_by_name(name, message):
    from rankfold.training.distributed import training_device

    assert training_device(None) == torch.device("cpu")
    with pytest.raises(RankfoldError, match=message):
        training_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_asked_where_there_is_none_stops_before_any_work(files, tmp_path):
    for command, args in (("compress", ["--max-params", "60%", "--train", files / "train.npz", "--finetune-steps",
                                        "10"]),
                          ("finetune", ["--student", files / "student.onnx", "--train", files / "train.npz",
                                        "--steps", "10"])):
        code, out, err = run_cli(command, files / "m.onnx", "--calib", files / "calib.npz", *args, "--device", "cuda",
                                 "-o", tmp_path / f"{command}.onnx")
        assert code == 2 and "--device cuda: torch sees no CUDA device" in err and "Traceback" not in err, err
        assert "fine-tuning on" not in err and not (tmp_path / f"{command}.onnx").exists()
    code, _, err = run_cli("compress", files / "m.onnx", "--calib", files / "calib.npz", "--max-params", "60%",
                           "--device", "cpu", "-o", tmp_path / "alone.onnx")
    assert code == 2 and "--device need --train" in err and not (tmp_path / "alone.onnx").exists()


def _gpu_extras(student: torch.nn.Module, extra: str) -> dict:
    """finetune's keyword arguments for one of the paths a GPU run takes besides plain distillation."""
    from rankfold.robustness import AttackConfig

    layers = {n: 8 for n, m in student.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    return {"plain": {},
            "feature matching": {"config": {"feature_weight": 1.0}},
            "quantization-aware": {"fake_quant": layers},
            "quantization-aware, learned steps": {"fake_quant": layers, "config": {"weight_steps": "lsq",
                                                                                  "activation_steps": "lsq"}},
            "adversarial": {"attack": AttackConfig("pgd", (0.1,))}}[extra]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("extra", ["plain", "feature matching", "quantization-aware",
                                   "quantization-aware, learned steps", "adversarial"])
def test_distillation_on_the_gpu_moves_as_on_the_cpu(pair, extra):
    teacher, student = pair
    kwargs = _gpu_extras(student, extra)
    config = FinetuneConfig(steps=40, batch_size=32, lr=3e-3, log_every=20, **kwargs.pop("config", {}))
    runs = {device: finetune(student, teacher, _inputs(512), config=config, held=_inputs(64, seed=1), device=device,
                             **kwargs)
            for device in ("cpu", "cuda")}
    held = _inputs(64, seed=1)
    with torch.no_grad():
        losses = {device: float(distillation_loss([tuned(held)], [teacher(held)], ["classes"], temperature=4.0))
                  for device, (tuned, _log) in runs.items()}
        before = float(distillation_loss([student(held)], [teacher(held)], ["classes"], temperature=4.0))
    tuned_on_gpu = runs["cuda"][0]
    assert all(p.device.type == "cpu" for p in tuned_on_gpu.parameters())  # handed back on the CPU
    if extra != "quantization-aware, learned steps":  # its float module trained behind learned input clipping
        assert losses["cuda"] < before, (losses, before)
    assert abs(losses["cuda"] - losses["cpu"]) <= 0.1 * losses["cpu"] + 1e-4, losses
    assert [h["step"] for h in runs["cuda"][1].history] == [0, 20, 40]
