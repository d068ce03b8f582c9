"""The standard transformer ops of opsets 23 and 24 (rankfold/frontends/onnx_ops_attention.py):
Attention and RotaryEmbedding against onnxruntime and onnx's reference on the same file, and a
BERT exported by torch.onnx at opset 23 (one Attention node per block) compressed as a whole."""

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

import rankfold
from rankfold.errors import RankfoldError
from rankfold.evaluate import onnx_macs

RNG = np.random.default_rng(0)
B, H, S, D = 2, 4, 5, 8
ONNX_TYPES = {np.dtype(bool): TensorProto.BOOL, np.dtype(np.int64): TensorProto.INT64,
              np.dtype(np.float32): TensorProto.FLOAT}


def _floats(*shape):
    return RNG.normal(size=shape).astype(np.float32)


def _file(tmp_path, node, inputs: dict, opset: int) -> str:
    outputs = [name for name in node.output if name]
    ranks = [next(iter(inputs.values())).ndim] + [4] * (len(outputs) - 1)
    graph = helper.make_graph(
        [node], "attention",
        [helper.make_tensor_value_info(name, ONNX_TYPES[value.dtype], list(value.shape))
         for name, value in inputs.items()],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [None] * rank) for name, rank in zip(outputs, ranks)])
    path = str(tmp_path / "op.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)
    return path


def _causal_keys_of_every_query():
    mask = RNG.random((S, S + 3)) > 0.3
    mask[:, 0] = True
    return mask


# name -> (node, inputs, opset)
CASES = {
    "4-D heads, default scale": (
        helper.make_node("Attention", ["q", "k", "v"], ["y"]),
        dict(q=_floats(B, H, S, D), k=_floats(B, H, 7, D), v=_floats(B, H, 7, 6)), 23),
    "causal, scale, softcap": (
        helper.make_node("Attention", ["q", "k", "v"], ["y"], is_causal=1, scale=0.3, softcap=2.0),
        dict(q=_floats(B, H, S, D), k=_floats(B, H, S, D), v=_floats(B, H, S, D)), 23),
    "3-D, grouped-query heads, additive mask": (
        helper.make_node("Attention", ["q", "k", "v", "m"], ["y"], q_num_heads=4, kv_num_heads=2),
        dict(q=_floats(B, S, 32), k=_floats(B, 7, 16), v=_floats(B, 7, 24), m=_floats(B, 1, S, 7)), 23),
    "boolean mask, past cache and the presents": (
        helper.make_node("Attention", ["q", "k", "v", "m", "pk", "pv"], ["y", "present_k", "present_v"]),
        dict(q=_floats(B, H, S, D), k=_floats(B, H, S, D), v=_floats(B, H, S, D), m=_causal_keys_of_every_query(),
             pk=_floats(B, H, 3, D), pv=_floats(B, H, 3, D)), 23),
    "causal after a past cache": (
        helper.make_node("Attention", ["q", "k", "v", "", "pk", "pv"], ["y", "present_k", "present_v"], is_causal=1),
        dict(q=_floats(B, H, S, D), k=_floats(B, H, S, D), v=_floats(B, H, S, D), pk=_floats(B, H, 3, D),
             pv=_floats(B, H, 3, D)), 23),
    "opset 24: causal over each sample's keys (nonpad_kv_seqlen)": (
        helper.make_node("Attention", ["q", "k", "v", "", "", "", "n"], ["y"], is_causal=1),
        dict(q=_floats(B, H, S, D), k=_floats(B, H, 8, D), v=_floats(B, H, 8, D), n=np.array([8, 6])), 24),
    "rotary embedding, 4-D, position ids": (
        helper.make_node("RotaryEmbedding", ["x", "cos", "sin", "p"], ["y"]),
        dict(x=_floats(B, H, S, D), cos=_floats(16, D // 2), sin=_floats(16, D // 2),
             p=RNG.integers(0, 16, (B, S))), 23),
    "rotary embedding, 3-D, interleaved, part of each head": (
        helper.make_node("RotaryEmbedding", ["x", "cos", "sin", "p"], ["y"], num_heads=4, interleaved=1,
                         rotary_embedding_dim=4),
        dict(x=_floats(B, S, 32), cos=_floats(16, 2), sin=_floats(16, 2), p=RNG.integers(0, 16, (B, S))), 23),
    "rotary embedding, angles per token": (
        helper.make_node("RotaryEmbedding", ["x", "cos", "sin"], ["y"]),
        dict(x=_floats(B, H, S, D), cos=_floats(B, S, D // 2), sin=_floats(B, S, D // 2)), 23),
    "swish": (helper.make_node("Swish", ["x"], ["y"], alpha=0.7), dict(x=_floats(B, S, D)), 24),
}


@pytest.mark.parametrize("case", list(CASES))
def test_standard_transformer_ops_compute_what_onnxruntime_and_the_reference_compute(tmp_path, case):
    node, inputs, opset = CASES[case]
    path = _file(tmp_path, node, inputs, opset)
    theirs = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, inputs)
    reference = ReferenceEvaluator(path).run(None, inputs)
    ours = rankfold.load_onnx(path)(*(torch.from_numpy(v) for v in inputs.values()))
    ours = ours if isinstance(ours, tuple) else (ours,)
    assert len(ours) == len(theirs)
    for got, wanted, exact in zip(ours, theirs, reference):
        assert got.shape == wanted.shape
        assert np.abs(got.detach().numpy() - wanted).max() <= 1e-5 * max(1.0, np.abs(wanted).max()), case
        assert np.abs(got.detach().numpy() - exact).max() <= 1e-5 * max(1.0, np.abs(exact).max()), case


@pytest.mark.parametrize("what, attrs, outputs", [
    ("qk_matmul_output", {}, ["y", "", "", "qk"]),
    ("sliding window", {"left_window_size": 2}, ["y"]),
])
def test_attention_outputs_and_attributes_rankfold_does_not_compute_are_refused_by_name(tmp_path, what, attrs, outputs):
    node = helper.make_node("Attention", ["q", "k", "v"], outputs, **attrs)
    inputs = dict(q=_floats(B, H, S, D), k=_floats(B, H, S, D), v=_floats(B, H, S, D))
    path = _file(tmp_path, node, inputs, 25 if attrs else 23)
    with pytest.raises(RankfoldError, match=f"Attention.*{what.split()[0]}"):
        rankfold.load_onnx(path)(*(torch.from_numpy(v) for v in inputs.values()))


def test_attention_macs_count_the_scores_and_their_mix_for_every_query_head(tmp_path):
    node = helper.make_node("Attention", ["q", "k", "v"], ["y"], q_num_heads=4, kv_num_heads=2)
    path = _file(tmp_path, node, dict(q=_floats(1, S, 32), k=_floats(1, 7, 16), v=_floats(1, 7, 24)), 23)
    # per query head: S x 7 scores of 8 features, mixed over 7 keys of 12 features
    assert onnx_macs(onnx.load(path)) == 4 * S * 7 * (8 + 12)


class TinyEncoder(torch.nn.Module):
    """A BERT as users export it: ids and a padding mask in, the mean-pooled embedding out."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=32, attn_implementation="sdpa")
        self.bert = BertModel(config, add_pooling_layer=False).eval()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def _ids_and_masks(count: int, tokens: int) -> dict[str, np.ndarray]:
    ids = RNG.integers(1, 50, (count, tokens))
    lengths = RNG.integers(tokens // 2, tokens + 1, count)
    mask = (np.arange(tokens)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}


def test_a_bert_exported_at_opset_23_compresses_every_linear_and_keeps_batch_and_tokens_open(tmp_path):
    pytest.importorskip("transformers")
    original, calib, out = tmp_path / "bert.onnx", tmp_path / "calib.npz", tmp_path / "small.onnx"
    example = tuple(torch.from_numpy(v) for v in _ids_and_masks(2, 12).values())
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("tokens")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TinyEncoder(), example, str(original), dynamo=True, opset_version=23,
                          input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"],
                          dynamic_shapes=(dims, dims))
    assert sum(n.op_type == "Attention" for n in onnx.load(str(original)).graph.node) == 2
    module = rankfold.load_onnx(original)
    linear = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linear) == 2 * 6  # q, k, v, output, up, down of both blocks, around the Attention nodes
    np.savez(calib, **_ids_and_masks(96, 12))
    from rankfold.cli import main

    assert main(["compress", str(original), "--calib", str(calib), "--keep", "0.9", "--check", "cosine:0.9",
                 "-o", str(out), "-q"]) == 0
    small, wanted = ort.InferenceSession(str(out)), ort.InferenceSession(str(original))
    assert onnx.load(str(out)).graph.node and all(n.op_type != "Attention" or n.domain == ""
                                                  for n in onnx.load(str(out)).graph.node)
    for count, tokens in [(3, 12), (5, 20)]:  # other batches and lengths than the calibration's
        feeds = _ids_and_masks(count, tokens)
        got, expected = small.run(None, feeds)[0], wanted.run(None, feeds)[0]
        assert got.shape == expected.shape == (count, 32)
        cosine = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
        assert cosine.mean() > 0.9


class NormalizedEncoder(TinyEncoder):
    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(super().forward(ids, mask), dim=-1)


@pytest.mark.parametrize("encoder, name, embedding", [
    (NormalizedEncoder, "out", True),  # divided by its own L2 norm
    (TinyEncoder, "image_embeds", True),  # named as one
    (TinyEncoder, "scores", False),  # a vector the data reads as class scores
])
def test_an_onnx_encoders_embedding_output_is_checked_by_cosine_not_by_argmax(tmp_path, capsys, encoder, name,
                                                                              embedding):
    pytest.importorskip("transformers")
    path, calib = tmp_path / "encoder.onnx", tmp_path / "calib.npz"
    example = tuple(torch.from_numpy(v) for v in _ids_and_masks(2, 12).values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(encoder(), example, str(path), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=[name],
                          dynamic_axes={"input_ids": {0: "n"}, "attention_mask": {0: "n"}, name: {0: "n"}})
    module = rankfold.load_onnx(path)
    assert tuple(getattr(module, "output_kinds", ()) or ()) == (("embedding",) if embedding else ())
    np.savez(calib, **_ids_and_masks(64, 12))
    from rankfold.cli import main

    main(["compress", str(path), "--calib", str(calib), "--keep", "0.95", "--max-output-error", "1",
          "--min-agreement", "0", "-o", str(tmp_path / "small.onnx")])
    said = capsys.readouterr().out
    assert ("embedding cosine" in said) == embedding and ("top-1 agreement" in said) != embedding, said


@pytest.mark.parametrize("batch_norm_last, embedding", [(True, True), (False, False)])
def test_a_face_embedding_ending_in_batch_norm_reads_as_an_embedding(tmp_path, batch_norm_last, embedding):
    """ArcFace's and MobileFaceNet's exports end in a BatchNormalization of the embedding (its
    output named "fc1" or a number); a classifier ends in its Gemm."""
    layers = [torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.PReLU(8), torch.nn.AdaptiveAvgPool2d(1),
              torch.nn.Flatten(), torch.nn.Linear(8, 16)]
    net = torch.nn.Sequential(*layers, *([torch.nn.BatchNorm1d(16)] if batch_norm_last else [])).eval()
    path = tmp_path / "face.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, 3, 12, 12),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["fc1"], dynamic_axes={"x": {0: "n"}, "fc1": {0: "n"}})
    kinds = tuple(getattr(rankfold.load_onnx(path), "output_kinds", ()) or ())
    assert kinds == (("embedding",) if embedding else ())


class PatchEncoder(torch.nn.Module):
    """A ViT-like classifier on nn.TransformerEncoder (batch first): torch's attention runs it
    sequence-first inside, so its reshapes read the batch from axis 1, and it scales by the square
    root of a head size read from a shape."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.patches = torch.nn.Conv2d(3, 32, 4, 4)
        layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.patches(x).flatten(2).transpose(1, 2)).mean(1))


class Recurrent(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv1d(8, 16, 3, padding=1)
        self.gru = torch.nn.GRU(16, 24, batch_first=True, bidirectional=True)
        self.head = torch.nn.Linear(48, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.gru(self.conv(x).transpose(1, 2))
        return self.head(y[:, -1])


class ShiftedWindows(torch.nn.Module):
    """Swin-like pieces: a roll, einsum attention, a running sum (CumSum on a constant axis) and a top-k."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.patches = torch.nn.Conv2d(3, 16, 4, 4)
        self.q, self.k, self.head = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.roll(self.patches(x), shifts=(1, 1), dims=(2, 3)).flatten(2).transpose(1, 2)
        y = torch.einsum("bnd,bmd->bnm", self.q(y), self.k(y)).softmax(-1) @ y
        top = torch.topk(y.mean(-1), 4, dim=1).values.sum(1, keepdim=True)
        return self.head(torch.cumsum(y, 1)[:, -1]) + top


@pytest.mark.parametrize("net, shape, dynamo", [(PatchEncoder, (3, 16, 16), False), (Recurrent, (8, 20), True),
                                                (ShiftedWindows, (3, 32, 32), False)])
def test_a_network_reading_its_batch_from_another_axis_is_written_for_any_batch(tmp_path, net, shape, dynamo):
    """nn.TransformerEncoder as TorchScript exports it (before: a traceback, the square root of a
    size read as a list), a bidirectional GRU as the dynamo exporter writes it and Swin-like pieces
    (a CumSum whose axis had to stay a constant once sizes are traced): the written files take
    other batches (before: the batch baked in, the run refused)."""
    original, calib, out = tmp_path / "net.onnx", tmp_path / "calib.npz", tmp_path / "small.onnx"
    example = torch.randn(2, *shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(net().eval(), (example,), str(original), dynamo=True, opset_version=18,
                              input_names=["x"], dynamic_shapes=({0: torch.export.Dim("batch")},))
        else:
            torch.onnx.export(net().eval(), (example,), str(original), dynamo=False, opset_version=17,
                              input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    np.savez(calib, x=RNG.normal(size=(64, *shape)).astype(np.float32))
    from rankfold.cli import main

    assert main(["compress", str(original), "--calib", str(calib), "--keep", "0.8", "--max-output-error", "1",
                 "--min-agreement", "0", "-o", str(out), "-q"]) == 0
    x = RNG.normal(size=(5, *shape)).astype(np.float32)
    got = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    wanted = ort.InferenceSession(str(original)).run(None, {"x": x})[0]
    assert got.shape == wanted.shape and np.linalg.norm(got - wanted) < 0.5 * np.linalg.norm(wanted)


def test_embedding_names_an_output_the_graph_cannot_tell_from_class_scores(tmp_path, capsys):
    """A face network's unnormalized vector out of its last Gemm reads as class scores unless
    --embedding names it; an output it does not have is refused before any work."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 16)).eval()
    path, calib = tmp_path / "face.onnx", tmp_path / "calib.npz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, 3, 12, 12),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["fc1"], dynamic_axes={"x": {0: "n"}, "fc1": {0: "n"}})
    np.savez(calib, x=RNG.normal(size=(64, 3, 12, 12)).astype(np.float32))
    from rankfold.cli import main

    common = ["compress", str(path), "--calib", str(calib), "--keep", "0.9", "--max-output-error", "1",
              "--min-agreement", "0", "-o", str(tmp_path / "small.onnx"), "--force"]
    assert main(common) == 0
    assert "top-1 agreement" in capsys.readouterr().out
    assert main(common + ["--embedding", "fc1", "--check", "cosine:0"]) == 0
    said = capsys.readouterr().out
    assert "embedding cosine" in said and "top-1 agreement" not in said
    assert main(common + ["--embedding", "feature"]) == 2
    assert "--embedding 'feature': the model has no such output (its outputs: fc1" in capsys.readouterr().err


class _PackedAttention(torch.nn.Module):
    """GPT-2's attention as torch.onnx writes it: q, k and v from one Linear (c_attn), split apart
    on the last axis, four heads, then an output projection and a classifier on the mean."""

    def __init__(self, width: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.width, self.heads = width, heads
        self.c_attn, self.c_proj = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, 10)

    def forward(self, x):
        n, t, _ = x.shape
        q, k, v = (part.reshape(n, t, self.heads, -1).transpose(1, 2)
                   for part in self.c_attn(x).split(self.width, dim=2))
        weights = torch.softmax(q @ k.transpose(-1, -2) / (self.width // self.heads) ** 0.5, -1)
        mixed = (weights @ v).transpose(1, 2).reshape(n, t, self.width)
        return self.head(self.c_proj(mixed).mean(1))


def test_q_k_v_packed_in_one_matmul_and_split_are_three_layers(tmp_path):
    """The MatMul a Split takes apart on its last axis is read as one Linear per block (ColumnBlocks),
    so q, k and v are planned and factorized each on its own, as GroupQueryAttention's packed input
    is (SmolLM2 as onnxruntime-genai writes it: x1.120 in perplexity factorized together, x1.053
    apart); the compressed file computes as the module does."""
    from rankfold.layers import ColumnBlocks

    torch.manual_seed(0)
    x = torch.randn(128, 6, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_PackedAttention().eval(), (x[:2],), str(tmp_path / "gpt.onnx"), input_names=["x"],
                          dynamic_axes={"x": {0: "n"}}, dynamo=False, opset_version=17)
    assert any(n.op_type == "Split" for n in onnx.load(str(tmp_path / "gpt.onnx")).graph.node)
    module = rankfold.load_onnx(tmp_path / "gpt.onnx")
    blocks = [m for m in module.modules() if isinstance(m, ColumnBlocks)]
    assert [[b.out_features for b in m.blocks] for m in blocks] == [[32, 32, 32]]
    wanted = ort.InferenceSession(str(tmp_path / "gpt.onnx")).run(None, {"x": x[:8].numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(module(x[:8]).numpy(), wanted, rtol=1e-4, atol=1e-5)
    result = rankfold.compress_to_budget(module, calib=x, budgets={"params": "80%"}, bits=32, min_rank=2)
    factorized = [layer.name for layer in result.plan.layers if layer.method != "none"]
    assert any(".blocks." in name for name in factorized)  # a block planned as a layer of its own
    result.save(tmp_path / "small.onnx")
    got = ort.InferenceSession(str(tmp_path / "small.onnx")).run(None, {"x": x[:8].numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, result.module(x[:8]).numpy(), rtol=1e-4, atol=1e-4)
