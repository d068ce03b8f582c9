"""Several inputs that differ per sample (token ids with a padding mask, as every padded batch of
text has): calibrated together through one packed tensor, and the result takes them as the
user's file does (rankfold.frontends.packing)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from rankfold.data import graph_data
from rankfold.errors import RankfoldError
from rankfold.frontends.onnx import graph_inputs, read_onnx
from tests.helpers import run_cli, table_codes

VOCAB, WIDTH, LENGTH = 50, 64, 10


class _MaskedMeanEncoder(nn.Module):
    """Embedding, a mean over the positions the mask keeps, two Linear layers: an encoder's interface."""

    def __init__(self, echo_mask: bool = False) -> None:
        super().__init__()
        self.echo_mask = echo_mask  # also return the mask's complement (a bool output, as encoders pass on)
        generator = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.hidden = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, 8)
        with torch.no_grad():  # a hidden layer of rank 12 plus a little noise: rank 16 keeps nearly all of it
            low = torch.randn(WIDTH, 12, generator=generator) @ torch.randn(12, WIDTH, generator=generator) / 4
            self.hidden.weight.copy_(low + 0.01 * torch.randn(WIDTH, WIDTH, generator=generator))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        kept = mask.unsqueeze(-1).to(torch.float32)
        pooled = (self.embed(ids) * kept).sum(1) / kept.sum(1).clamp(min=1)
        logits = self.head(torch.relu(self.hidden(pooled)))
        return (logits, ~mask) if self.echo_mask else logits


def _encoder_file(path, mask_dtype=torch.int64) -> None:
    ids, mask = torch.randint(1, VOCAB, (2, LENGTH)), torch.ones(2, LENGTH, dtype=mask_dtype)
    echo = mask_dtype == torch.bool
    torch.onnx.export(_MaskedMeanEncoder(echo).eval(), (ids, mask), str(path), dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"], output_names=["logits", "padding"][: 1 + echo],
                      dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                                    "logits": {0: "batch"}, **({"padding": {0: "batch", 1: "seq"}} if echo else {})})


def _padded_text(rng, n: int, length: int = LENGTH, mask_dtype=np.int64) -> dict[str, np.ndarray]:
    """Token ids padded with 0 after each sequence's own length, and the mask that says so."""
    lengths = rng.integers(3, length + 1, n)
    mask = np.arange(length)[None] < lengths[:, None]
    return {"input_ids": rng.integers(1, VOCAB, (n, length)) * mask, "attention_mask": mask.astype(mask_dtype)}


def _relative_error(got: np.ndarray, wanted: np.ndarray) -> float:
    return float(np.linalg.norm(got - wanted) / np.linalg.norm(wanted))


@pytest.mark.parametrize("budget", [["--max-params", "75%"], ["--max-weight-bytes", "60%"]], ids=["float", "int8"])
def test_ids_and_a_padding_mask_that_differ_per_sample_calibrate_together_and_the_result_takes_both(tmp_path, budget):
    _encoder_file(tmp_path / "encoder.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", **_padded_text(rng, 128))
    code, stdout, stderr = run_cli("compress", tmp_path / "encoder.onnx", "--calib", tmp_path / "calib.npz", *budget,
                                   "-o", tmp_path / "small.onnx")
    assert code == 0, stderr
    assert "input_ids, attention_mask differ per sample: calibrated together" in stderr
    original, small = (ort.InferenceSession(str(tmp_path / name)) for name in ("encoder.onnx", "small.onnx"))
    assert [(i.name, i.type) for i in small.get_inputs()] == [("input_ids", "tensor(int64)"),
                                                              ("attention_mask", "tensor(int64)")]
    quantized = any(init.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT4)  # integer codes stored
                    for init in onnx.load(tmp_path / "small.onnx").graph.initializer)
    assert quantized == (budget[0] == "--max-weight-bytes")
    for n, length in ((3, LENGTH), (5, 7)):  # any batch, and the sequence length the original leaves open
        fresh = _padded_text(rng, n, length)
        wanted, got = original.run(None, fresh)[0], small.run(None, fresh)[0]
        assert got.shape == wanted.shape
        # int8 weights and a rank-16 hidden layer stay close; token ids rounded as activations would not
        assert _relative_error(got, wanted) < 0.1
        # the mask is an input of the result, not a constant: what it hides does not count, what it shows does
        hidden = {**fresh, "input_ids": np.where(fresh["attention_mask"] == 1, fresh["input_ids"], 7)}
        np.testing.assert_allclose(small.run(None, hidden)[0], got, rtol=1e-5, atol=1e-6)
        shown = {**fresh, "attention_mask": np.ones_like(fresh["attention_mask"])}
        assert _relative_error(small.run(None, shown)[0], got) > 0.01
    code, stdout, stderr = run_cli("eval", tmp_path / "small.onnx", "--data", tmp_path / "calib.npz")
    assert code == 0 and "parameters" in stdout, stderr


def test_a_bool_mask_is_packed_and_given_back_as_bool(tmp_path):
    """A bool mask in, and the bool mask passed on as an output: the export's check compares it exactly."""
    _encoder_file(tmp_path / "encoder.onnx", mask_dtype=torch.bool)
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "calib.npz", **_padded_text(rng, 96, mask_dtype=np.bool_))
    code, _stdout, stderr = run_cli("compress", tmp_path / "encoder.onnx", "--calib", tmp_path / "calib.npz",
                                    "--keep", "0.5", "-o", tmp_path / "small.onnx")
    assert code == 0, stderr
    small = ort.InferenceSession(str(tmp_path / "small.onnx"))
    assert [i.type for i in small.get_inputs()] == ["tensor(int64)", "tensor(bool)"]
    fresh = _padded_text(rng, 4, mask_dtype=np.bool_)
    wanted = ort.InferenceSession(str(tmp_path / "encoder.onnx")).run(None, fresh)
    got = small.run(None, fresh)
    assert _relative_error(got[0], wanted[0]) < 0.1
    assert got[1].dtype == np.bool_ and np.array_equal(got[1], wanted[1])


def test_integers_float32_cannot_hold_are_refused_by_name(tmp_path):
    _encoder_file(tmp_path / "encoder.onnx")
    inputs = graph_inputs(read_onnx(tmp_path / "encoder.onnx"))
    text = _padded_text(np.random.default_rng(0), 8)
    np.savez(tmp_path / "huge.npz", **{**text, "input_ids": text["input_ids"] + 2**24})
    with pytest.raises(RankfoldError, match=r"'input_ids' holds integers up to 16,777,2..: .* exact below 16,777,216"):
        graph_data(tmp_path / "huge.npz", inputs, need_labels=False)
    np.savez(tmp_path / "ok.npz", **text)
    data, fixed = graph_data(tmp_path / "ok.npz", inputs, need_labels=False)
    assert data.packed == ("input_ids", "attention_mask") and not fixed and data.x.shape == (8, 2, LENGTH)
    np.testing.assert_array_equal(data.x[:, 1], text["attention_mask"])


def test_a_result_read_through_packed_inputs_packs_again_and_fine_tunes(tmp_path):
    """The compressed file holds the value rankfold names its packed input: compressing it again
    packs under another name."""
    _encoder_file(tmp_path / "encoder.onnx")
    np.savez(tmp_path / "calib.npz", **_padded_text(np.random.default_rng(2), 96))
    for source, out in (("encoder.onnx", "once.onnx"), ("once.onnx", "twice.onnx")):
        code, _stdout, stderr = run_cli("compress", tmp_path / source, "--calib", tmp_path / "calib.npz",
                                        "--keep", "0.75", "-o", tmp_path / out)
        assert code == 0, stderr
    names = [i.name for i in onnx.load(tmp_path / "twice.onnx").graph.input]
    assert names == ["input_ids", "attention_mask"]
    # and a result is distilled from the original as a student that takes the packed inputs too
    code, _stdout, stderr = run_cli("finetune", tmp_path / "encoder.onnx", "--student", tmp_path / "once.onnx",
                                    "--calib", tmp_path / "calib.npz", "--train", tmp_path / "calib.npz",
                                    "--steps", "3", "--batch-size", "16", "-o", tmp_path / "tuned.onnx")
    assert code == 0, stderr
    assert [i.name for i in onnx.load(tmp_path / "tuned.onnx").graph.input] == ["input_ids", "attention_mask"]


def test_an_onnx_embedding_table_is_a_layer_quantized_weight_only_beside_packed_ids(tmp_path):
    """The Gather of a constant table (a word embedding) is a table layer: priced and quantized, so
    a byte budget below what its float table alone holds is reached; token ids in, so the QDQ file
    keeps float activations (transformers' outlier channels), as the Hugging Face path writes them."""
    _encoder_file(tmp_path / "encoder.onnx")
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "calib.npz", **_padded_text(rng, 128))
    table_bytes = VOCAB * WIDTH * 4
    total = sum(t.dims[0] * (t.dims[1] if len(t.dims) > 1 else 1) * 4
                for t in onnx.load(tmp_path / "encoder.onnx").graph.initializer)
    assert table_bytes / total > 0.4  # a budget of 30 % needs the table quantized
    code, _stdout, stderr = run_cli("compress", tmp_path / "encoder.onnx", "--calib", tmp_path / "calib.npz",
                                    "--max-weight-bytes", "30%", "-o", tmp_path / "small.onnx")
    assert code == 0, stderr
    graph = onnx.load(tmp_path / "small.onnx").graph
    codes, _inits = table_codes(graph)
    assert codes is not None, "the embedding table's Gather reads its integer codes, row by row"
    assert not any(n.op_type == "DequantizeLinear" and n.input[0] == codes.name for n in graph.node)
    # its row scales are counted as a DequantizeLinear's are: bytes, not parameters
    from rankfold.evaluate import onnx_size

    scales = [t for t in graph.initializer if t.name.endswith(("_wscale", "_bscale"))]
    assert any(t.name == codes.name[: -len("_q")] + "_wscale" for t in scales)
    held = [a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    counted = sum(int(np.prod(t.dims)) for t in [*graph.initializer, *held]
                  if t.data_type != onnx.TensorProto.INT64 and t not in scales)
    assert onnx_size(tmp_path / "small.onnx").params == counted
    # read again, the gathered codes are a table layer: planned and compressed again like the float table
    import rankfold
    from rankfold.frontends.onnx import GatheredTable

    again = rankfold.load_onnx(tmp_path / "small.onnx")
    assert any(isinstance(m, GatheredTable) for m in again.modules())
    assert not any(node.op_type == "QuantizeLinear" for node in graph.node)  # weight-only: activations stay float
    fresh = _padded_text(rng, 16)
    wanted = ort.InferenceSession(str(tmp_path / "encoder.onnx")).run(None, fresh)[0]
    assert _relative_error(ort.InferenceSession(str(tmp_path / "small.onnx")).run(None, fresh)[0], wanted) < 0.1


def test_a_gathered_table_counts_negative_indices_from_the_end_as_onnx_does(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    import rankfold
    from rankfold.frontends.onnx import GatheredTable

    table = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0)], "lookup",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3])],
                              [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["N", 3, 8])],
                              [numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "lookup.onnx")
    module = rankfold.load_onnx(tmp_path / "lookup.onnx")
    assert any(isinstance(m, GatheredTable) for m in module.modules())
    ids = np.array([[0, -1, 5], [-20, 19, 3]], np.int64)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"ids": ids})[0]
    np.testing.assert_array_equal(module(torch.from_numpy(ids)).detach().numpy(), expected)



class _FeaturesAndEmbedding(nn.Module):
    """Audio features and a rater's embedding, both per sample and of different shapes (PLCMOS's)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Linear(4 * 6, 32)
        self.head = nn.Linear(32 + 5, 3)

    def forward(self, features: torch.Tensor, rater: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.features(features.flatten(1)))
        return self.head(torch.cat([hidden, rater], dim=1))


def test_inputs_that_differ_per_sample_in_different_shapes_are_packed_flat(tmp_path):
    example = (torch.randn(2, 4, 6), torch.randn(2, 5))
    torch.onnx.export(_FeaturesAndEmbedding().eval(), example, str(tmp_path / "mos.onnx"), dynamo=False,
                      opset_version=17, input_names=["features", "rater"], output_names=["scores"],
                      dynamic_axes={"features": {0: "batch"}, "rater": {0: "batch"}, "scores": {0: "batch"}})
    rng = np.random.default_rng(4)
    arrays = {"features": rng.normal(size=(96, 4, 6)).astype(np.float32),
              "rater": rng.normal(size=(96, 5)).astype(np.float32)}
    np.savez(tmp_path / "calib.npz", **arrays)
    data, _fixed = graph_data(tmp_path / "calib.npz", graph_inputs(read_onnx(tmp_path / "mos.onnx")),
                              need_labels=False)
    assert data.x.shape == (96, 29) and data.packed_shapes == ((4, 6), (5,))
    code, _stdout, stderr = run_cli("compress", tmp_path / "mos.onnx", "--calib", tmp_path / "calib.npz",
                                    "--keep", "0.75", "--check", "relerr:0.3", "-o", tmp_path / "small.onnx")
    assert code == 0, stderr
    original, small = (ort.InferenceSession(str(tmp_path / name)) for name in ("mos.onnx", "small.onnx"))
    assert [(i.name, i.shape[1:]) for i in small.get_inputs()] == [("features", [4, 6]), ("rater", [5])]
    fresh = {name: value[:3] for name, value in arrays.items()}
    wanted, got = original.run(None, fresh)[0], small.run(None, fresh)[0]
    assert got.shape == (3, 3) and _relative_error(got, wanted) < 0.3
    # the rater's embedding is an input of the result, not a constant
    other = {**fresh, "rater": fresh["rater"][::-1].copy()}
    assert _relative_error(small.run(None, other)[0], got) > 0.01


class _TokenwiseEncoder(nn.Module):
    """Embedding, a Linear on every position, then a mean over the positions the mask keeps: what
    padded positions compute is read by nothing."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.hidden = nn.Linear(WIDTH, WIDTH)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        kept = mask.unsqueeze(-1).to(torch.float32)
        return (torch.relu(self.hidden(self.embed(ids))) * kept).sum(1) / kept.sum(1).clamp(min=1)


def test_the_statistics_of_a_layer_on_every_token_count_only_the_positions_the_mask_keeps(tmp_path):
    """Padded to one length, most rows of a batch of short sentences are padding (MiniLM's ONNX file
    at 64 tokens: at half its Linear parameters, cosine 0.869 counting them, 0.886 without)."""
    from rankfold.analyze import streamed_input_moments
    from rankfold.frontends.onnx import load_onnx
    from rankfold.frontends.packing import packing_for

    ids, mask = torch.randint(1, VOCAB, (2, LENGTH)), torch.ones(2, LENGTH, dtype=torch.int64)
    torch.onnx.export(_TokenwiseEncoder().eval(), (ids, mask), str(tmp_path / "tokens.onnx"), dynamo=False,
                      opset_version=17, input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                      dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                                    "embedding": {0: "batch"}})
    text = _padded_text(np.random.default_rng(5), 48)
    np.savez(tmp_path / "calib.npz", **text)
    graph = read_onnx(tmp_path / "tokens.onnx")
    data, _fixed = graph_data(tmp_path / "calib.npz", graph_inputs(graph), need_labels=False)
    calib = torch.from_numpy(data.x)
    module = load_onnx(tmp_path / "tokens.onnx", None, calib[:2], packing_for(graph, list(data.packed)))
    layer = next(name for name, m in module.named_modules() if isinstance(m, nn.Linear))
    moments = streamed_input_moments(None, module, layer, calib, batch_size=16)
    kept = torch.from_numpy(text["attention_mask"]).bool()
    rows = _TokenwiseEncoder().embed(torch.from_numpy(text["input_ids"]))[kept].detach().to(torch.float64)
    assert moments.rows == int(kept.sum()) < kept.numel()
    assert torch.allclose(moments.auto, rows.T @ rows / len(rows), rtol=1e-4, atol=1e-6)
    assert module.packing.kept_positions(calib[:4]).tolist() == kept[:4].tolist()
    from rankfold.quantize.gptq import input_second_moments  # data-aware rounding's H, alike

    rounding = input_second_moments(module, [layer], calib, batch_size=16)[layer]
    assert torch.allclose(rounding, rows.T @ rows / len(rows), rtol=1e-4, atol=1e-6)


def test_only_a_mask_of_zeros_and_ones_that_keeps_a_position_of_every_sample_selects_rows():
    from onnx import TensorProto, helper

    from rankfold.frontends.packing import Packing

    def packing(mask_name):
        return Packing((helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "t"]),
                        helper.make_tensor_value_info(mask_name, TensorProto.INT64, ["b", "t"])))

    ids = torch.ones(2, 4)
    mask = torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 0]])
    assert packing("attention_mask").kept_positions(torch.stack([ids, mask], 1)).tolist() == mask.bool().tolist()
    assert packing("key_padding_mask").kept_positions(torch.stack([ids, mask], 1)) is None  # 1 marks padding
    assert packing("attention_mask").kept_positions(torch.stack([ids, mask * 2], 1)) is None
    assert packing("attention_mask").kept_positions(torch.stack([ids, mask * torch.tensor([[1.0], [0]])], 1)) is None
