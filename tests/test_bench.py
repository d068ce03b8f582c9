"""The benchmark's own pieces: the classic baselines and the verdicts (bench/, not the package)."""

import torch
from torch import nn

from bench.baselines import factorize_all, fraction_for_budget, params_at, uniform_rank, vbmf_rank
from bench.report import verdicts


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(64, 64, 1), nn.Flatten(), nn.Linear(64 * 4 * 4, 32))


def _params(model):
    return sum(p.numel() for p in model.parameters())


def test_uniform_hosvd_meets_the_parameter_budget_and_is_exact_on_a_low_rank_weight():
    model = _net()
    budget = int(0.3 * _params(model))
    fraction = fraction_for_budget(model, budget)
    assert params_at(model, uniform_rank(fraction)) <= budget
    compressed = _net()
    replaced = factorize_all(compressed, uniform_rank(fraction), hooi_iters=0)
    assert replaced and _params(compressed) == params_at(model, uniform_rank(fraction)) <= budget
    # Tucker-2 at full ranks reproduces the layer exactly (HOSVD with complete factors)
    layer = nn.Conv2d(16, 12, 3, padding=1)
    with torch.no_grad():  # a weight of multilinear rank (r_out, r_in) = (3, 4): HOSVD at (4, 3) is exact
        layer.weight.copy_(torch.einsum("ab,bckl,dc->adkl", torch.randn(12, 3), torch.randn(3, 4, 3, 3),
                                        torch.randn(16, 4)))
    exact = nn.Sequential(nn.Conv2d(16, 12, 3, padding=1))
    exact[0].load_state_dict(layer.state_dict())
    full = nn.Sequential(layer)
    assert factorize_all(full, lambda m: (4, 3), hooi_iters=0) == ["0"]
    y = torch.randn(2, 16, 5, 5)
    torch.testing.assert_close(full(y), exact(y), rtol=1e-4, atol=1e-4)


def test_vbmf_ranks_find_a_planted_low_rank():
    torch.manual_seed(1)
    layer = nn.Linear(60, 40)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(40, 5) @ torch.randn(5, 60) + 0.01 * torch.randn(40, 60))
    assert vbmf_rank(layer) == (5,)


def _row(contender, setting, accuracy, weight_bytes):
    return {"network": "n", "contender": contender, "setting": setting, "error": None,
            "metrics": {"accuracy": accuracy, "weight_bytes": weight_bytes}}


def test_verdicts_compare_at_equal_or_fewer_weight_bytes_and_say_when_rankfold_loses():
    rows = [_row("original", "float", 0.95, 1000), _row("ort-int8", "int8", 0.94, 250),
            _row("aidge", "50%", 0.93, 500), _row("hosvd-tucker2", "10%", 0.5, 50),
            _row("rankfold-float", "50%", 0.945, 480), _row("rankfold-joint", "3%", 0.93, 30)]
    lines = verdicts(rows)
    assert len(lines) == 3
    ort, aidge, hosvd = lines
    assert "rankfold loses" in ort and "-1.00 pt" in ort  # only the 30-byte row fits under 250
    assert "rankfold wins" in aidge and "0.9450" in aidge
    assert "rankfold wins" in hosvd


def test_a_partial_rerun_replaces_only_its_own_networks(tmp_path):
    import json

    from bench.run import merge_results

    old = {"mode": "full", "network_seconds": {"a": 10.0, "b": 20.0},
           "rows": [_row("original", "float", 0.9, 100) | {"network": "a"},
                    _row("original", "float", 0.8, 100) | {"network": "b"}]}
    path = tmp_path / "full.json"
    path.write_text(json.dumps(old))
    new = {"mode": "full", "network_seconds": {"b": 5.0},
           "rows": [_row("original", "float", 0.85, 100) | {"network": "b"}]}
    merged = merge_results(str(path), new)
    assert [(r["network"], r["metrics"]["accuracy"]) for r in merged["rows"]] == [("a", 0.9), ("b", 0.85)]
    assert merged["network_seconds"] == {"a": 10.0, "b": 5.0}
    assert merge_results(str(path), new | {"mode": "quick"})["rows"] == new["rows"]  # another mode: no merge


def test_the_bench_records_the_peak_memory_of_a_rankfold_run(tmp_path):
    import subprocess
    import sys

    import numpy as np
    import torch

    import rankfold
    from bench.peak import parse_peak
    from tests.helpers import tiny_classifier

    x = np.random.default_rng(0).standard_normal((64, 1, 12, 12)).astype(np.float32)
    rankfold.export_onnx(tiny_classifier(), tmp_path / "m.onnx", example_input=torch.from_numpy(x[:1]))
    np.savez(tmp_path / "c.npz", x=x)
    done = subprocess.run([sys.executable, "-m", "bench.peak", "compress", str(tmp_path / "m.onnx"), "--calib",
                           str(tmp_path / "c.npz"), "--keep", "0.5", "--min-rank", "2", "-o", str(tmp_path / "o.onnx"),
                           "-q"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    peak = parse_peak(done.stderr)
    assert peak is not None and 50 * 2**20 < peak < 8 * 2**30  # torch alone takes tens of MB


def test_the_smallest_accepted_run_stops_at_the_first_budget_the_check_accepts(monkeypatch):
    from bench import realworld

    tried = []

    def fake_run(model, path, work, run, calib, fresh, reference, log, options):
        budget = options[options.index("--max-weight-bytes") + 1]
        tried.append((run, budget, options[options.index("--min-agreement") + 1] if "--min-agreement" in options
                      else None))
        return realworld.Result(model.name, run, ok=budget == "13%", seconds=1.0)

    monkeypatch.setattr(realworld, "compress_run", fake_run)
    model = realworld.MODELS[0]
    result = realworld.smallest_accepted(model, "m.onnx", "w", "c.npz", None, [], print)
    assert tried == [("smallest-accepted", b, None) for b in ("10%", "11%", "12%", "13%")]
    assert result.ok and result.extra["budget"] == "13%"
    assert "| smallest-accepted (13%) |" in realworld.markdown([result], "cpu")
    # at the goal: the check is held to the model's own goal on every rung
    tried.clear()
    result = realworld.smallest_accepted(model, "m.onnx", "w", "c.npz", None, [], print, at_goal=True)
    assert tried == [("smallest-at-goal", b, f"{model.goal:g}") for b in ("10%", "11%", "12%", "13%")]
    assert "| smallest-at-goal (13%) |" in realworld.markdown([result], "cpu")


def test_field_rows_keep_the_machine_they_were_measured_on(tmp_path, monkeypatch):
    """A rerun merges with the earlier results file; rows from another machine are marked as such."""
    import json

    from bench import realworld

    monkeypatch.setattr(realworld, "RESULTS", str(tmp_path))
    earlier = [realworld.Result("ppocr-cls", "load", True, 1.0, extra={"conversion_error": 1e-9}),
               realworld.Result("ppocr-cls", "uniform", True, 9.0, fidelity=0.9)]
    (tmp_path / "realworld.json").write_text(json.dumps({"cpu": "old CPU", "results": [r.__dict__ for r in earlier]}))
    rerun = realworld.Result("ppocr-cls", "max-params", True, 5.0, fidelity=0.95, cpu="new CPU")
    merged = realworld._merged([rerun], {("ppocr-cls", "max-params")})
    assert [(r.run, r.cpu) for r in merged] == [("load", "old CPU"), ("uniform", "old CPU"), ("max-params", "new CPU")]
    table = realworld.markdown(merged, "new CPU")
    assert "(new CPU; rows marked A: old CPU)" in table
    assert "| ppocr-cls | uniform (A) |" in table and "| ppocr-cls | max-params |" in table


class _TinyDetector(nn.Module):
    """YOLOv8's output layout on 10 x 10 cells: 4 box values, then 18 class scores in [0, 1]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Conv2d(3, 22, 32, stride=32)

    def forward(self, x):
        y = self.head(x).flatten(2)
        return torch.cat([y[:, :4], torch.sigmoid(y[:, 4:] - 3)], 1)


def test_fired_scenes_raise_the_detector_s_best_scores_and_stay_valid_pixels():
    import numpy as np

    from bench import field_inputs
    from bench.fired_scenes import fired_scenes

    model = _TinyDetector().eval().requires_grad_(False)
    plain = torch.from_numpy(field_inputs.scenes(np.random.default_rng(0), 4))
    fired = torch.from_numpy(fired_scenes(model, np.random.default_rng(0), 4, batch=2))
    assert fired.shape == plain.shape and float(fired.min()) >= 0 and float(fired.max()) <= 1
    best = [model(x)[:, 4:].amax((1, 2)) for x in (plain, fired)]
    assert bool((best[1] > best[0]).all()), best



def test_recogniser_lines_fit_unsqueezed_and_are_padded_with_the_normalized_zero():
    """RapidOCR never squeezes a line into its recogniser's input and pads with 0 after
    normalizing (mid-grey): the bench's recogniser lines do the same."""
    import glob

    import numpy as np
    import pytest

    from bench import field_inputs

    if not any(glob.glob(p, recursive=True) for p in field_inputs.FONT_GLOBS):
        pytest.skip("no TrueType fonts (apt-get install fonts-dejavu-core)")
    rng, words, fonts = np.random.default_rng(0), field_inputs.english_words(), field_inputs.fonts()
    widths = [field_inputs._text_line(rng, words, fonts, 48, max_width=320).width for _ in range(40)]
    unfitted = [field_inputs._text_line(rng, words, fonts, 48).width for _ in range(40)]
    assert sum(w <= 320 for w in widths) >= 39 and sum(w > 320 for w in unfitted) >= 10  # one long word may stay
    x = field_inputs.reading_lines(np.random.default_rng(0), 8)
    assert x.shape == (8, 3, 48, 320) and float(x.min()) >= -1 and float(x.max()) <= 1
    padding = (x == 0).all(axis=(1, 2))  # (8, 320): the columns right of each line are exactly 0
    assert padding[:, -1].all()
    assert all(padding[i, int(np.argmax(padding[i])):].all() for i in range(8))


def test_a_plan_spread_entry_replaces_only_its_own_draws():
    from bench.plan_spread import replaced, spread

    assert spread([0.8, 0.9, 0.85]) == {"median": 0.85, "low": 0.8, "high": 0.9, "values": [0.8, 0.9, 0.85]}
    old = [{"model": "a", "budget": "--max-params=50%", "calibration": 512, "median": 0.8},
           {"model": "a", "budget": "--max-params=50%", "calibration": 1024, "median": 0.85}]
    new = {"model": "a", "budget": "--max-params=50%", "calibration": 512, "median": 0.9}
    assert replaced(old, new) == [old[1], new]
