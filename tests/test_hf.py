"""Hugging Face sentence encoders (issue 16, first step): a tiny BERT made here (random weights,
nothing downloaded) loads as a module taking token ids; its Linear layers compress data-aware
under int64 calibration ids, and the self-check compares its embeddings by cosine."""

import json

import pytest
import torch

import rankfold
from rankfold.check_rules import CheckRule
from tests.helpers import table_codes

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = ("the cat sat on a mat while dogs ran far away from home and we all saw it happen slowly "
         "under bright red sky near old green trees by cold blue water").split()


def make_encoder_dir(root):
    """A tiny random BERT sentence encoder with its word-level tokenizer in `root` (the
    `encoder_dir` fixture of conftest.py)."""
    torch.manual_seed(0)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *sorted(set(WORDS))]
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=96, max_position_embeddings=64, pad_token_id=0,
                                     initializer_range=0.1)  # the Linear layers weigh in the embedding
    transformers.BertModel(config).save_pretrained(root)
    words = tokenizers.models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]")
    tokenizer = tokenizers.Tokenizer(words)
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.save(str(root / "tokenizer.json"))
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    (root / "modules.json").write_text(json.dumps([{"type": "sentence_transformers.models.Transformer"},
                                                   {"type": "sentence_transformers.models.Pooling"},
                                                   {"type": "sentence_transformers.models.Normalize"}]))
    return root


def _sentences(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (int(torch.randint(4, 14, (1,), generator=g)),),
                                                           generator=g)) for _ in range(n)]


def test_a_sentence_encoder_takes_token_ids_and_gives_unit_embeddings(encoder_dir):
    from rankfold.frontends.hf import load_hf, tokenize

    model = load_hf(encoder_dir)
    ids = tokenize(encoder_dir, ["the cat sat", "dogs ran far away from home"], 8)
    assert ids.dtype == torch.int64 and ids.shape == (2, 8) and int(ids[0, 3:].abs().sum()) == 0  # padded
    with torch.no_grad():
        e = model(ids)
        assert e.shape == (2, 48) and torch.allclose(e.norm(dim=-1), torch.ones(2), atol=1e-5)
        assert torch.allclose(model(ids.float()), e)  # float ids, as calibration passes may hand them over
        alone = model(tokenize(encoder_dir, ["the cat sat"], 3))
    assert torch.allclose(alone[0], e[0], atol=1e-5)  # padding does not change a sentence's embedding


def test_a_directory_that_is_not_a_sentence_encoder_is_refused(tmp_path, encoder_dir):
    from rankfold.frontends.hf import load_hf

    with pytest.raises(rankfold.RankfoldError, match="no config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text((encoder_dir / "config.json").read_text())
    with pytest.raises(rankfold.RankfoldError, match="sentence-transformers pooling"):
        load_hf(tmp_path)


def test_data_aware_svd_of_every_linear_with_token_id_calibration(encoder_dir):
    from rankfold.frontends.hf import load_hf, tokenize

    model = load_hf(encoder_dir)
    calib, held = tokenize(encoder_dir, _sentences(96, 1), 16), tokenize(encoder_dir, _sentences(64, 2), 16)
    plain = rankfold.compress(model, method="svd", keep=0.5, min_rank=2)
    aware = rankfold.compress_uniform(model, method="svd", keep=0.5, calib=calib, min_rank=2,
                                      rules=(CheckRule("cosine", 0.0),))
    linears = [r for r in aware.report.layers if r.method == "svd"]
    assert len(linears) >= 12  # q, k, v, o, up, down of both blocks (and the pooler)
    assert aware.check.outputs[0].kind == "embedding" and "embedding cosine" in aware.check.describe()

    def cosine(a, b):
        with torch.no_grad():
            return float(torch.nn.functional.cosine_similarity(a(held), b(held), dim=-1).mean())

    assert cosine(model, aware.module) > cosine(model, plain)
    # the default check of an embedding is its cosine (0.98): a too-small rank is refused
    with pytest.raises(rankfold.RankfoldError, match="cosine"):
        rankfold.compress_uniform(model, method="svd", keep=0.1, calib=calib, min_rank=1)


def test_a_planned_compression_of_a_sentence_encoder(encoder_dir):
    from rankfold.frontends.hf import load_hf, tokenize

    model = load_hf(encoder_dir)
    calib = tokenize(encoder_dir, _sentences(128, 3), 16)
    result = rankfold.compress_to_budget(model, calib=calib, target="cortex-m7", budgets={"params": "85%"}, bits=8,
                                         min_rank=2, rules=(CheckRule("cosine", 0.5),))
    assert result.plan.after["params"] <= 0.85 * result.plan.before["params"]
    assert any(layer.method == "svd" for layer in result.plan.layers)
    assert result.check.outputs[0].metrics["cosine"] >= 0.5


def test_a_quantized_plan_of_a_sentence_encoder_saves_weight_only_qdq_that_onnxruntime_runs(encoder_dir, tmp_path):
    import numpy as np
    import onnx

    from rankfold.frontends.hf import load_hf, tokenize
    from rankfold.runtime import session

    model = load_hf(encoder_dir)
    calib, held = tokenize(encoder_dir, _sentences(128, 3), 16), tokenize(encoder_dir, _sentences(64, 4), 16)
    result = rankfold.compress_to_budget(model, calib=calib, budgets={"weight_bytes": "60%"}, bits="auto",
                                         min_rank=2, rules=(CheckRule("cosine", 0.5),))
    assert result.plan.quantized
    result.save(tmp_path / "q.onnx")
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    dequantized = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    assert dequantized and not [n for n in graph.node if n.op_type == "QuantizeLinear"]  # weights only
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    out = session(str(tmp_path / "q.onnx")).run(None, {graph.input[0].name: held.numpy()})[0]
    with torch.no_grad():
        ref = model(held).numpy()
    cosine = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
    # int8 weights with float activations keep the embeddings (0.99999 measured)
    assert cosine.mean() > 0.99 and result.check.outputs[0].metrics["cosine"] > 0.99


def test_a_compressed_encoder_saves_as_a_directory_that_loads_again_alone(encoder_dir, tmp_path):
    import os

    from rankfold.frontends.hf import load_hf, tokenize
    from rankfold.quantize.export import quantized_copy

    model = load_hf(encoder_dir)
    calib, held = tokenize(encoder_dir, _sentences(128, 3), 16), tokenize(encoder_dir, _sentences(64, 4), 16)
    result = rankfold.compress_to_budget(model, calib=calib, budgets={"params": "70%", "weight_bytes": "25%"},
                                         bits="auto", min_rank=2, rules=(CheckRule("cosine", 0.5),))
    assert result.plan.quantized and any(layer.method != "none" for layer in result.plan.layers)
    out = tmp_path / "saved"
    rankfold.save_compressed(result, out, hf_source=encoder_dir)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    with pytest.raises(rankfold.RankfoldError, match="not empty"):
        rankfold.save_compressed(result, out, hf_source=encoder_dir)
    before = {p.name: p.stat().st_mtime_ns for p in encoder_dir.iterdir()}
    with pytest.raises(rankfold.RankfoldError, match="own directory"):  # never over the user's model, even forced
        rankfold.save_compressed(result, encoder_dir, hf_source=encoder_dir, force=True)
    assert {p.name: p.stat().st_mtime_ns for p in encoder_dir.iterdir()} == before
    loaded = rankfold.load_compressed(out)  # rebuilt from the directory alone
    # the same weights the QDQ export stores: the same rounding, codes times scales
    reference, _bits = quantized_copy(result.module, result.plan.layer_bits(),
                                      calib=calib[: len(calib) - result.plan.held_back],
                                      per_tensor=result.plan.per_tensor_layers())
    with torch.no_grad():
        got, want = loaded(held), reference(held)
    assert torch.allclose(got, want, atol=1e-5)
    # integers on disk: far smaller than the float compressed model
    float_bytes = 4 * sum(p.numel() for p in result.module.parameters())
    assert os.path.getsize(out / "model.safetensors") < 0.6 * float_bytes
    assert os.path.getsize(out / "model.safetensors") < 1.5 * result.plan.after["weight_bytes"]


def test_a_saved_torch_model_loads_on_its_original_architecture(tmp_path):
    from tests.helpers import tiny_classifier

    torch.manual_seed(0)
    model = tiny_classifier().eval()
    calib = torch.randn(96, 1, 12, 12)
    result = rankfold.compress_to_budget(model, calib=calib, budgets={"params": "50%"}, min_rank=2,
                                         min_agreement=0.0)
    rankfold.save_compressed(result, tmp_path / "m")
    with pytest.raises(rankfold.RankfoldError, match="base=module"):
        rankfold.load_compressed(tmp_path / "m")
    loaded = rankfold.load_compressed(tmp_path / "m", base=tiny_classifier())
    with torch.no_grad():
        assert torch.equal(loaded(calib), result.module(calib))


def test_a_byte_budget_quantizes_the_word_embeddings_into_the_qdq_file(encoder_dir, tmp_path):
    """The word-embedding table is planned like any matrix: under a tight byte budget it is
    quantized, and the QDQ file's Gather takes the codes of the rows it reads and dequantizes
    those alone (one scale per row)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from rankfold.frontends.hf import load_hf, tokenize
    from rankfold.quantize.export import module_of_node
    from rankfold.runtime import session

    model = load_hf(encoder_dir)
    calib, held = tokenize(encoder_dir, _sentences(128, 3), 16), tokenize(encoder_dir, _sentences(64, 4), 16)
    result = rankfold.compress_to_budget(model, calib=calib, budgets={"weight_bytes": "20%"}, bits="auto",
                                         min_rank=2, rules=(CheckRule("cosine", 0.5),))
    tables = {layer.name: layer for layer in result.plan.layers if layer.layer.startswith("Embedding")}
    assert set(tables) == {f"encoder.embeddings.{t}_embeddings" for t in ("word", "position", "token_type")}
    word = tables["encoder.embeddings.word_embeddings"]
    assert word.bits in (8, 4) and word.method == "none"
    result.save(tmp_path / "q.onnx")
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    codes, inits = table_codes(graph, "word_embeddings")  # its Gather takes the codes of the rows it reads
    assert codes.data_type == (onnx.TensorProto.INT8 if word.bits == 8 else onnx.TensorProto.INT4)
    rows = model.encoder.embeddings.word_embeddings.num_embeddings
    scales = numpy_helper.to_array(inits[codes.name[: -len("_q")] + "_wscale"])
    assert scales.shape == (rows, 1, 1)  # one scale per row, as the codes' rows are gathered
    out = session(str(tmp_path / "q.onnx")).run(None, {graph.input[0].name: held.numpy()})[0]
    with torch.no_grad():
        ref = model(held).numpy()
    cosine = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
    assert cosine.mean() == pytest.approx(result.check.outputs[0].metrics["cosine"], abs=0.02)
    # a factor of a nested module's chain maps back to it
    assert module_of_node("/encoder/layer.0/query/query.1/MatMul", {"encoder.layer.0.query.1": 4}) \
        == "encoder.layer.0.query.1"
