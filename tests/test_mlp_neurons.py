"""Feed-forward neuron pruning (rankfold.mlp_neurons, compress --mlp-keep): the neurons chosen,
the refit, the pruned model's shapes and saved config, the check that neurons act one by one,
and the CLI's refusals."""

import copy
import json

import pytest
import torch
from torch import nn

import rankfold
from rankfold.check_rules import CheckRule
from rankfold.mlp_neurons import neurons_to_keep, prune_mlp_neurons, refitted_columns

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tests.test_causal_lm import _windows  # noqa: E402 (after the optional extras are found)
from tests.test_hf import _sentences  # noqa: E402


def _output_error(weight, kept_weight, kept, h):
    return float((h @ weight.T - h[:, kept] @ kept_weight.T).norm() / (h @ weight.T).norm())


def test_redundant_neurons_go_first_and_the_refit_absorbs_them():
    torch.manual_seed(0)
    base = torch.randn(4000, 12)
    mix = torch.randn(12, 8)  # 20 neurons of rank 12: any 12 that span it carry everything
    h = torch.cat([base, base @ mix], 1).double()
    weight = torch.randn(6, 20).double()
    moments = h.T @ h / len(h)
    kept = neurons_to_keep(weight, moments, 12)
    assert len(kept) == 12 and torch.equal(kept, kept.sort().values)
    refit = refitted_columns(weight, moments, kept)
    assert _output_error(weight, refit, kept, h) < 0.01  # damping's bias only
    assert _output_error(weight, weight[:, kept], kept, h) > 0.2  # without the refit, a fifth and more is lost
    # fewer neurons than the data's rank: still better than as many dropped at random
    kept = neurons_to_keep(weight, moments, 8)
    chosen = _output_error(weight, refitted_columns(weight, moments, kept), kept, h)
    rng = torch.Generator().manual_seed(1)
    for _ in range(5):
        other = torch.randperm(20, generator=rng)[:8].sort().values
        assert chosen <= _output_error(weight, refitted_columns(weight, moments, other), other, h) + 1e-9


def _ffn_outputs(model):
    return [n for n, _m in model.named_modules() if n.endswith(".output.dense") and "attention" not in n]


def test_an_encoder_keeps_half_its_neurons_and_saves_a_directory_that_loads_at_that_width(encoder_dir, tmp_path):
    from rankfold.frontends.hf import load_hf, tokenize

    model = load_hf(encoder_dir)
    calib, held = tokenize(encoder_dir, _sentences(128, 3), 16), tokenize(encoder_dir, _sentences(64, 4), 16)
    pruned, info = prune_mlp_neurons(model, 0.5, calib)
    assert info == {"family": "BERT-style encoders", "blocks": 2, "width": 96, "kept": 48,
                    "config_key": "intermediate_size"}
    assert [m.out_features for n, m in pruned.named_modules() if n.endswith("intermediate.dense")] == [48, 48]
    assert [model.get_submodule(n).in_features for n in _ffn_outputs(model)] == [96, 96]  # the original untouched
    # the refit makes up for much of what the neurons carried: against dropping them without it
    naive = copy.deepcopy(pruned)
    for name in _ffn_outputs(naive):
        rows = model.get_submodule(name.replace("output.dense", "intermediate.dense")).weight
        kept = [int((rows == r).all(1).nonzero()) for r in
                naive.get_submodule(name.replace("output.dense", "intermediate.dense")).weight]
        naive.get_submodule(name).weight.data = model.get_submodule(name).weight.data[:, kept].clone()
    with torch.no_grad():
        want = model(held)
        cos_refit = nn.functional.cosine_similarity(pruned(held), want).mean()
        cos_plain = nn.functional.cosine_similarity(naive(held), want).mean()
    assert cos_refit > cos_plain
    # through the planner: budgets in % are of the original, the check compares with the original
    result = rankfold.compress_to_budget(model, calib=calib, budgets={"params": "90%"}, bits=32, min_rank=2,
                                         rules=(CheckRule("cosine", 0.3),), mlp_keep=0.5)
    total = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in result.module.parameters()) <= 0.9 * total
    assert result.mlp_pruning["kept"] == 48 and any("pruning" in m for m in result.plan.messages)
    out = tmp_path / "saved"
    rankfold.save_compressed(result, out, hf_source=encoder_dir)
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 48
    assert json.loads((encoder_dir / "config.json").read_text())["intermediate_size"] == 96
    loaded = rankfold.load_compressed(out)
    with torch.no_grad():
        assert torch.allclose(loaded(held), result.module(held), atol=1e-5)
    # and as an ONNX file that onnxruntime runs at the pruned width
    from rankfold.runtime import session

    result.save(tmp_path / "pruned.onnx")
    runner = session(str(tmp_path / "pruned.onnx"))
    got = runner.run(None, {runner.get_inputs()[0].name: held.numpy()})[0]
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(got), result.module(held), atol=1e-4)


class _Mixing(nn.Module):
    """A block named like BERT's whose hidden neurons are mixed (a softmax across them)."""

    def __init__(self):
        super().__init__()
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(8, 16)
        self.output = nn.Module()
        self.output.dense = nn.Linear(16, 8)

    def forward(self, x):
        return self.output.dense(torch.softmax(self.intermediate.dense(x), -1))


def test_a_block_whose_neurons_mix_is_refused():
    model = nn.Sequential(_Mixing())
    with pytest.raises(rankfold.RankfoldError, match="do not act one by one"):
        prune_mlp_neurons(model, 0.5, torch.randn(32, 8))
    with pytest.raises(rankfold.RankfoldError, match="no feed-forward block"):
        prune_mlp_neurons(nn.Sequential(nn.Linear(8, 8)), 0.5, torch.randn(32, 8))
    with pytest.raises(rankfold.RankfoldError, match="between 0 and 1"):
        prune_mlp_neurons(model, 1.0, torch.randn(32, 8))


def test_the_cli_prunes_a_language_model_then_plans_and_the_result_loads(lm_dir, tmp_path, capsys):
    from rankfold.cli import main
    from rankfold.frontends.hf import load_hf, perplexity

    out = tmp_path / "small"
    code = main(["compress", str(lm_dir), "--calib-text", str(lm_dir / "calib.txt"), "--seq-len", "16",
                 "--samples", "128", "--max-params", "85%", "--mlp-keep", "0.5", "--check", "perplexity:3",
                 "-o", str(out), "--report", str(tmp_path / "r.json"), "-q"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "feed-forward blocks: 2 keep 64 of 128 hidden neurons" in printed
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["mlp_pruning"]["kept"] == 64 and report["params_after"] <= 0.85 * report["params_before"]
    loaded = rankfold.load_compressed(out)
    assert [m.out_features for n, m in loaded.named_modules() if n.endswith("mlp.gate_proj")] == [64, 64]
    held = _windows(lm_dir, "held.txt", 32)
    assert perplexity(loaded, held) < 3 * perplexity(load_hf(lm_dir), held)



def test_feature_matching_after_pruning_matches_only_layers_of_the_original_width(lm_dir, tmp_path, capsys):
    """Fine-tuning with feature matching after --mlp-keep: a pruned projection's output is narrower
    than the original's and is not matched (it broke the first step with a size mismatch)."""
    from rankfold.cli import main

    code = main(["compress", str(lm_dir), "--calib-text", str(lm_dir / "calib.txt"), "--seq-len", "16",
                 "--samples", "128", "--max-params", "70%", "--mlp-keep", "0.5", "--check", "perplexity:100",
                 "--train-text", str(lm_dir / "calib.txt"), "--finetune-steps", "2", "--finetune-feature-weight", "1",
                 "-o", str(tmp_path / "small")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "feature matching at" in captured.err + captured.out and "fine-tuned 2 steps" in captured.out

@pytest.mark.parametrize("case,extra,message", [
    ("outside (0, 1)", ["--max-params", "80%", "--mlp-keep", "1"], "between 0 and 1"),
    ("uniform mode", ["--keep", "0.5", "--mlp-keep", "0.5"], "--mlp-keep prunes before the planner"),
    ("a fraction of MACs", ["--max-macs", "50%", "--mlp-keep", "0.5"], "--max-macs 50%: with --mlp-keep"),
])
def test_the_cli_refuses_mlp_keep_where_it_cannot_work(lm_dir, tmp_path, capsys, case, extra, message):
    from rankfold.cli import main

    try:
        code = main(["compress", str(lm_dir), "--calib-text", str(lm_dir / "calib.txt"), "--seq-len", "16",
                     "-o", str(tmp_path / "out"), "-q", *extra])
    except SystemExit as exit_info:  # argparse refuses a bad value itself
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_the_cli_refuses_mlp_keep_for_an_onnx_model(tmp_path, capsys):
    from rankfold.cli import main

    (tmp_path / "m.onnx").write_bytes(b"refused before it is read")
    code = main(["compress", str(tmp_path / "m.onnx"), "--max-params", "50%", "--mlp-keep", "0.5",
                 "-o", str(tmp_path / "o.onnx")])
    assert code == 2 and "--mlp-keep prunes the feed-forward blocks" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


def test_budgets_in_percent_resolve_on_the_original_or_are_refused():
    from rankfold.planner.pipeline import budgets_of_original

    model = nn.Sequential(nn.Linear(10, 10, bias=False))  # 100 parameters, 400 float32 bytes
    assert budgets_of_original(model, {"params": "50%", "weight_bytes": "25%", "macs": "1000"}) == \
        {"params": "50", "weight_bytes": "100", "macs": "1000"}
    with pytest.raises(rankfold.RankfoldError, match=r"max_macs \(mlp_keep\) 50%: with --mlp-keep"):
        budgets_of_original(model, {"macs": "50%"})


def test_block_by_block_statistics_prune_as_prefix_passes_do(lm_dir, monkeypatch):
    """The held hidden states (one pass through each block) give the neurons and refit that
    passes from the input would: the same pruned decoder."""
    import rankfold.mlp_neurons as mlp_neurons
    from rankfold.frontends.hf import load_hf

    model, calib = load_hf(lm_dir), _windows(lm_dir, "calib.txt", 16)
    lines: list[str] = []
    held, _ = prune_mlp_neurons(model, 0.5, calib, progress=lines.append)
    assert any(line.startswith("layer inputs block by block") for line in lines)
    monkeypatch.setattr(mlp_neurons.BlockInputs, "for_model", classmethod(lambda *_a, **_k: None))
    prefix, _ = prune_mlp_neurons(model, 0.5, calib)
    for (name, a), (_, b) in zip(held.state_dict().items(), prefix.state_dict().items()):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5), name
