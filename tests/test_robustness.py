"""Adversarial robustness (issue 19): FGSM / PGD sanity on a small trained classifier, a QDQ model
attacked through its straight-through twin and judged in onnxruntime, transfer attacks, and the
robustness options of eval and compress."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rankfold
from rankfold.errors import RankfoldError
from rankfold.robustness import (
    ATTACKS,
    AttackConfig,
    adversarial_calibration,
    attack_twin,
    clean_calibration_samples,
    craft,
    robust_accuracy,
)
from tests.helpers import run_cli

MEAN, STD = 0.3, 0.4  # the inputs are (pixel - MEAN) / STD, pixels in [0, 1]


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images / 16.0).astype(np.float32)[:, None]
    return (pixels - MEAN) / STD, digits.target.astype(np.int64)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small CNN trained on scikit-learn's digits, as ONNX, with held-out data and calibration."""
    root = tmp_path_factory.mktemp("robust")
    x, y = _digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x[:1400]), torch.from_numpy(y[:1400])
    for epoch in range(12):
        for i in torch.randperm(1400, generator=torch.Generator().manual_seed(epoch)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(xt[i]), yt[i]).backward()
            opt.step()
    model.eval()
    rankfold.export_onnx(model, root / "m.onnx", example_input=xt[:1])
    np.savez(root / "test.npz", x=x[1400:1700], y=y[1400:1700])
    np.savez(root / "calib.npz", x=x[:256])
    return root, model, x[1400:1700], y[1400:1700]


PIXELS = dict(pixel_mean=(MEAN,), pixel_std=(STD,))


def test_pgd_sanity_clean_at_zero_falling_with_eps_and_zero_when_large(trained):
    root, _model, x, y = trained
    results = robust_accuracy(root / "m.onnx", x, y, AttackConfig("pgd", (0.0, 0.05, 0.1, 0.2, 1.0), **PIXELS))
    adv = [r.adversarial_accuracy for r in results]
    assert results[0].clean_accuracy > 0.9
    assert adv[0] == results[0].clean_accuracy  # eps 0 changes nothing
    assert all(a >= b for a, b in zip(adv, adv[1:])), adv  # more room, more errors
    assert adv[2] < adv[0] - 0.1, adv  # a real attack at a moderate eps
    assert adv[-1] <= 0.02, adv  # every pixel free: nothing survives
    assert all(r.twin_agreement == 1.0 for r in results)  # a float model is its own twin
    assert "own gradients" in results[0].gradients and results[0].eps_units.startswith("pixels")


def test_pgd_is_at_least_as_strong_as_fgsm(trained):
    root, _model, x, y = trained
    fgsm, pgd = (robust_accuracy(root / "m.onnx", x, y, AttackConfig(kind, (0.1,), **PIXELS))[0]
                 for kind in ("fgsm", "pgd"))
    assert pgd.adversarial_accuracy <= fgsm.adversarial_accuracy < fgsm.clean_accuracy
    assert fgsm.steps == 1 and pgd.steps == 10


def test_adversarial_inputs_stay_in_the_eps_ball_and_among_valid_pixels(trained):
    _root, model, x, y = trained
    for kind in ("fgsm", "pgd"):
        config = AttackConfig(kind, (0.1,), **PIXELS)
        adv = craft(model, x[:50], y[:50], config, 0.1)
        pixels, original = adv * STD + MEAN, x[:50] * STD + MEAN
        assert np.abs(pixels - original).max() <= 0.1 + 1e-5
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    # Without a normalization, eps is in input units and the data's own range bounds the inputs.
    adv = craft(model, x[:50], y[:50], AttackConfig("pgd", (0.25,)), 0.25)
    assert np.abs(adv - x[:50]).max() <= 0.25 + 1e-5 and adv.min() >= x[:50].min() - 1e-6


def test_the_same_seed_gives_the_same_inputs(trained):
    _root, model, x, y = trained
    a, b = (craft(model, x[:20], y[:20], AttackConfig("pgd", (0.1,), seed=3, **PIXELS), 0.1) for _ in range(2))
    c = craft(model, x[:20], y[:20], AttackConfig("pgd", (0.1,), seed=4, **PIXELS), 0.1)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.fixture(scope="module")
def qdq(trained):
    root, model, _x, _y = trained
    calib = torch.from_numpy(np.load(root / "calib.npz")["x"])
    bits = {name: 8 for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    bits["5"] = 4  # the 512->64 Linear on int4: the twin reads packed int4 weights too
    rankfold.export_quantized(model, bits, root / "q.onnx", calib=calib, example_input=calib[:1])
    return root / "q.onnx"


def test_a_qdq_model_is_attacked_through_its_straight_through_twin(trained, qdq):
    _root, _model, x, y = trained
    twin, words = attack_twin(qdq)
    assert "straight through" in words
    xt = torch.from_numpy(x[:32]).requires_grad_(True)
    F.cross_entropy(twin(xt), torch.from_numpy(y[:32])).backward()
    assert xt.grad.abs().sum() > 0  # the rounding passes gradients: no masking
    results = robust_accuracy(qdq, x, y, AttackConfig("pgd", (0.0, 0.1), **PIXELS))
    assert results[0].adversarial_accuracy == results[0].clean_accuracy > 0.9
    assert results[1].adversarial_accuracy < results[0].clean_accuracy - 0.1
    assert min(r.twin_agreement for r in results) > 0.9  # the twin computes what onnxruntime computes


def test_a_transfer_attack_crafts_on_the_original_and_judges_the_other(trained, qdq):
    root, _model, x, y = trained
    [transfer] = robust_accuracy(qdq, x, y, AttackConfig("transfer", (0.1,), **PIXELS), source=root / "m.onnx")
    [white] = robust_accuracy(root / "m.onnx", x, y, AttackConfig("pgd", (0.1,), **PIXELS))
    assert "transferred from" in transfer.gradients
    assert transfer.adversarial_accuracy < transfer.clean_accuracy - 0.1
    assert abs(transfer.adversarial_accuracy - white.adversarial_accuracy) < 0.2
    with pytest.raises(RankfoldError, match="--original"):
        robust_accuracy(qdq, x, y, AttackConfig("transfer", (0.1,)))


def test_an_attack_needs_class_scores(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1)).eval()
    rankfold.export_onnx(model, tmp_path / "map.onnx", example_input=torch.zeros(1, 1, 8, 8))
    x = np.zeros((4, 1, 8, 8), np.float32)
    with pytest.raises(RankfoldError, match=r"\(N, classes\)"):
        robust_accuracy(tmp_path / "map.onnx", x, np.zeros(4, np.int64), AttackConfig("pgd", (0.1,)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="cw"), "attack must be one of"),
    (dict(eps=(-0.1,)), "eps must be"),
    (dict(eps=()), "eps must be"),
    (dict(steps=0), "steps must be"),
    (dict(step_size=0.0), "step_size"),
    (dict(pixel_mean=(0.1,)), "go together"),
    (dict(pixel_mean=(0.1,), pixel_std=(0.0,)), "pixel_std must be > 0"),
])
def test_attack_config_refuses_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AttackConfig(**kwargs)


def test_the_cli_attacks_are_the_registry():
    from rankfold.cli import ATTACK_NAMES

    assert set(ATTACK_NAMES) == set(ATTACKS)


def test_adversarial_calibration_interleaves_clean_and_pgd_samples(trained):
    _root, model, x, _y = trained
    calib = torch.from_numpy(x[:40])
    both = adversarial_calibration(model, calib, AttackConfig("pgd", (0.1,), **PIXELS))
    assert both.shape == (80, *calib.shape[1:])
    assert torch.equal(both[0::2], calib) and not torch.equal(both[1::2], calib)
    assert (both[1::2] - calib).abs().max() <= 0.1 / STD + 1e-5
    for start in (60, 61):  # the held-back tail may begin on either kind
        clean = clean_calibration_samples(both, start)
        assert torch.equal(clean, calib[(start + 1) // 2:])


def test_eval_attack_cli(trained):
    root, _model, _x, _y = trained
    pixels = ["--pixel-mean", str(MEAN), "--pixel-std", str(STD)]
    code, out, err = run_cli("eval", root / "m.onnx", "--data", root / "test.npz", "--no-latency", "--json",
                             "--attack", "pgd", "--eps", "0,0.1", "--attack-samples", "100", *pixels)
    assert code == 0, err
    robust = json.loads(out)["robustness"]
    assert [r["eps"] for r in robust] == [0.0, 0.1] and all(r["samples"] == 100 for r in robust)
    assert robust[0]["adversarial_accuracy"] == robust[0]["clean_accuracy"] > robust[1]["adversarial_accuracy"]
    code, out, err = run_cli("eval", root / "m.onnx", "--data", root / "test.npz", "--no-latency", "--attack",
                             "transfer", "--original", root / "m.onnx", "--eps", "0.1", "--attack-samples", "50",
                             *pixels)
    assert code == 0 and "transfer eps=0.1" in out and "transferred from" in out, err


@pytest.mark.parametrize("extra, message", [
    (["--attack", "transfer"], "give it with --original"),
    (["--attack", "pgd", "--original", "M"], "needs --attack transfer"),
    (["--eps", "0.1"], "--eps set an attack: give --attack too"),
    (["--attack-seed", "3", "--steps", "4"], "--steps/--attack-seed set an attack: give --attack too"),
    (["--original", ""], "needs --attack transfer"),
    (["--attack", "pgd", "--pixel-mean", "0.1,0.2", "--pixel-std", "0.3,0.3"], "1 channels"),
    (["--attack", "pgd", "--pixel-mean", "0.1"], "go together"),
])
def test_eval_attack_mistakes_are_one_line(trained, extra, message):
    root, _model, _x, _y = trained
    extra = [str(root / "m.onnx") if e == "M" else e for e in extra]
    code, out, err = run_cli("eval", root / "m.onnx", "--data", root / "test.npz", "--no-latency", *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_compress_reports_robustness_side_by_side_and_preserves_on_request(trained, tmp_path):
    root, _model, _x, _y = trained
    code, out, err = run_cli("compress", root / "m.onnx", "--calib", root / "calib.npz", "--max-params", "60%",
                             "--min-rank", "2", "-o", tmp_path / "c.onnx", "--report", tmp_path / "r.json",
                             "--attack", "pgd", "--eps", "0.05", "--pixel-mean", str(MEAN), "--pixel-std", str(STD),
                             "--attack-data", root / "test.npz", "--attack-samples", "100", "--preserve-robustness")
    assert code == 0, err
    assert "crafting pgd inputs" in err and "compressed" in out
    report = json.loads((tmp_path / "r.json").read_text())
    original, compressed = report["robustness"]["original"][0], report["robustness"]["compressed"][0]
    assert original["eps"] == compressed["eps"] == 0.05 and compressed["samples"] == 100
    assert 0 < original["adversarial_accuracy"] < original["clean_accuracy"]
    assert report["plan"]["held_back"] > 0


@pytest.mark.parametrize("extra, message", [
    (["--attack", "pgd"], "give --attack-data"),
    (["--attack-data", "D"], "give --attack too"),
    (["--preserve-robustness", "--pixel-std", "0.4"], "go together"),
])
def test_compress_attack_mistakes_are_found_before_any_work(trained, tmp_path, extra, message):
    root, _model, _x, _y = trained
    extra = [str(root / "test.npz") if e == "D" else e for e in extra]
    code, _out, err = run_cli("compress", root / "m.onnx", "--calib", root / "calib.npz", "--max-params", "60%",
                              "-o", tmp_path / "c.onnx", *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_adversarial_batch_stays_in_the_ball_and_moves_the_student_away_from_the_teacher(trained):
    from rankfold.robustness import adversarial_batch
    from rankfold.training.losses import distillation_loss

    _root, model, x, _y = trained
    student = rankfold.compress(model, method="svd", keep=0.3, calib=torch.from_numpy(x[:200]), min_rank=2)
    xb = torch.from_numpy(x[:64])
    with torch.no_grad():
        teacher_out = [model(xb)]
    eps, low, high = AttackConfig("pgd", (0.1,), **PIXELS).bounds(x, 0.1)
    moved = adversarial_batch(student, xb, teacher_out, ["classes"], 4.0, eps, low, high,
                              torch.Generator().manual_seed(0))
    assert (moved - xb).abs().max() <= 0.1 / STD + 1e-5 and moved.min() >= low.min() - 1e-6
    with torch.no_grad():
        before, after = (float(distillation_loss([student(v)], teacher_out, ["classes"], temperature=4.0))
                         for v in (xb, moved))
    assert after > before


def test_compress_train_with_preserve_distils_adversarially(trained, tmp_path):
    root, _model, x, _y = trained
    np.savez(tmp_path / "train.npz", x=x[:256])
    code, _out, err = run_cli("compress", root / "m.onnx", "--calib", root / "calib.npz", "--max-params", "60%",
                              "--min-rank", "2", "--train", tmp_path / "train.npz", "--finetune-steps", "10",
                              "--preserve-robustness", "--eps", "0.05", "--pixel-mean", str(MEAN), "--pixel-std",
                              str(STD), "-o", tmp_path / "c.onnx")
    assert code == 0, err
    assert "crafting pgd inputs" in err and "adversarial distillation: eps 0.05" in err
    # 256 clean + 256 adversarial samples, 64 held back: the check after training judges the 32 clean ones
    assert "judges the 32 clean held-back samples" in err
    assert (tmp_path / "c.onnx").exists()


def test_a_transfer_source_of_another_input_shape_is_refused_before_any_work(trained, tmp_path):
    root, _model, _x, _y = trained
    other = nn.Sequential(nn.Flatten(), nn.Linear(4 * 4, 10)).eval()
    rankfold.export_onnx(other, tmp_path / "other.onnx", example_input=torch.zeros(1, 1, 4, 4))
    code, _out, err = run_cli("eval", root / "m.onnx", "--data", root / "test.npz", "--no-latency", "--attack",
                              "transfer", "--original", tmp_path / "other.onnx")
    assert code == 2 and "(for --original)" in err and "do not fit" in err and len(err.strip().splitlines()) == 1, err


def test_finetune_adversarial_eps_distils_adversarially_and_checks_every_held_back_sample(trained, tmp_path):
    root, _model, x, _y = trained
    np.savez(tmp_path / "train.npz", x=x[:256])
    code, _out, err = run_cli("compress", root / "m.onnx", "--calib", root / "calib.npz", "--max-params", "60%",
                              "--min-rank", "2", "--plan-out", tmp_path / "plan.json", "-o", tmp_path / "c.onnx")
    assert code == 0, err
    code, _out, err = run_cli("finetune", root / "m.onnx", "--plan", tmp_path / "plan.json", "--calib",
                              root / "calib.npz", "--train", tmp_path / "train.npz", "--steps", "5",
                              "--adversarial-eps", "0.05", "--pixel-mean", str(MEAN), "--pixel-std", str(STD),
                              "-o", tmp_path / "f.onnx")
    assert code == 0, err
    # its calibration holds no adversarial samples: all 32 held back are judged
    assert "adversarial distillation: eps 0.05 in pixels" in err and "on 32 held-back samples" in err
    assert (tmp_path / "f.onnx").exists()
