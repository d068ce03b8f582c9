"""One registry, one file per method (issue 15): a method defined in this file alone is planned,
applied, written to a plan file and used in uniform mode; CP, which has no closed-form loss
estimate, is priced by factorizing and planned from a target that lists only it."""

import contextlib
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from rankfold.apply import compress_with_report
from rankfold.errors import RankfoldError
from rankfold.methods import method_names, register, unregister
from rankfold.methods.svd import SVDMethod
from rankfold.planner.plan import apply_plan, load_plan
from rankfold.planner.pricing import make_plan
from rankfold.target import load_target


@dataclass(frozen=True)
class ToyConfig:
    rank: int | None = None
    keep: float | None = None


class ToySVD(SVDMethod):
    """SVD's factors under another name, with no closed-form estimate: everything about it that
    rankfold needs is here."""

    name = "toy-svd"
    config_type = ToyConfig
    rank_count = 1
    auto_max_work = None
    estimate_losses = None

    def config(self, ranks):
        return ToyConfig(rank=ranks[0])

    def config_rank(self, config):
        return None if config.rank is None else (config.rank,)


@contextlib.contextmanager
def registered(method):
    register(method)
    try:
        yield method
    finally:
        unregister(method.name)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def target_listing(tmp_path, *methods: str):
    text = (load_target_text("cortex-m4").replace('name = "cortex-m4"', 'name = "only"')
            .replace('methods = ["svd", "tucker2", "spatial-svd"]', f"methods = {list(methods)!r}".replace("'", '"')))
    path = tmp_path / "only.toml"
    path.write_text(text)
    return load_target(str(path))


def load_target_text(name: str) -> str:
    from importlib import resources

    return (resources.files("rankfold") / "targets" / f"{name}.toml").read_text()


@pytest.mark.parametrize("method", ["toy-svd", "cp"])
def test_a_method_from_one_file_is_planned_applied_and_saved(tmp_path, method):
    context = registered(ToySVD()) if method == "toy-svd" else contextlib.nullcontext()
    with context:
        assert method in method_names()
        target = target_listing(tmp_path, method)
        assert target.methods == (method,)
        model, calib = net(), torch.randn(64, 3, 8, 8)
        plan = make_plan(model, calib=calib, target=target, budgets={"params": "60%"}, min_rank=2)
        chosen = [layer for layer in plan.layers if layer.method == method]
        assert plan.feasible and chosen, [(lay.name, lay.method, lay.note) for lay in plan.layers]
        assert all(layer.est_loss > 0 for layer in chosen)  # priced, not skipped
        plan.save(tmp_path / "plan.json")
        again = load_plan(tmp_path / "plan.json")
        module, report = apply_plan(model, again, calib=calib)
        applied = {r.name: r for r in report.layers}
        for layer in chosen:
            assert applied[layer.name].method == method and list(applied[layer.name].ranks) == layer.ranks
        with torch.no_grad():
            assert module(calib[:4]).shape == (4, 10)
        if method == "toy-svd":
            _uniform, uniform_report = compress_with_report(model, method="toy-svd", keep=0.5, calib=calib,
                                                            min_rank=2)
            assert any(r.method == "toy-svd" for r in uniform_report.layers)
    assert "toy-svd" not in method_names()


def test_an_unregistered_method_is_refused_everywhere(tmp_path):
    with pytest.raises(RankfoldError, match="toy-svd"):
        target_listing(tmp_path, "toy-svd")
    with pytest.raises(RankfoldError, match="toy-svd"):
        compress_with_report(net(), method="toy-svd", keep=0.5)
    with pytest.raises(ValueError, match="already registered"):
        register(SVDMethod())
