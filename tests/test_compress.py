import pytest
import torch
from torch import nn

import rankfold
from rankfold import CPConfig, SkipConfig, SpatialSVDConfig, SVDConfig, Tucker2Config
from rankfold.layers import LowRank

CONV_GEOMETRIES = [
    dict(stride=1, padding=1),
    dict(stride=2, padding=1),
    dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
    dict(stride=1, padding=2, dilation=2),
    dict(stride=1, padding=1, padding_mode="reflect"),
    dict(stride=2, padding=1, padding_mode="circular"),
    dict(stride=1, padding=1, padding_mode="replicate"),
    dict(stride=1, padding="same"),
    dict(stride=3, padding=0, bias=False),
]

FULL_RANK_CONFIGS = {
    "svd": SVDConfig(rank=10),
    "tucker2": Tucker2Config(ranks=(6, 10)),
    "spatial-svd": SpatialSVDConfig(rank=min(6 * 3, 10 * 3)),
}


def rel_err(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("geometry", CONV_GEOMETRIES)
@pytest.mark.parametrize("method", list(FULL_RANK_CONFIGS))
def test_full_rank_factorization_reproduces_conv_output(geometry, method):
    layer = nn.Conv2d(6, 10, 3, **geometry)
    model = nn.Sequential(layer)
    x = torch.randn(4, 6, 11, 13)
    out = rankfold.compress(model, layers={"*": FULL_RANK_CONFIGS[method]}, min_rank=1)
    assert isinstance(out[0], LowRank) and out[0].method == method
    assert rel_err(out(x), model(x)) < 1e-5


@pytest.mark.parametrize("geometry", CONV_GEOMETRIES[:5])
def test_cp_layers_keep_conv_geometry(geometry):
    """CP is not exact at any small rank; an exactly rank-4 kernel must still be reproduced."""
    layer = nn.Conv2d(6, 10, 3, **geometry)
    gen = torch.Generator().manual_seed(1)
    factors = [torch.randn(n, 4, generator=gen) for n in (10, 6, 3, 3)]
    with torch.no_grad():
        layer.weight.copy_(torch.einsum("ar,br,cr,dr->abcd", *factors))
    model = nn.Sequential(layer)
    x = torch.randn(2, 6, 12, 12)
    out = rankfold.compress(model, layers={"*": CPConfig(rank=4, max_iters=300)}, min_rank=1)
    assert [type(m) for m in out[0]] == [nn.Conv2d] * 4
    assert rel_err(out(x), model(x)) < 1e-3


def test_conv1d_and_linear_full_rank():
    model = nn.Sequential(nn.Conv1d(5, 8, 5, stride=2, padding=2, dilation=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 8, 7))
    x = torch.randn(3, 5, 16)
    out = rankfold.compress(model, layers={"0": Tucker2Config(ranks=(5, 8)), "3": SVDConfig(rank=7)}, min_rank=1)
    assert rel_err(out(x), model(x)) < 1e-5
    assert isinstance(out[0][1], nn.Conv1d) and isinstance(out[3], LowRank)


def test_grouped_and_depthwise_convs_are_left_alone_with_reason():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 3, groups=2), nn.Conv2d(16, 32, 3))
    out, report = rankfold.compress_with_report(model, keep=0.5)
    notes = {r.name: r for r in report.layers}
    assert notes["0"].method == "none" and "groups=8" in notes["0"].note
    assert notes["1"].method == "none" and "groups=2" in notes["1"].note
    assert notes["2"].method == "tucker2"
    assert out[0] is not model[0] and isinstance(out[0], nn.Conv2d)


def test_every_layer_appears_in_the_report():
    model = nn.Sequential(nn.Conv2d(1, 32, 3), nn.Conv2d(32, 64, 3), nn.Flatten(), nn.Linear(64, 10))
    _, report = rankfold.compress_with_report(model, keep=0.3)
    assert [r.name for r in report.layers] == ["0", "1", "3"]
    small = [r for r in report.layers if r.method == "none"]
    assert small and all("min_rank" in r.note for r in small)


def test_input_model_is_not_modified():
    model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rankfold.compress(model, keep=0.3, calib=torch.randn(16, 16, 10, 10))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model[0], nn.Conv2d)


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp", "spatial-svd", "auto"])
def test_keep_bounds_the_parameters(method):
    model = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1))
    out, report = rankfold.compress_with_report(model, method=method, keep=0.4)
    for record in report.layers:
        assert record.method != "none", record.note
        assert record.params_after <= 0.4 * record.params_before + 64  # the bias is kept whole
    assert sum(p.numel() for p in out.parameters()) <= 0.41 * sum(p.numel() for p in model.parameters())


def test_data_aware_compression_tracks_the_output_better():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, padding=1))
    # inputs live in a low-dimensional subspace, as real activations do
    basis = torch.randn(3, 3)
    calib = torch.einsum("nchw,cd->ndhw", torch.randn(64, 3, 12, 12) * torch.tensor([3.0, 0.3, 0.01])[None, :, None,
                                                                                                         None], basis)
    test = torch.einsum("nchw,cd->ndhw", torch.randn(32, 3, 12, 12) * torch.tensor([3.0, 0.3, 0.01])[None, :, None,
                                                                                                        None], basis)
    plain = rankfold.compress(model, keep=0.25)
    aware = rankfold.compress(model, keep=0.25, calib=calib)
    reference = model(test)
    assert rel_err(aware(test), reference) < rel_err(plain(test), reference)


def test_auto_picks_a_fitting_method_per_layer():
    model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.Conv2d(32, 32, 1), nn.Flatten(), nn.Linear(32 * 36, 64))
    _, report = rankfold.compress_with_report(model, method="auto", keep=0.5)
    methods = {r.name: r.method for r in report.layers}
    assert methods["0"] in {"svd", "tucker2", "cp", "spatial-svd"}
    assert methods["1"] == "svd" and methods["3"] == "svd"


def test_skip_config_and_patterns():
    model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.Conv2d(32, 32, 3))
    _, report = rankfold.compress_with_report(model, layers={"1": SkipConfig(reason="keep it")}, keep=0.5)
    assert report.layers[1].method == "none" and report.layers[1].note == "keep it"
    assert report.layers[0].method == "tucker2"


@pytest.mark.parametrize("kwargs, message", [
    (dict(keep=0.0), "keep must be a number in (0, 1]"),
    (dict(keep=1.5), "keep must be a number in (0, 1]"),
    (dict(method="magic"), "unknown method 'magic'"),
    (dict(calib=torch.randn(4, 5, 8, 8)), "does not fit the model"),
    (dict(calib=[1, 2]), "calib must be a torch.Tensor"),
])
def test_bad_arguments_raise_one_clear_error(kwargs, message):
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3))
    with pytest.raises(rankfold.RankfoldError, match=message.replace("(", r"\(").replace(")", r"\)")):
        rankfold.compress(model, **kwargs)


def test_bad_config_values_name_the_parameter():
    with pytest.raises(ValueError, match="Tucker2Config.ranks"):
        Tucker2Config(ranks=(3,))
    with pytest.raises(ValueError, match="SVDConfig.rank"):
        SVDConfig(rank=-1)
    with pytest.raises(ValueError, match="CPConfig.keep"):
        CPConfig(keep=2.0)


def test_vbmf_ranks_follow_the_weights():
    from rankfold.config import VBMF

    torch.manual_seed(0)
    conv = nn.Conv2d(32, 48, 3, padding=1)
    with torch.no_grad():  # a rank-6 (output) x rank-5 (input) weight plus a little noise
        core = torch.randn(6, 5, 3, 3)
        w = torch.einsum("or,rskl,si->oikl", torch.randn(48, 6), core, torch.randn(5, 32))
        conv.weight.copy_(w + 0.01 * torch.randn_like(w))
    model = nn.Sequential(conv)
    out = rankfold.compress(model, layers={"*": Tucker2Config(ranks=VBMF)})
    record = out.rankfold_report.layers[0]
    assert record.method == "tucker2" and record.ranks == (5, 6) and "vbmf" in record.note
    svd = rankfold.compress(model, layers={"*": SVDConfig(rank=VBMF)}).rankfold_report.layers[0]
    assert svd.method == "svd" and svd.ranks[0] <= 30


def test_vbmf_ranks_are_taken_from_the_original_weights_and_always_build():
    from rankfold.config import VBMF

    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 8, 1))
    calib = torch.randn(16, 1, 8, 8)
    out = rankfold.compress(model, layers={"*": Tucker2Config(ranks=VBMF)}, calib=calib)
    for record in out.rankfold_report.layers:
        assert "vbmf ranks" in record.note
        if record.method == "tucker2":
            r_in, r_out = record.ranks
            assert r_out <= r_in * 9 and r_in <= r_out * 9
    assert out(calib).shape == (16, 8, 8, 8)


def test_fewer_calibration_rows_than_inputs_do_not_erase_unseen_directions():
    # 24 calibration samples for 96 inputs: the rows span a quarter of the input space. The
    # compensation must leave the unseen directions alone (it once mapped them to zero).
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(96, 40), nn.ReLU(), nn.Linear(40, 10))
    calib, fresh = torch.randn(24, 96), torch.randn(500, 96)
    aware = rankfold.compress(model, method="svd", keep=1.0, calib=calib,
                              layers={"0": rankfold.SVDConfig(rank=36), "*": rankfold.SkipConfig()})
    free = rankfold.compress(model, method="svd", keep=1.0, calib=None,
                             layers={"0": rankfold.SVDConfig(rank=36), "*": rankfold.SkipConfig()})
    with torch.no_grad():
        ref = model(fresh)
        err_aware = torch.linalg.norm(aware(fresh) - ref) / torch.linalg.norm(ref)
        err_free = torch.linalg.norm(free(fresh) - ref) / torch.linalg.norm(ref)
    assert err_aware < 2 * err_free + 0.05


def test_uniform_mode_refuses_what_only_the_planner_uses_and_checks_on_request():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    calib = torch.randn(32, 32)
    with pytest.raises(rankfold.RankfoldError, match="bits is the planner's"):
        rankfold.compress(model, keep=0.5, calib=calib, bits=8)
    with pytest.raises(rankfold.RankfoldError, match="min_agreement is the self-check's"):
        rankfold.compress(model, keep=0.5, calib=calib, min_agreement=0.9)
    with pytest.raises(rankfold.RankfoldError, match="self-check failed"):  # rank 4 and 1 of a random net: refused
        rankfold.compress(model, method="svd", keep=0.2, calib=calib, min_rank=1, check=True, min_agreement=1.0)
    with pytest.raises(rankfold.RankfoldError, match="at least 16 calibration samples"):
        rankfold.compress(model, keep=0.5, calib=calib[:8], check=True)
    small = rankfold.compress(model, method="svd", keep=0.9, calib=calib, min_rank=1, check=True, min_agreement=0.5)
    assert small.rankfold_report.layers


def test_layers_left_alone_are_refit_to_the_inputs_the_compressed_layers_give():
    # Only the first convolution is factorized; the depthwise and the last convolution keep their
    # shape but are refit (per group for the depthwise) to reproduce their original outputs from
    # the compressed inputs: closer to the original than the untouched weights, on fresh data too.
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, groups=32),
                          nn.ReLU(), nn.Conv2d(32, 16, 1)).eval()
    calib, fresh = torch.randn(64, 8, 10, 10), torch.randn(64, 8, 10, 10)
    out = rankfold.compress(model, calib=calib, layers={"0": SVDConfig(rank=3), "*": SkipConfig("kept")})
    notes = {r.name: r.note for r in out.rankfold_report.layers}
    assert "refit" not in notes["0"] and "refit" in notes["2"] and "refit" in notes["4"]
    unrefit = rankfold.compress(model, calib=calib, layers={"0": SVDConfig(rank=3), "*": SkipConfig("kept")})
    unrefit[2].load_state_dict(model[2].state_dict())
    unrefit[4].load_state_dict(model[4].state_dict())
    assert not torch.equal(out[2].weight, model[2].weight) and out[2].weight.shape == model[2].weight.shape
    with torch.no_grad():
        ref = model(fresh)
        refit_error = float((out(fresh) - ref).norm() / ref.norm())
        plain_error = float((unrefit(fresh) - ref).norm() / ref.norm())
    assert refit_error < 0.95 * plain_error  # measured 0.361 against 0.399
    # Too few calibration rows per input (2 samples of 10 x 10 positions: 200 rows for the last
    # layer's 32 inputs) would fit noise: that layer is kept as it was; the depthwise one (1 input
    # per group) is still refit.
    few = rankfold.compress(model, calib=calib[:2], layers={"0": SVDConfig(rank=3), "*": SkipConfig("kept")})
    few_notes = {r.name: r.note for r in few.rankfold_report.layers}
    assert "refit" in few_notes["2"] and "refit" not in few_notes["4"] and torch.equal(few[4].weight, model[4].weight)
    # Nothing changed before a layer: it stays exactly as it was.
    late = rankfold.compress(model, calib=calib, layers={"4": SVDConfig(rank=4), "*": SkipConfig("kept")})
    assert torch.equal(late[0].weight, model[0].weight) and torch.equal(late[2].weight, model[2].weight)


def test_a_long_apply_says_how_far_it_is(monkeypatch):
    from rankfold import apply
    from tests.helpers import tiny_classifier

    monkeypatch.setattr(apply, "PACE_SECONDS", 0.0)  # every layer is "long" here
    lines = []
    model = tiny_classifier()
    x = torch.randn(64, 1, 12, 12)
    rankfold.compress(model, method="svd", keep=0.5, calib=x, min_rank=1, check=False, progress=lines.append)
    paced = [line for line in lines if line.startswith("applying: layer ")]
    assert paced and paced[-1].startswith(f"applying: layer {len(paced)} of ")
