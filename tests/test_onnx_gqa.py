"""onnxruntime's GroupQueryAttention, the attention of the LLM files its model builder
(onnxruntime-genai) and its optimizer write, read as the standard ops it computes
(rankfold/frontends/onnx_contrib.py): each case against onnxruntime on the same file."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import rankfold
from rankfold.errors import RankfoldError

RNG = np.random.default_rng(0)
B, S, N, KV, SIZE, PAST = 2, 5, 4, 2, 32, 6  # onnxruntime's rotary asks caches 8k wide
TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int64): TensorProto.INT64,
         np.dtype(np.int32): TensorProto.INT32}


def _normal(*shape):
    return RNG.normal(size=shape).astype(np.float32)


def _gqa(inputs, outputs=("y", "present_key", "present_value"), **attrs):
    return helper.make_node("GroupQueryAttention", list(inputs), list(outputs), domain="com.microsoft",
                            num_heads=N, kv_num_heads=KV, **attrs)


def _file(tmp_path, nodes, feeds: dict, outputs, inits=()) -> str:
    graph = helper.make_graph(
        nodes, "gqa", [helper.make_tensor_value_info(k, TYPES[v.dtype], list(v.shape)) for k, v in feeds.items()],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [None] * (3 if i == 0 else 4))
         for i, name in enumerate(outputs)],
        [numpy_helper.from_array(a, n) for n, a in inits])
    path = str(tmp_path / "gqa.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.microsoft", 1)]), path)
    return path


def _prompt(tokens=S, lengths=(S, S)):
    return dict(q=_normal(B, tokens, N * SIZE), k=_normal(B, tokens, KV * SIZE), v=_normal(B, tokens, KV * SIZE),
                seqlens_k=np.array(lengths, np.int32) - 1, total=np.array(tokens, np.int32))


def _one_token_after(past=PAST):
    return dict(q=_normal(B, 1, N * SIZE), k=_normal(B, 1, KV * SIZE), v=_normal(B, 1, KV * SIZE),
                past_key=_normal(B, KV, past, SIZE), past_value=_normal(B, KV, past, SIZE),
                seqlens_k=np.full(B, past, np.int32), total=np.array(past + 1, np.int32))


CACHES = [("cos", _normal(32, SIZE // 2)), ("sin", _normal(32, SIZE // 2))]
PROMPT = ["q", "k", "v", "", "", "seqlens_k", "total"]
# name -> (node, feeds, constants)
CASES = {
    "a prompt": (_gqa(PROMPT), _prompt(), []),
    "a prompt padded on the right": (_gqa(PROMPT), _prompt(lengths=(S, 2)), []),
    "a local window, a scale and a softcap": (_gqa(PROMPT, local_window_size=2, scale=0.3, softcap=2.0), _prompt(), []),
    "bidirectional, an attention bias": (
        _gqa(PROMPT + ["", "", "", "bias"], causal=0), dict(_prompt(), bias=_normal(B, 1, S, S)), []),
    "rotary on a prompt": (_gqa(PROMPT + ["cos", "sin"], do_rotary=1), _prompt(), CACHES),
    "rotary, interleaved, one token after a cache": (
        _gqa(["q", "k", "v", "past_key", "past_value", "seqlens_k", "total", "cos", "sin"], do_rotary=1,
             rotary_interleaved=1), _one_token_after(), CACHES),
    "rotary on a quarter of each head (narrower caches, as Phi's)": (
        _gqa(PROMPT + ["cos", "sin"], do_rotary=1), _prompt(),
        [("cos", _normal(32, SIZE // 4)), ("sin", _normal(32, SIZE // 4))]),
    "q, k, v packed, rotary": (
        _gqa(["qkv", "", "", "", "", "seqlens_k", "total", "cos", "sin"], do_rotary=1),
        dict(qkv=_normal(B, S, (N + 2 * KV) * SIZE), seqlens_k=np.full(B, S - 1, np.int32),
             total=np.array(S, np.int32)), CACHES),
}


@pytest.mark.parametrize("case", list(CASES))
def test_group_query_attention_computes_what_onnxruntime_computes(tmp_path, case):
    node, feeds, inits = CASES[case]
    path = _file(tmp_path, [node], feeds, node.output, inits)
    theirs = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)
    ours = rankfold.load_onnx(path)(*(torch.from_numpy(v) for v in feeds.values()))
    for got, wanted in zip(ours, theirs, strict=True):
        assert got.shape == wanted.shape, case
        assert np.abs(got.detach().numpy() - wanted).max() <= 1e-4 * max(1.0, np.abs(wanted).max()), case


@pytest.mark.parametrize(("attrs", "named"), [({"smooth_softmax": 1}, "smooth_softmax is set"),
                                              ({"k_quant_type": "PER_TENSOR"}, "its cache is quantized")])
def test_what_group_query_attention_is_not_read_as_is_refused_by_name(tmp_path, attrs, named):
    node = _gqa(PROMPT, **attrs)
    with pytest.raises(RankfoldError, match=f"GroupQueryAttention node .*{named}"):
        rankfold.load_onnx(_file(tmp_path, [node], _prompt(), node.output))


def test_group_query_attention_macs_are_its_scores_and_their_mix_for_every_query_head(tmp_path):
    from rankfold.evaluate import onnx_macs

    packed, packed_feeds, _ = CASES["q, k, v packed, rotary"]
    for node, feeds in ((_gqa(PROMPT), _prompt()), (packed, packed_feeds)):
        path = _file(tmp_path, [node], feeds, node.output, CACHES if "cos" in node.input else ())
        assert onnx_macs(onnx.load(path)) == S * S * 2 * N * SIZE  # at a batch of 1


# a decoder block as onnxruntime-genai's model builder writes one: token ids, an attention mask and
# the past caches in; seqlens_k and the total length from the mask; RMS norms (simplified and skip
# simplified), GroupQueryAttention with its rotary embedding, a SiLU-gated MLP, the LM head
WIDTH, MLP, VOCAB = 64, 128, 50


def _weight(*shape):
    return (RNG.normal(size=shape) / np.sqrt(shape[0])).astype(np.float32)


def _decoder_file(tmp_path, packed: bool = False) -> str:
    """`packed`: q, k and v from one MatMul, GroupQueryAttention reading them packed (as the model
    builder writes SmolLM2)."""
    angles = np.arange(64)[:, None] / 10000 ** (np.arange(SIZE // 2)[None] / (SIZE // 2))
    inits = {"wq": _weight(WIDTH, N * SIZE), "wk": _weight(WIDTH, KV * SIZE),
             "wv": _weight(WIDTH, KV * SIZE), "wo": _weight(N * SIZE, WIDTH), "gate": _weight(WIDTH, MLP),
             "up": _weight(WIDTH, MLP), "down": _weight(MLP, WIDTH), "head": _normal(WIDTH, VOCAB) / 4,
             "cos": np.cos(angles).astype(np.float32), "sin": np.sin(angles).astype(np.float32),
             "gain": np.ones(WIDTH, np.float32), "one": np.array([1], np.int64), "one32": np.array(1, np.int32),
             "axis1": np.array(1, np.int64)}
    if packed:
        inits["wqkv"] = np.concatenate([inits.pop(f"w{p}") for p in "qkv"], axis=1)
    ms = {"domain": "com.microsoft"}
    nodes = [helper.make_node("ReduceSum", ["attention_mask", "one"], ["count"], keepdims=0),
             helper.make_node("Cast", ["count"], ["count32"], to=TensorProto.INT32),
             helper.make_node("Sub", ["count32", "one32"], ["seqlens_k"]),
             helper.make_node("Shape", ["attention_mask"], ["mask_shape"]),
             helper.make_node("Gather", ["mask_shape", "axis1"], ["total64"], axis=0),
             helper.make_node("Cast", ["total64"], ["total"], to=TensorProto.INT32),
             helper.make_node("Transpose", ["head"], ["table"]),  # tied: the head's matrix is the token table
             helper.make_node("Gather", ["table", "input_ids"], ["x"]),
             helper.make_node("SimplifiedLayerNormalization", ["x", "gain"], ["h"], axis=-1, epsilon=1e-5),
             *([helper.make_node("MatMul", ["h", "wqkv"], ["qkv"])] if packed else
               [helper.make_node("MatMul", ["h", f"w{p}"], [p]) for p in "qkv"]),
             _gqa((["qkv", "", ""] if packed else ["q", "k", "v"])
                  + ["past_key_values.0.key", "past_key_values.0.value", "seqlens_k", "total", "cos", "sin"],
                  ["a", "present.0.key", "present.0.value"], do_rotary=1),
             helper.make_node("MatMul", ["a", "wo"], ["o"]),
             helper.make_node("SkipSimplifiedLayerNormalization", ["o", "x", "gain"], ["h2", "", "", "sum"],
                              epsilon=1e-5, **ms),
             helper.make_node("MatMul", ["h2", "gate"], ["g"]), helper.make_node("MatMul", ["h2", "up"], ["u"]),
             helper.make_node("Sigmoid", ["g"], ["sg"]), helper.make_node("Mul", ["g", "sg"], ["silu"]),
             helper.make_node("Mul", ["silu", "u"], ["gated"]), helper.make_node("MatMul", ["gated", "down"], ["m"]),
             helper.make_node("SkipSimplifiedLayerNormalization", ["m", "sum", "gain"], ["final"], epsilon=1e-5,
                              **ms),
             helper.make_node("MatMul", ["final", "head"], ["logits"])]
    cache = ["batch", KV, "past", SIZE]
    graph = helper.make_graph(
        nodes, "decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
         *[helper.make_tensor_value_info(f"past_key_values.0.{p}", TensorProto.FLOAT, cache)
           for p in ("key", "value")]],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB]),
         *[helper.make_tensor_value_info(f"present.0.{p}", TensorProto.FLOAT, ["batch", KV, "total", SIZE])
           for p in ("key", "value")]],
        [numpy_helper.from_array(a, n) for n, a in inits.items()])
    path = str(tmp_path / "decoder.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.microsoft", 1)]), path)
    return path


def _decoder_feeds(count, tokens, past=0):
    return {"input_ids": RNG.integers(0, VOCAB, (count, tokens)),
            "attention_mask": np.ones((count, past + tokens), np.int64),
            **{f"past_key_values.0.{p}": _normal(count, KV, past, SIZE) for p in ("key", "value")}}


def test_an_onnxruntime_genai_decoder_reads_as_onnxruntime_runs_it_with_its_matrices_as_layers(tmp_path):
    path = _decoder_file(tmp_path)
    module = rankfold.load_onnx(path)
    layers = [name for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(layers) == 8  # q, k, v, o, gate, up, down, the head
    for feeds in (_decoder_feeds(2, 7), _decoder_feeds(2, 1, past=5)):  # a prompt; a token after a cache
        theirs = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)
        ours = module(*(torch.from_numpy(v) for v in feeds.values()))
        for got, wanted in zip(ours, theirs, strict=True):
            assert np.abs(got.detach().numpy() - wanted).max() <= 1e-4 * np.abs(wanted).max()


def _perplexity(logits, ids) -> float:
    """exp of the mean -log p(next id): position t predicts id t + 1."""
    shifted = logits[:, :-1] - logits[:, :-1].max(-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return float(np.exp(-np.take_along_axis(log_p, ids[:, 1:, None], -1).mean()))


def test_a_decoders_logits_are_judged_by_perplexity_and_its_caches_through_them(tmp_path):
    """The logits of a causal decoder (ids in, causal attention) are next-token logits: the
    self-check compares perplexity on the ids (as for a Hugging Face causal LM), and its present
    keys and values are judged through them. Given per sample, the mask makes them unknowable."""
    path = _decoder_file(tmp_path)
    fixed = {name: value[:1] for name, value in _decoder_feeds(1, 12).items() if name != "input_ids"}
    assert rankfold.load_onnx(path, fixed=fixed).output_kinds == ("next_token", "cache", "cache")
    assert getattr(rankfold.load_onnx(path), "output_kinds", None) is None


@pytest.mark.parametrize("budget", [["--max-params", "90%"], ["--max-weight-bytes", "30%"]])
def test_an_onnxruntime_genai_decoder_compresses_with_its_caches_given_once_and_its_head_tied(tmp_path, budget):
    """Calibrated on prompts with empty caches given once: onnxruntime runs the result to logits
    near the original's. The head and the token table it is tied
    to stay one matrix: the planner leaves the head alone and prices the table with it, and the
    file stores it once (the exporter's transposed copy, or a float copy beside the int8 table,
    had stored it twice: 8 % more parameters than the original at 90 % of them)."""
    path, calib, out = _decoder_file(tmp_path), tmp_path / "prompts.npz", tmp_path / "small.onnx"
    module = rankfold.load_onnx(path)
    assert module.get_submodule("logits").weight is module.get_submodule("x").weight
    feeds = _decoder_feeds(96, 12)
    for name in ("attention_mask", "past_key_values.0.key", "past_key_values.0.value"):
        feeds[name] = feeds[name][:1]
    np.savez(calib, **feeds)
    from rankfold.cli import main

    assert main(["compress", path, "--calib", str(calib), *budget, "-o", str(out), "-q"]) == 0
    fresh = _decoder_feeds(1, 12)
    wanted = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(["logits"], fresh)[0]
    small = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    # float: written into the original graph, it takes the mask and caches again (tests/test_graft.py);
    # quantized: traced, with them as constants
    got = small.run(["logits"], {i.name: fresh[i.name] for i in small.get_inputs()})[0]
    assert got.shape == wanted.shape and not np.array_equal(got, wanted)
    assert _perplexity(got, fresh["input_ids"]) < 1.5 * _perplexity(wanted, fresh["input_ids"])
    tables = [init for init in onnx.load(str(out)).graph.initializer if sorted(init.dims) == sorted([VOCAB, WIDTH])]
    assert len(tables) == 1
    if budget[0] == "--max-weight-bytes":
        assert tables[0].data_type == TensorProto.INT8


def test_a_decoders_caches_weigh_nothing_in_the_planners_metric_nor_in_distillation():
    """Judged through the logits: the planner's likelihood loss and distillation skip the caches
    (SmolLM2's onnxruntime-genai file, planned with its 60 caches weighed as outputs, lost x1.84
    in perplexity at a tenth fewer block parameters, where the Hugging Face path loses x1.06)."""
    from rankfold.gauss_newton import per_sample_likelihood_loss
    from rankfold.training.losses import distillation_loss

    cache = torch.randn(2, KV, 5, SIZE, requires_grad=True)
    assert per_sample_likelihood_loss(cache, "cache", 0, 1, 0, 2).item() == 0.0
    assert per_sample_likelihood_loss(cache, None, 0, 1, 0, 2).item() != 0.0
    logits, cache = torch.randn(2, 5, VOCAB), cache.detach()
    alone = distillation_loss([logits], [2 * logits], ["next_token"], temperature=1.0)
    both = distillation_loss([logits, cache], [2 * logits, cache + 1], ["next_token", "cache"], temperature=1.0)
    assert float(both) == float(alone) > 0
