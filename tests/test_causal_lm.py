"""Causal language models (issue 16): a tiny Llama made and briefly trained here (nothing
downloaded) loads from its directory as a module from token ids to next-token logits; the planner
weighs layers by the token KL, the self-check measures held-back perplexity, the head tied to the
embedding stays tied, and the result saves as a directory that loads again; the CLI takes the
directory and calibration text."""

import json
import math
import os

import numpy as np
import pytest
import torch

import rankfold
from rankfold.check_rules import CheckRule

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

WORDS = ("the cat sat on a mat while dogs ran far away from home and we all saw it happen slowly "
         "under bright red sky near old green trees by cold blue water").split()


def _lines(n: int, seed: int) -> list[str]:
    """Sentences with some order to learn: each word is often followed by the next in WORDS."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        i, words = int(torch.randint(len(WORDS), (1,), generator=g)), []
        for _ in range(int(torch.randint(5, 12, (1,), generator=g))):
            words.append(WORDS[i])
            step = 1 if float(torch.rand(1, generator=g)) < 0.8 else int(torch.randint(len(WORDS), (1,), generator=g))
            i = (i + step) % len(WORDS)
        out.append(" ".join(words))
    return out


def make_lm_dir(root):
    """A tiny Llama trained a little on word lines, with its tokenizer, calib.txt and held.txt,
    in `root` (the `lm_dir` fixture of conftest.py)."""
    vocab = ["<unk>", "<s>", "</s>", "\n", *sorted(set(WORDS))]
    words = tokenizers.models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>")
    tokenizer = tokenizers.Tokenizer(words)
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([  # words, and "\n" as a token of its own
        tokenizers.pre_tokenizers.Split("\n", "isolated"), tokenizers.pre_tokenizers.Split(" ", "removed")])
    tokenizer.save(str(root / "tokenizer.json"))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=48, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=2)
    lm = transformers.LlamaForCausalLM(config)
    ids = torch.tensor(sum((e.ids for e in tokenizer.encode_batch([line + "\n" for line in _lines(400, 0)])), []))
    windows = ids[: len(ids) // 16 * 16].reshape(-1, 16)
    optimizer = torch.optim.Adam(lm.parameters(), lr=3e-3)
    for step in range(120):  # a language model with something to lose: perplexity far below the vocabulary's
        batch = windows[torch.randint(len(windows), (32,), generator=torch.Generator().manual_seed(step))]
        loss = lm(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    lm.save_pretrained(root)
    (root / "calib.txt").write_text("\n".join(_lines(300, 1)) + "\n")
    (root / "held.txt").write_text("\n".join(_lines(100, 2)) + "\n")
    return root


def _windows(lm_dir, name: str, count: int):
    from rankfold.frontends.hf import read_texts, text_windows

    return text_windows(lm_dir, read_texts(lm_dir / name), 16, count)


def test_a_causal_lm_loads_from_its_directory_and_predicts_the_next_ids(lm_dir):
    from rankfold.analyze import untouchable_layers
    from rankfold.frontends.hf import CausalLM, load_hf

    model = load_hf(lm_dir)
    assert isinstance(model, CausalLM)
    ids = _windows(lm_dir, "held.txt", 8)
    assert ids.shape == (8, 16) and ids.dtype == torch.int64
    with torch.no_grad():
        logits = model(ids)
    assert logits.shape == (8, 16, model.lm.config.vocab_size)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert math.exp(float(nll)) < model.lm.config.vocab_size / 3  # trained: far better than a uniform guess
    assert "lm.lm_head" in untouchable_layers(model)  # tied to the token embedding
    assert "tied" in untouchable_layers(model)["lm.lm_head"]


def test_the_self_check_measures_held_back_perplexity_and_refuses_a_rise(lm_dir):
    from rankfold.frontends.hf import load_hf
    from rankfold.selfcheck import agreement

    model = load_hf(lm_dir)
    calib, held = _windows(lm_dir, "calib.txt", 96), _windows(lm_dir, "held.txt", 32)
    same = agreement(model, model, held)
    assert same.outputs[0].kind == "next_token"
    assert same.outputs[0].metrics["perplexity"] == pytest.approx(1.0) and same.outputs[0].metrics["kl"] < 1e-9
    small = rankfold.compress_uniform(model, method="svd", keep=0.3, calib=calib, min_rank=2,
                                      rules=(CheckRule("perplexity", 100.0),))
    check = agreement(model, small.module, held).outputs[0].metrics
    with torch.no_grad():  # the ratio, computed here independently
        def nll(m):
            logits = m(held)[:, :-1]
            return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                           held[:, 1:].reshape(-1)))
        expected = math.exp(nll(small.module) - nll(model))
    assert expected > 1.0 and check["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert check["kl"] > 0
    with pytest.raises(rankfold.RankfoldError, match="perplexity"):
        rankfold.compress_uniform(model, method="svd", keep=0.3, calib=calib, min_rank=2,
                                  rules=(CheckRule("perplexity", 1.0 + (expected - 1) / 10),))


def test_the_default_check_of_a_causal_lm_is_its_perplexity_ratio():
    from rankfold.selfcheck import default_rules
    from rankfold.settings import DEFAULT_MAX_PERPLEXITY_RATIO

    assert default_rules("next_token", 0.8, 0.2) == [CheckRule("perplexity", DEFAULT_MAX_PERPLEXITY_RATIO)]


def test_a_planned_causal_lm_saves_and_loads_again_with_its_head_tied(lm_dir, tmp_path):
    from safetensors import safe_open

    from rankfold.frontends.hf import load_hf

    model = load_hf(lm_dir)
    calib = _windows(lm_dir, "calib.txt", 96)
    result = rankfold.compress_to_budget(model, calib=calib, budgets={"params": "90%"}, bits="auto", min_rank=2,
                                         rules=(CheckRule("perplexity", 100.0),))
    assert result.plan.feasible and "lm.lm_head" not in {x.name for x in result.plan.layers if x.method != "none"}
    out = tmp_path / "saved"
    rankfold.save_compressed(result, out, hf_source=lm_dir)
    again = rankfold.load_compressed(out)
    assert again.lm.lm_head.weight is again.lm.model.embed_tokens.weight  # the tie holds
    with safe_open(str(out / "model.safetensors"), "np") as handle:
        names = set(handle.keys())
    assert "lm.model.embed_tokens.weight" in names and "lm.lm_head.weight" not in names  # stored once
    ids = _windows(lm_dir, "held.txt", 4)
    with torch.no_grad():
        want = result.module(ids) if not result.quantized else None
        got = again(ids)
    if want is not None:
        torch.testing.assert_close(got, want)
    assert got.shape == (4, 16, model.lm.config.vocab_size) and bool(torch.isfinite(got).all())


def test_the_cli_compresses_a_model_directory_on_calibration_text(lm_dir, tmp_path, capsys):
    from rankfold.cli import main

    out = tmp_path / "small"
    code = main(["compress", str(lm_dir), "--calib-text", str(lm_dir / "calib.txt"), "--seq-len", "16",
                 "--samples", "96", "--max-params", "90%", "--bits", "32", "--min-rank", "2",
                 "--check", "perplexity:100", "-o", str(out), "-q"])
    printed = capsys.readouterr().out
    assert code == 0 and "perplexity" in printed and f"wrote {out}" in printed
    loaded = rankfold.load_compressed(out)
    assert sum(p.numel() for p in loaded.parameters()) < sum(
        p.numel() for p in rankfold.frontends.hf.load_hf(lm_dir).parameters())


@pytest.mark.parametrize("case, message", [
    ("inside", "the model's own directory"),
    ("npz", "--calib: not available for a model directory"),
    ("notext", "calibrates on text"),
    ("train-without-length", "--train-text fine-tunes the result: say how long"),
    ("length-without-train", "--finetune-steps need --train-text FILE|DIR"),
    ("train-missing", "--train-text"),
    ("train-bad-device", "expected cpu, cuda or cuda:N"),
    ("train-too-short", "larger than the training set"),
])
def test_the_cli_refuses_a_model_directory_run_that_cannot_work_before_any_work(lm_dir, tmp_path, capsys, case,
                                                                              message):
    from rankfold.cli import main

    before = sorted(os.listdir(lm_dir))
    text = ["--calib-text", str(lm_dir / "calib.txt"), "-o", str(tmp_path / "o")]
    args = {"inside": ["--calib-text", str(lm_dir / "calib.txt"), "-o", str(lm_dir / "out")],
            "npz": ["--calib", str(tmp_path / "c.npz"), "-o", str(tmp_path / "o")],
            "notext": ["-o", str(tmp_path / "o")],
            "train-without-length": [*text, "--train-text", str(lm_dir / "held.txt")],
            "length-without-train": [*text, "--finetune-steps", "5"],
            "train-missing": [*text, "--train-text", str(tmp_path / "missing.txt"), "--finetune-steps", "5"],
            "train-bad-device": [*text, "--train-text", str(lm_dir / "held.txt"), "--finetune-steps", "5",
                                 "--device", "tpu"],
            "train-too-short": [*text, "--seq-len", "16", "--train-text", str(lm_dir / "held.txt"),  # < 64 windows
                                "--finetune-steps", "5"]}[case]
    code = main(["compress", str(lm_dir), "--max-params", "90%", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert sorted(os.listdir(lm_dir)) == before and not (tmp_path / "o").exists()


def test_compress_fine_tunes_a_model_directory_on_text_and_its_perplexity_falls(lm_dir, tmp_path, capsys):
    """compress DIR --train-text distils the plan on text (KL per token): the saved result's held-back
    perplexity ends below the same plan's untrained, and the report says what training did."""
    import json

    from rankfold.cli import main
    from rankfold.frontends.hf import perplexity

    (tmp_path / "train.txt").write_text("\n".join(_lines(600, 3)) + "\n")
    common = ["compress", str(lm_dir), "--calib-text", str(lm_dir / "calib.txt"), "--seq-len", "16", "--samples",
              "96", "--max-params", "40%", "--bits", "32", "--min-rank", "2", "--check", "perplexity:100", "-q"]
    assert main([*common, "-o", str(tmp_path / "plain")]) == 0
    assert main([*common, "--train-text", str(tmp_path / "train.txt"), "--finetune-steps", "40", "--finetune-lr",
                 "3e-3", "--report", str(tmp_path / "r.json"), "-o", str(tmp_path / "tuned")]) == 0
    printed = capsys.readouterr().out
    assert "fine-tuned 40 steps" in printed and "perplexity" in printed
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["finetune"]["steps"] == 40 and report["self_check"] is not None
    held = _windows(lm_dir, "held.txt", 12)
    plain, tuned = (perplexity(rankfold.load_compressed(tmp_path / name), held) for name in ("plain", "tuned"))
    assert tuned < 0.95 * plain, (plain, tuned)  # measured: 4.99 untrained, 4.58 tuned (original 4.59)


def test_compress_fine_tunes_text_with_feature_matching_when_asked(lm_dir, tmp_path, capsys):
    """--finetune-feature-weight reaches the distillation on text: the factorized layers' outputs are matched."""
    from rankfold.cli import main

    (tmp_path / "train.txt").write_text("\n".join(_lines(200, 5)) + "\n")
    assert main(["compress", str(lm_dir), "--calib-text", str(lm_dir / "calib.txt"), "--seq-len", "16", "--samples",
                 "96", "--max-params", "40%", "--bits", "32", "--min-rank", "2", "--check", "perplexity:100",
                 "--train-text", str(tmp_path / "train.txt"), "--finetune-steps", "2", "--finetune-feature-weight",
                 "1", "-o", str(tmp_path / "tuned")]) == 0
    captured = capsys.readouterr()
    assert "feature matching at" in captured.err + captured.out and "fine-tuned 2 steps" in captured.out


@pytest.mark.parametrize("keep", [0.4])
def test_layer_inputs_block_by_block_equal_those_of_prefix_passes(lm_dir, monkeypatch, keep):
    """The compensated apply reads each layer's inputs from the block stack (one pass through its
    block) exactly as from passes from the model's input (one pass up to every layer)."""
    from rankfold import block_inputs
    from rankfold.frontends.hf import load_hf

    model = load_hf(lm_dir)
    calib, held = _windows(lm_dir, "calib.txt", 48), _windows(lm_dir, "held.txt", 8)
    assert block_inputs.block_stack(model) == "lm.model.layers"
    used = []
    real = block_inputs.BlockInputs.for_model

    def spy(*args, **kwargs):
        found = real(*args, **kwargs)
        used.append(found is not None)
        return found

    monkeypatch.setattr(block_inputs.BlockInputs, "for_model", spy)
    by_block = rankfold.compress(model, method="svd", keep=keep, calib=calib, min_rank=2)
    monkeypatch.setattr(block_inputs.BlockInputs, "for_model", lambda *a, **k: None)
    by_prefix = rankfold.compress(model, method="svd", keep=keep, calib=calib, min_rank=2)
    assert used == [True]
    with torch.no_grad():
        torch.testing.assert_close(by_block(held), by_prefix(held), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(by_block(held), model(held), atol=1e-3)  # it did compress


def test_eval_reports_the_perplexity_of_a_model_directory_and_of_its_compression(lm_dir, tmp_path, capsys):
    import json

    from rankfold.cli import main
    from rankfold.frontends.hf import load_hf, perplexity

    held = _windows(lm_dir, "held.txt", 12)
    assert main(["eval", str(lm_dir), "--text", str(lm_dir / "held.txt"), "--seq-len", "16", "--samples", "12",
                 "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured["perplexity"] == pytest.approx(perplexity(load_hf(lm_dir), held), rel=1e-5)
    out = tmp_path / "small"
    assert main(["compress", str(lm_dir), "--calib-text", str(lm_dir / "calib.txt"), "--seq-len", "16",
                 "--samples", "96", "--keep", "0.5", "--min-rank", "2", "--check", "perplexity:100", "-o", str(out),
                 "-q"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--text", str(lm_dir / "held.txt"), "--seq-len", "16", "--samples", "12",
                 "--json"]) == 0
    small = json.loads(capsys.readouterr().out)
    assert small["params"] < measured["params"]
    assert small["perplexity"] == pytest.approx(perplexity(rankfold.load_compressed(out), held), rel=1e-5)
    assert main(["eval", str(lm_dir), "--data", str(tmp_path / "x.npz"), "--text", str(lm_dir / "held.txt")]) == 2
    assert "not available for a model directory" in capsys.readouterr().err


def test_a_byte_budget_quantizes_the_tied_embedding_with_its_head_and_the_tie_survives_saving(lm_dir, tmp_path):
    """The embedding table is priced like any matrix (its reads and its tied head's outputs take
    the rounding noise); the plan quantizes it under a byte budget; the saved directory stores it
    once, quantized, and the reloaded head is the same quantized matrix."""
    import dataclasses

    from rankfold.frontends.hf import load_hf
    from rankfold.planner.options import quantized_layer_bytes
    from rankfold.planner.pricing import price_model
    from rankfold.target import load_target

    model = load_hf(lm_dir)
    calib = _windows(lm_dir, "calib.txt", 96)
    target = dataclasses.replace(load_target("host"), weight_group_size=16, reduce_range=False)
    table = "lm.model.embed_tokens"
    pricing = price_model(model, calib=calib[:80], target=target, min_rank=4)
    options = pricing.options[table]
    assert {(o.bits, o.group_size) for o in options} == {(32, None), (8, None), (4, None), (4, 16)}
    assert all(o.method == "none" for o in options)
    by = {(o.bits, o.group_size): o for o in options}
    vocab, dim = model.lm.model.embed_tokens.weight.shape
    assert by[(8, None)].weight_bytes == quantized_layer_bytes(vocab * dim, vocab, False, 8)
    # the head shares the noise: the table's estimate is larger than its reads alone would give
    from rankfold.planner.options import table_noise_loss
    from rankfold.planner.sensitivity import layer_statistics

    reads = layer_statistics(model, [table], calib[:80])[table]
    assert by[(8, None)].quant_loss > table_noise_loss(model.lm.model.embed_tokens, reads) > 0
    assert by[(4, 16)].quant_loss < by[(4, None)].quant_loss

    result = rankfold.compress_to_budget(model, calib=calib, target=target, budgets={"weight_bytes": "15%"},
                                         min_rank=4, rules=(CheckRule("perplexity", 3.0),))
    layer = next(x for x in result.plan.layers if x.name == table)
    assert layer.bits < 32 and layer.layer == f"Embedding {vocab}x{dim}"
    rankfold.save_compressed(result, tmp_path / "out", hf_source=lm_dir)
    config = json.loads((tmp_path / "out" / "rankfold.json").read_text())
    assert [name for name in config["quantized"] if name.endswith("embed_tokens.weight")]
    again = rankfold.load_compressed(tmp_path / "out")
    embedding, head_weight = again.lm.model.embed_tokens.weight, again.lm.lm_head.weight
    assert embedding.data_ptr() == head_weight.data_ptr()  # tied again
    codes = embedding.detach().numpy() / np.abs(embedding.detach().numpy()).max(1, keepdims=True)
    levels = 2 ** (layer.bits - 1) - 1
    if layer.weight_scales == "channel":  # every row on its own grid of +-levels steps
        np.testing.assert_allclose(codes * levels, np.round(codes * levels), atol=1e-4)



def test_the_cli_plans_bits_with_int4_groups_and_refuses_a_quantized_result_that_fails_its_check(lm_dir, tmp_path,
                                                                                                capsys):
    """--group-size offers int4 with one scale per group; the saved directory holds the groups and
    eval measures it; a quantized result whose own check fails is refused and nothing written."""
    from rankfold.cli import main

    out = tmp_path / "q"
    common = ["compress", str(lm_dir), "--calib-text", str(lm_dir / "calib.txt"), "--seq-len", "16", "--samples", "96",
              "--max-weight-bytes", "14%", "--group-size", "16", "--min-rank", "2", "-q"]
    assert main([*common, "--check", "perplexity:100", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "4/g16" in printed and f"wrote {out}" in printed
    stored = json.loads((out / "rankfold.json").read_text())["quantized"]
    assert any(entry.get("group_size") == 16 for entry in stored.values())
    assert main(["eval", str(out), "--text", str(lm_dir / "held.txt"), "--seq-len", "16"]) == 0
    assert "perplexity" in capsys.readouterr().out
    refused = tmp_path / "refused"
    assert main([*common, "--check", "perplexity:1.0001", "-o", str(refused)]) == 2
    err = capsys.readouterr().err
    assert "self-check failed" in err and "Traceback" not in err and not refused.exists()
