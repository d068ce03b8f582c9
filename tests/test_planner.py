import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

import rankfold
from rankfold.decompose import spatial_svd_decompose, sqrt_psd, svd_decompose, tucker2_decompose
from rankfold.errors import RankfoldError
from rankfold.frontends.onnx import load_onnx
from rankfold.methods import method_named
from rankfold.planner.memory import activation_profile
from rankfold.planner.plan import apply_plan, load_plan
from rankfold.planner.pricing import make_plan
from rankfold.planner.solver import solve
from rankfold.selfcheck import agreement
from rankfold.target import builtin_targets, load_target, parse_budget


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.conv1 = nn.Conv2d(32, 48, 3, padding=1)
        self.conv2 = nn.Conv2d(48, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = self.conv2(torch.relu(self.conv1(x)))
        return self.head(torch.relu(x + y).mean((2, 3)))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = Residual().eval()
    calib = torch.randn(96, 3, 10, 10)
    return model, calib


# -- targets and budgets --------------------------------------------------------------------
def test_builtin_targets_load_and_fit_the_issue_profiles():
    assert {"host", "cortex-m4", "cortex-m7", "cortex-m55"} <= set(builtin_targets())
    m7 = load_target("cortex-m7")
    assert m7.flash_bytes == 2 * 1024**2 and m7.ram_bytes == 1024**2 and m7.latency == "model"
    assert load_target("host").latency == "measured"


@pytest.mark.parametrize("text, message", [
    ('name = "x"\nlatency = "model"\n', "clock_hz"),
    ('name = "x"\nflash_bytes = -3\n', "flash_bytes"),
    ('name = "x"\nweight_bits = [7]\n', "weight_bits"),
    ('name = "x"\nspeed = 3\n', "unknown field"),
    ('name = \n', "not valid TOML"),
])
def test_bad_target_files_name_the_problem(tmp_path, text, message):
    path = tmp_path / "t.toml"
    path.write_text(text)
    with pytest.raises(RankfoldError, match=message):
        load_target(str(path))


def test_unknown_target_lists_the_builtin_ones():
    with pytest.raises(RankfoldError, match="cortex-m7"):
        load_target("cortex-m99")


@pytest.mark.parametrize("quantity, text, value, relative", [
    ("params", "10%", 0.1, True), ("params", "300k", 3e5, False), ("weight_bytes", "2MB", 2 * 1024**2, False),
    ("ram_bytes", "512KB", 512 * 1024, False), ("latency_ms", "1.5ms", 1.5, False),
    ("latency_ms", "250us", 0.25, False), ("macs", "1.2e6", 1.2e6, False),
])
def test_budget_values(quantity, text, value, relative):
    budget = parse_budget(quantity, text)
    assert budget.value == pytest.approx(value) and budget.relative == relative


@pytest.mark.parametrize("text", ["abc", "-5%", "10 parsecs", "0%", "", "1e309", "1e400%"])
def test_bad_budget_values_raise(text):
    with pytest.raises(RankfoldError, match="max_params"):
        parse_budget("params", text)


# -- solver -----------------------------------------------------------------------------------
def _brute_force(losses, costs, limits):
    best = None
    for choice in itertools.product(*[range(len(row)) for row in losses]):
        if all(sum(costs[k][i][j] for i, j in enumerate(choice)) <= limits[k] for k in limits):
            loss = sum(losses[i][j] for i, j in enumerate(choice))
            best = loss if best is None else min(best, loss)
    return best


@pytest.mark.parametrize("seed", range(8))
def test_solver_is_feasible_and_near_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    losses, params, latency = [], [], []
    for _ in range(5):
        n = int(rng.integers(2, 6))
        cost = np.sort(rng.uniform(1, 20, n))
        losses.append(np.sort(rng.uniform(0, 5, n))[::-1] * (cost < cost.max()))  # dearer options lose less
        params.append(cost)
        latency.append(cost * rng.uniform(0.5, 1.5, n))
    costs = {"params": params, "latency_ms": latency}
    limits = {"params": 0.6 * sum(c.max() for c in params), "latency_ms": 0.7 * sum(c.max() for c in latency)}
    solution = solve(losses, costs, limits)
    optimum = _brute_force(losses, costs, limits)
    assert solution.feasible
    for k in limits:
        assert solution.totals[k] <= limits[k] + 1e-9
    found = sum(losses[i][j] for i, j in enumerate(solution.choice))
    assert found <= optimum * 1.25 + 1e-9


def test_solver_reports_the_best_reachable_value_when_infeasible():
    losses = [np.array([0.0, 1.0]), np.array([0.0, 2.0])]
    costs = {"params": [np.array([10.0, 4.0]), np.array([10.0, 3.0])]}
    solution = solve(losses, costs, {"params": 5.0})
    assert not solution.feasible and solution.best_reachable["params"] == 7.0


# -- candidate losses ---------------------------------------------------------------------------
def _estimated(weight, approx, s, g):
    diff = (weight - approx).to(torch.float64)
    weighted = torch.movedim(torch.movedim(diff.reshape(diff.shape[0], diff.shape[1], -1), 1, -1) @ s, -1, 1)
    return 0.5 * float(g @ (weighted * weighted).sum((1, 2)))


@pytest.fixture
def layer_data():
    torch.manual_seed(1)
    w = torch.randn(24, 16, 3, 3, dtype=torch.float64)
    x = torch.randn(500, 16, dtype=torch.float64) @ torch.randn(16, 16, dtype=torch.float64)
    s = sqrt_psd(x.T @ x / 500)
    g = torch.rand(24, dtype=torch.float64)
    return w, s, g


def test_svd_loss_is_exactly_the_factorization_error(layer_data):
    w, s, g = layer_data
    ranks = [(4,), (12,), (24,)]
    for (r,), loss in zip(ranks, method_named("svd").estimate_losses(w, s, g, ranks)):
        approx = svd_decompose(w, rank=r, input_sqrt=s).rebuild()
        assert loss == pytest.approx(_estimated(w, approx, s, g), rel=1e-6, abs=1e-9)


def test_spatial_svd_loss_is_exactly_the_factorization_error(layer_data):
    w, s, g = layer_data
    ranks = [(5,), (20,)]
    for (r,), loss in zip(ranks, method_named("spatial-svd").estimate_losses(w, s, g, ranks)):
        approx = spatial_svd_decompose(w, rank=r, input_sqrt=s).rebuild()
        assert loss == pytest.approx(_estimated(w, approx, s, g), rel=1e-6)


def test_tucker2_loss_bounds_the_refined_factorization(layer_data):
    w, s, g = layer_data
    ranks = [(4, 6), (8, 12), (16, 24)]
    losses = method_named("tucker2").estimate_losses(w, s, g, ranks)
    assert losses[0] > losses[1] > losses[2] == pytest.approx(0, abs=1e-9)
    for rank, loss in zip(ranks[:2], losses[:2]):
        approx = tucker2_decompose(w, ranks=rank, input_sqrt=s, als_iters=2).rebuild()
        actual = _estimated(w, approx, s, g)
        assert actual <= loss * 1.05 and actual >= 0.3 * loss  # HOOI only refines the HOSVD estimate


# -- memory -------------------------------------------------------------------------------------
def test_activation_memory_counts_the_residual_branch(net, tmp_path):
    model, calib = net
    rankfold.export_onnx(model, tmp_path / "r.onnx", example_input=calib[:1])
    graph = load_onnx(tmp_path / "r.onnx")
    profile = activation_profile(graph, calib[:1])
    conv1 = next(n for n in profile.base if "conv1" in n)
    conv2 = next(n for n in profile.base if "conv2" in n)
    # the stem's (relu'd) output is conv1's input and waits for the Add: alive all through conv2
    assert profile.base[conv1] == 0 and profile.input_kept[conv1]
    assert profile.base[conv2] == 32 * 100 and not profile.input_kept[conv2]
    assert profile.graph_wide


# -- planning end to end ---------------------------------------------------------------------------
def test_plan_meets_a_parameter_budget_and_apply_matches_it(net, tmp_path):
    model, calib = net
    plan = make_plan(model, calib=calib, target="cortex-m4", budgets={"params": "40%"}, min_rank=4)
    assert plan.feasible and plan.after["params"] <= plan.limits["params"]
    assert plan.limits["params"] == pytest.approx(0.4 * plan.before["params"])
    assert any(layer.method != "none" for layer in plan.layers)
    plan.save(tmp_path / "plan.json")
    loaded = load_plan(tmp_path / "plan.json")
    compressed, report = apply_plan(model, loaded, calib=calib)
    assert sum(p.numel() for p in compressed.parameters()) == plan.after["params"]
    again, _ = apply_plan(model, loaded, calib=calib)
    for a, b in zip(compressed.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)  # deterministic
    assert agreement(model, compressed, calib).rel_output_error < 0.5


def test_tighter_budget_never_lowers_the_estimated_loss(net):
    model, calib = net
    from rankfold.planner.pricing import price_model

    pricing = price_model(model, calib=calib, target="cortex-m4", min_rank=4)
    losses = [pricing.plan({"params": f"{p}%"}).est_loss for p in (90, 60, 40, 25)]
    assert losses == sorted(losses)


def test_infeasible_budget_says_what_can_be_reached(net):
    model, calib = net
    plan = make_plan(model, calib=calib, target="cortex-m4", budgets={"params": "0.5%"})
    assert not plan.feasible
    assert any("smallest reachable" in m for m in plan.messages)


def test_target_ram_limit_is_respected_or_reported(net, tmp_path):
    model, calib = net
    path = tmp_path / "tiny.toml"
    path.write_text('name = "tiny"\nram_bytes = 100\nclock_hz = 1e8\nlatency = "model"\nweight_bits = [8]\n'
                    "activation_bits = 8\n[cycles_per_mac]\nconv = 1\npointwise = 1\ndepthwise = 1\nlinear = 1\n")
    plan = make_plan(model, calib=calib, target=str(path))
    assert not plan.feasible and any("ram_bytes cannot be met" in m for m in plan.messages)


def test_host_plan_is_timed_in_onnxruntime(net, tmp_path, monkeypatch):
    monkeypatch.setenv("RANKFOLD_CACHE_DIR", str(tmp_path))
    model, calib = net
    plan = make_plan(model, calib=calib, target="host", budgets={"params": "50%"}, min_rank=4)
    assert plan.latency_source.startswith("onnxruntime")
    assert plan.after["latency_ms"] > 0 and "latency_ms_estimated" in plan.after
    assert list(tmp_path.glob("latency-*.json"))  # measurements are cached


def test_plan_for_another_model_is_refused(net):
    model, calib = net
    plan = make_plan(model, calib=calib, target="cortex-m4", budgets={"params": "50%"}, min_rank=4)
    other = Residual()
    other.conv1 = nn.Conv2d(32, 40, 3, padding=1)
    with pytest.raises(RankfoldError, match="does not match"):
        apply_plan(other, plan, calib=calib)


def test_compress_api_plans_checks_and_refuses(net):
    model, calib = net
    out = rankfold.compress(model, calib=calib, target="cortex-m4", max_params="50%", min_rank=4,
                            min_agreement=0.0)
    assert out.rankfold_plan.after["params"] <= 0.5 * out.rankfold_plan.before["params"]
    assert out.rankfold_check is not None and out.rankfold_check.samples == 16
    with pytest.raises(RankfoldError, match="self-check failed"):
        rankfold.compress(model, calib=calib, target="cortex-m4", max_params="50%", min_rank=4, min_agreement=1.01)


def test_plan_json_is_readable_and_complete(net, tmp_path):
    model, calib = net
    plan = make_plan(model, calib=calib, target="cortex-m7", budgets={"weight_bytes": "30%"}, min_rank=4)
    plan.save(tmp_path / "p.json")
    raw = json.loads((tmp_path / "p.json").read_text())
    assert raw["format"] == "rankfold-plan/1"
    for layer in raw["layers"]:
        assert {"name", "method", "ranks", "est_loss", "params", "weight_bytes", "macs", "latency_ms",
                "ram_bytes", "note"} <= set(layer)
        assert layer["method"] != "none" or layer["note"]


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["layers"][1].update(method="magic"), "unknown method"),
    (lambda p: p["layers"][1].update(method="tucker2", ranks=[3]), "takes 2 positive integer ranks"),
    (lambda p: p.update(format="other"), "not a rankfold plan"),
    (lambda p: p.pop("layers"), "malformed"),
])
def test_bad_plan_files_are_refused(net, tmp_path, edit, message):
    model, calib = net
    plan = make_plan(model, calib=calib, target="cortex-m4", budgets={"params": "50%"}, min_rank=4)
    raw = plan.to_dict()
    edit(raw)
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(RankfoldError, match=message):
        load_plan(tmp_path / "bad.json")


# -- measured losses --------------------------------------------------------------------------
def test_measured_loss_grows_as_the_rank_shrinks_and_vanishes_at_full_rank(net):
    from rankfold.planner.pricing import price_model

    model, calib = net
    pricing = price_model(model, calib=calib, target="cortex-m4", min_rank=4)
    probe = pricing.probe
    assert probe is not None  # a classifier with calibration data is probed
    kl = [probe.measure("conv1", ("svd", (r,)), 1.0) for r in (1, 8, 32)]
    assert kl[0] > kl[1] > kl[2] >= 0
    assert probe.measure("conv1", ("svd", (48,)), 1.0) < 1e-9  # full rank: the same network
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe.measure("conv2", ("svd", (4,)), 1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights restored


def test_only_outlier_measurements_raise_the_estimate():
    from rankfold.planner.probe import OUTLIER, LossProbe

    probe = LossProbe.__new__(LossProbe)
    probe.values, probe.typical, probe.outlier, probe.carries_up = {}, None, OUTLIER, False
    # four layers measured at 2x their estimates, one at 100x (where the estimate broke down)
    for i in range(4):
        probe.record(f"l{i}", ("svd", (8,)), 2e-3, 1e-3)
    probe.record("bad", ("svd", (8,)), 1e-1, 1e-3)
    assert 100 / 2 > OUTLIER
    assert probe.structural_loss("l0", ("svd", (8,)), 1e-3) == 1e-3  # typical ratio: estimate kept
    assert probe.structural_loss("bad", ("svd", (8,)), 1e-3) == pytest.approx(5e-2)  # 1e-1 / median 2
    assert probe.structural_loss("bad", ("svd", (4,)), 2e-3) == pytest.approx(5e-2)  # lower rank: at least
    assert probe.structural_loss("bad", ("svd", (16,)), 5e-4) == 5e-4  # higher rank: not raised
    assert probe.structural_loss("bad", ("tucker2", (4, 4)), 3e-3) == 3e-3  # other method: not raised


def test_a_map_output_weighs_each_channel_in_its_own_units():
    """A detector head: 4 box coordinates in pixels beside 80 class scores in [0, 1]. The Fisher
    of each channel is 1 / its spread^2, so a score channel counts as much as a coordinate one."""
    from rankfold.gauss_newton import channel_spread, likelihood_loss

    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(16, 4, 64, generator=g) * 320
    scores = torch.rand(16, 80, 64, generator=g) * 0.05
    out = torch.cat([boxes, scores], 1).requires_grad_(True)
    likelihood_loss(out, torch.Generator().manual_seed(1)).backward()
    fisher = (out.grad.double() ** 2).mean((0, 2))
    normalized = fisher * channel_spread(out.detach()).reshape(-1).double() ** 2
    assert torch.allclose(normalized, torch.ones(84, dtype=torch.float64), rtol=0.2)
    assert fisher[4:].min() > 1e6 * fisher[:4].max()  # a score unit weighs far more than a pixel
    constant = torch.cat([boxes, torch.full((16, 1, 64), 5.0)], 1)  # a constant channel is not made decisive
    assert channel_spread(constant).reshape(-1)[4] >= 0.5 - 1e-6


def test_a_plan_that_computes_more_than_the_original_says_so_unless_macs_or_latency_were_budgeted():
    """A size budget alone may pick factorizations that compute more: the plan says so, with the
    option that stops it."""
    from types import SimpleNamespace

    from rankfold.planner.choose import _messages

    pricing = SimpleNamespace(before={"macs": 100, "weight_bytes": 1000}, timing=None, layer_names=[],
                              activations=SimpleNamespace(graph_wide=True))
    solution = SimpleNamespace(best_reachable={})

    def said(limits, macs_after):
        after = {"macs": macs_after, "weight_bytes": 100, "latency_ms": 1.0}
        return [m for m in _messages(pricing, limits, after, solution) if "MACs" in m]

    assert said({"weight_bytes": 100}, 121) == [
        "this plan computes 121% of the original's MACs: no MAC or latency budget was given (--max-macs 100% keeps "
        "them from rising)"]
    assert said({"weight_bytes": 100}, 100) == []
    assert said({"weight_bytes": 100, "macs": 150}, 121) == []
    assert said({"latency_ms": 5.0}, 121) == []
