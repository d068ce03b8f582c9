"""onnxruntime's own operators, read as the standard ONNX nodes they stand for.

Files that went through onnxruntime hold ops of its `com.microsoft` domain: its transformer
optimizer and Hugging Face Optimum fuse BERT and GPT blocks (SkipLayerNormalization, BiasGelu,
FastGelu, FusedMatMul), a session saved "optimized" fuses convolutions with their activation
(FusedConv, FusedGemm), its static quantizer in QOperator format writes QLinearAdd, QGemm and
friends, its dynamic one DynamicQuantizeLSTM, and 4-bit language models keep their weights in
MatMulNBits. Each is rewritten here, before conversion, into the standard nodes it computes, so
that the matrices inside become ordinary layers (counted, planned, factorized, quantized) and the
rest runs like any graph. Quantized operators become DequantizeLinear -> float op ->
QuantizeLinear, which the converter reads as it reads QDQ files (weights behind a
DequantizeLinear fold to float weights).

A rewrite is a pure function of one node and the graph's constants: it returns the nodes that
replace it and any constants it made. The written result holds standard ops only; onnxruntime
fuses them again when it loads it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import onnx
import torch
from onnx import helper
from torch import Tensor

from rankfold.errors import RankfoldError

CONTRIB = "com.microsoft"
LAYER_OPS = ("Conv", "Gemm", "MatMul")


@dataclass
class Rewriting:
    """One node being rewritten: its inputs and attributes, the graph's constants, and what it adds."""

    node: onnx.NodeProto
    consts: Mapping[str, Tensor]
    read: set[str]  # every value some node or the graph's outputs read
    foldable: set[str] = field(default_factory=set)  # values computed from constants alone (known or not)
    added: dict[str, Tensor] = field(default_factory=dict)
    nodes: list[onnx.NodeProto] = field(default_factory=list)

    @property
    def stem(self) -> str:
        return self.node.name or self.node.output[0]

    def input(self, index: int) -> str:
        return self.node.input[index] if index < len(self.node.input) else ""

    def output(self, index: int) -> str:
        return self.node.output[index] if index < len(self.node.output) else ""

    def attr(self, name: str, default=None):
        found = next((a for a in self.node.attribute if a.name == name), None)
        return default if found is None else helper.get_attribute_value(found)

    def value(self, suffix: str) -> str:
        return f"{self.stem}:{suffix}"

    def constant(self, suffix: str, tensor: Tensor) -> str:
        name = self.value(suffix)
        self.added[name] = tensor
        return name

    def emit(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        # the node's own weights keep its name (the layer rankfold makes of them is named after it)
        named = op in LAYER_OPS and not any(n.op_type in LAYER_OPS for n in self.nodes)
        name = self.stem if named else f"{self.stem}:{op}:{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attrs))
        return output

    def refuse(self, what: str) -> RankfoldError:
        return RankfoldError(f"{CONTRIB}.{self.node.op_type} node {self.stem!r}: {what}; rankfold reads this op "
                             "without it")

    def unread(self, *indices: int) -> None:
        """Outputs rankfold does not compute (statistics some fused ops also return) must go unread."""
        for index in indices:
            if self.output(index) and self.output(index) in self.read:
                raise self.refuse(f"its output {index} ({self.output(index)!r}) is read")


Rewrite = Callable[[Rewriting], None]
REWRITES: dict[str, Rewrite] = {}


def rewrites(*names: str, domain: str = CONTRIB) -> Callable[[Rewrite], Rewrite]:
    def register(fn: Rewrite) -> Rewrite:
        for name in names:
            REWRITES[f"{domain}.{name}" if domain else name] = fn
        return fn
    return register


def standard_nodes(nodes, consts: Mapping[str, Tensor], outputs: set[str]) -> tuple[list, dict[str, Tensor]]:
    """`nodes` with every op REWRITES knows replaced by its standard nodes, and the constants they add.
    The others (standard ops, If branches) are kept as they are."""
    read = {name for node in nodes for name in node.input} | outputs
    known = dict(consts)
    for node in nodes:  # Constant nodes' values, for rewrites that need a constant input
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = next((a for a in node.attribute if a.name == "value"), None)
            if value is not None:
                known[node.output[0]] = torch.from_numpy(onnx.numpy_helper.to_array(value.t).copy())
    result, added = [], {}
    # values the converter will fold from constants (weights a quantizer left behind a QuantizeLinear
    # of a Constant node, as Paddle2ONNX files quantized by onnxruntime have them)
    foldable = set(known)
    for node in nodes:
        fn = REWRITES.get(f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type)
        rewriting = Rewriting(node, known, read, foldable) if fn else None
        written = [node] if fn is None or fn(rewriting) is False else rewriting.nodes
        if rewriting is not None and written is rewriting.nodes:
            added.update(rewriting.added)
            known.update(rewriting.added)
            foldable.update(rewriting.added)
        for new in written:
            if new.op_type not in ("Shape", "Size") and all(not i or i in foldable for i in new.input):
                foldable.update(new.output)
        result += written
    return result, added


def _chain(r: Rewriting, steps: list[tuple[str, list[str], dict]], first: str, last: str) -> None:
    """Nodes applied one after another from `first`; the last one writes `last`. A step's input
    list names the running value "."."""
    value = first
    for index, (op, extra, attrs) in enumerate(steps):
        out = last if index == len(steps) - 1 else r.value(f"{op.lower()}{index}")
        value = r.emit(op, [value if name == "." else name for name in extra], out, **attrs)


# ---- transformer fusions ------------------------------------------------------------------

@rewrites("SkipLayerNormalization", "SkipSimplifiedLayerNormalization")
def _skip_layer_norm(r: Rewriting) -> None:
    """LayerNorm(input + skip + bias) * gamma + beta (RMS norm, no beta, in the simplified form);
    output 3 is the sum itself. Outputs 1 and 2 (mean, inverse deviation) are not computed."""
    simplified = r.node.op_type.startswith("SkipSimplified")
    gamma = r.input(2)
    beta, bias = ("", r.input(3)) if simplified else (r.input(3), r.input(4))
    r.unread(1, 2)
    total = r.output(3) or r.value("sum")
    r.emit("Add", [r.input(0), r.input(1)], r.value("skipped") if bias else total)
    if bias:
        r.emit("Add", [r.value("skipped"), bias], total)
    epsilon = float(r.attr("epsilon", 1e-12))
    if simplified:
        r.emit("SimplifiedLayerNormalization", [total, gamma], r.output(0), axis=-1, epsilon=epsilon)
    else:
        r.emit("LayerNormalization", [total, gamma] + ([beta] if beta else []), r.output(0), axis=-1, epsilon=epsilon)


@rewrites("BiasGelu", "FastGelu", "Gelu")
def _gelu(r: Rewriting) -> None:
    """Gelu of x (+ bias): exact (erf) for BiasGelu and Gelu, tanh-approximated for FastGelu."""
    x, bias = r.input(0), r.input(1)
    if bias:
        x = r.emit("Add", [x, bias], r.value("biased"))
    approximate = "tanh" if r.node.op_type == "FastGelu" else "none"
    r.emit("Gelu", [x], r.output(0), approximate=approximate)


@rewrites("QuickGelu")
def _quick_gelu(r: Rewriting) -> None:
    alpha = r.constant("alpha", torch.tensor(float(r.attr("alpha", 1.702))))
    _chain(r, [("Mul", [".", alpha], {}), ("Sigmoid", ["."], {}), ("Mul", [r.input(0), "."], {})], r.input(0),
           r.output(0))


@rewrites("FusedMatMul")
def _fused_matmul(r: Rewriting) -> None:
    """alpha * op(A) @ op(B), op transposing the last two axes where transA / transB say. A constant
    B is transposed and scaled here, so the product is a MatMul with constant weights: a layer."""
    if r.attr("transBatchA", 0) or r.attr("transBatchB", 0):
        raise r.refuse("transBatchA / transBatchB are set")
    a, b = r.input(0), r.input(1)
    alpha = float(r.attr("alpha", 1.0))
    if r.attr("transA", 0):
        a = r.emit("Transpose:last-two", [a], r.value("a_transposed"))
    if b in r.consts and r.consts[b].dtype.is_floating_point:
        weight = r.consts[b].float()
        weight = weight.transpose(-1, -2) if r.attr("transB", 0) else weight
        r.emit("MatMul", [a, r.constant("weight", (weight * alpha).contiguous())], r.output(0))
        return
    if r.attr("transB", 0):
        b = r.emit("Transpose:last-two", [b], r.value("b_transposed"))
    if alpha == 1.0:
        r.emit("MatMul", [a, b], r.output(0))
        return
    product = r.emit("MatMul", [a, b], r.value("product"))
    r.emit("Mul", [product, r.constant("alpha", torch.tensor(alpha))], r.output(0))


def _activation_name(r: Rewriting) -> str:
    name = r.attr("activation", "")
    return name.decode() if isinstance(name, bytes) else name


def _activation(r: Rewriting, name: str, params: list[float], x: str, out: str) -> None:
    """A fused activation (FusedConv's and FusedGemm's `activation`) as its standard node."""
    if name in ("Relu", "Sigmoid", "Tanh"):
        r.emit(name, [x], out)
    elif name == "LeakyRelu":
        r.emit(name, [x], out, alpha=params[0] if params else 0.01)
    elif name == "HardSigmoid":
        alpha, beta = (params + [0.2, 0.5][len(params):])[:2]
        r.emit(name, [x], out, alpha=alpha, beta=beta)
    elif name == "Clip":
        low, high = (params + [float("-inf"), float("inf")][len(params):])[:2]
        r.emit(name, [x, r.constant("low", torch.tensor(low)), r.constant("high", torch.tensor(high))], out)
    else:
        raise r.refuse(f"activation {name!r} (known: Relu, Sigmoid, Tanh, LeakyRelu, HardSigmoid, Clip)")


def _plain_attributes(r: Rewriting, dropped: tuple[str, ...]) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in r.node.attribute if a.name not in dropped}


@rewrites("FusedConv")
def _fused_conv(r: Rewriting) -> None:
    """activation(Conv(X, W, B) + Z): the convolution, the optional sum, then the activation."""
    name = _activation_name(r)
    params = list(r.attr("activation_params", []))
    conv = _plain_attributes(r, ("activation", "activation_params"))
    inputs = [r.input(0), r.input(1)] + ([r.input(2)] if r.input(2) else [])
    z = r.input(3)
    if not name and not z:
        r.emit("Conv", inputs, r.output(0), **conv)
        return
    value = r.emit("Conv", inputs, r.value("conv"), **conv)
    if z:
        value = r.emit("Add", [value, z], r.output(0) if not name else r.value("sum"))
    if name:
        _activation(r, name, params, value, r.output(0))


@rewrites("FusedGemm")
def _fused_gemm(r: Rewriting) -> None:
    name = _activation_name(r)
    params = [r.attr(f"activation_{k}") for k in ("alpha", "beta", "gamma")]
    params = [p for p in params if p is not None]
    gemm = _plain_attributes(r, ("activation", "activation_alpha", "activation_beta", "activation_gamma"))
    inputs = list(r.node.input)
    if not name:
        r.emit("Gemm", inputs, r.output(0), **gemm)
        return
    _activation(r, name, params, r.emit("Gemm", inputs, r.value("gemm"), **gemm), r.output(0))


@rewrites("MatMulNBits")
def _matmul_n_bits(r: Rewriting) -> None:
    """A @ W (+ bias) with W stored in `bits`-bit blocks along K: (N, blocks, bytes) packed low bits
    first, a scale per block, a zero point per block (packed like the codes, or float; 2^(bits-1)
    when absent). W is dequantized here to a float (K, N) constant: a Linear layer."""
    k, n, bits, block = (int(r.attr(a)) for a in ("K", "N", "bits", "block_size"))
    names = [r.input(i) for i in range(6)]
    if any(name and name not in r.consts for name in names[1:4]) or names[4]:
        raise r.refuse("its weights, scales and zero points are not all constants, or it has g_idx")
    if bits not in (2, 4, 8):
        raise r.refuse(f"bits={bits} (read: 2, 4, 8)")
    packed = r.consts[names[1]].to(torch.uint8).reshape(n, -1)
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
    codes = ((packed.unsqueeze(-1) >> shifts) & (2**bits - 1)).reshape(n, -1).float()  # (N, blocks * block)
    blocks = codes.shape[1] // block
    scales = r.consts[names[2]].float().reshape(n, blocks)
    if not names[3]:
        zeros = torch.full((n, blocks), float(2 ** (bits - 1)))
    elif r.consts[names[3]].dtype.is_floating_point:
        zeros = r.consts[names[3]].float().reshape(n, blocks)
    else:
        packed_zeros = r.consts[names[3]].to(torch.uint8).reshape(n, -1)
        zeros = ((packed_zeros.unsqueeze(-1) >> shifts) & (2**bits - 1)).reshape(n, -1)[:, :blocks].float()
    weight = ((codes.reshape(n, blocks, block) - zeros.unsqueeze(-1)) * scales.unsqueeze(-1)).reshape(n, -1)[:, :k]
    w = r.constant("weight", weight.t().contiguous())
    if names[5]:
        r.emit("Add", [r.emit("MatMul", [r.input(0), w], r.value("product")), names[5]], r.output(0))
    else:
        r.emit("MatMul", [r.input(0), w], r.output(0))


@rewrites("Attention")
def _attention(r: Rewriting) -> None:
    """BERT-style multi-head self-attention with its packed q, k, v weights (input_hidden, q + k + v):
    the three projections become three MatMul layers (as the unfused model has them), the rest the
    standard arithmetic: softmax(scale * Q K^T + mask) V per head. The mask (mask_index: lengths per
    sample or a raw 0/1 mask per key; an additive attention_bias; unidirectional) becomes an additive
    bias of mask_filter_value where a key is masked, as onnxruntime applies it."""
    if r.input(4) or r.input(6) or r.output(1):
        raise r.refuse("it has a past / present key-value cache")
    if r.attr("do_rotary", 0):
        raise r.refuse("do_rotary is set")
    weight_name = r.input(1)
    if weight_name not in r.consts:
        raise r.refuse("its q, k, v weights are not constants")
    weight = r.consts[weight_name].float()
    heads = int(r.attr("num_heads"))
    sizes = list(r.attr("qkv_hidden_sizes", [])) or [weight.shape[1] // 3] * 3
    bias = r.consts.get(r.input(2)) if r.input(2) else None
    if r.input(2) and bias is None:
        raise r.refuse("its q, k, v bias is not a constant")
    starts = [0, sizes[0], sizes[0] + sizes[1]]
    heads_of = []
    for part, start, size in zip("qkv", starts, sizes):
        w = r.constant(f"{part}_weight", weight[:, start : start + size].contiguous())
        projected = r.emit("MatMul", [r.input(0), w], r.value(f"{part}_projected"))
        if bias is not None:
            b = r.constant(f"{part}_bias", bias.float()[start : start + size].contiguous())
            projected = r.emit("Add", [projected, b], r.value(f"{part}_biased"))
        split = r.constant(f"{part}_heads", torch.tensor([0, 0, heads, size // heads]))
        by_head = r.emit("Reshape", [projected, split], r.value(f"{part}_by_head"))
        perm = [0, 2, 3, 1] if part == "k" else [0, 2, 1, 3]  # K transposed for Q K^T
        heads_of.append(r.emit("Transpose", [by_head], r.value(f"{part}_heads_first"), perm=perm))
    q, k, v = heads_of
    scale = r.attr("scale", None)
    scale = float(scale) if scale else 1.0 / float(sizes[0] // heads) ** 0.5
    scores = r.emit("MatMul", [q, k], r.value("scores"))
    scores = r.emit("Mul", [scores, r.constant("scale", torch.tensor(scale))], r.value("scaled"))
    if r.input(3) or r.attr("unidirectional", 0):
        mask = r.emit("Attention:mask-bias", [scores] + ([r.input(3)] if r.input(3) else []), r.value("mask_bias"),
                      mask_filter_value=float(r.attr("mask_filter_value", -10000.0)),
                      unidirectional=int(r.attr("unidirectional", 0)))
        scores = r.emit("Add", [scores, mask], r.value("masked"))
    if r.input(5):
        scores = r.emit("Add", [scores, r.input(5)], r.value("with_bias"))
    weights = r.emit("Softmax", [scores], r.value("weights"), axis=-1)
    mixed = r.emit("Transpose", [r.emit("MatMul", [weights, v], r.value("mixed"))], r.value("tokens_first"),
                   perm=[0, 2, 1, 3])
    r.emit("Reshape", [mixed, r.constant("joined", torch.tensor([0, 0, sizes[2]]))], r.output(0))


@rewrites("EmbedLayerNormalization")
def _embed_layer_norm(r: Rewriting) -> None:
    """BERT's embeddings: LayerNorm(word[ids] + position[0..S) (or position_ids) + segment[segment_ids]);
    output 1, the mask index, is each sample's count of ones in the mask (onnxruntime's right-padding
    lengths), output 2 the sum before the norm."""
    ids = r.emit("Cast", [r.input(0)], r.value("ids"), to=onnx.TensorProto.INT64)
    total = r.emit("Gather", [r.input(2), ids], r.value("words"))
    if r.input(8):
        positions = r.emit("Cast", [r.input(8)], r.value("position_ids"), to=onnx.TensorProto.INT64)
    else:
        positions = r.emit("EmbedLayerNormalization:positions", [ids], r.value("position_ids"))
    total = r.emit("Add", [total, r.emit("Gather", [r.input(3), positions], r.value("positions"))],
                   r.value("with_positions"))
    if r.input(1) and r.input(4):
        segments = r.emit("Cast", [r.input(1)], r.value("segment_ids"), to=onnx.TensorProto.INT64)
        total = r.emit("Add", [total, r.emit("Gather", [r.input(4), segments], r.value("segments"))],
                       r.output(2) or r.value("with_segments"))
    elif r.output(2):
        total = r.emit("Identity", [total], r.output(2))
    r.emit("LayerNormalization", [total, r.input(5), r.input(6)], r.output(0), axis=-1,
           epsilon=float(r.attr("epsilon", 1e-12)))
    if r.output(1):
        if not r.input(7):
            if r.output(1) in r.read:
                raise r.refuse("its mask index is read but it has no mask input")
            return
        r.emit("EmbedLayerNormalization:mask-index", [r.input(7)], r.output(1))


@rewrites("MultiHeadAttention")
def _multi_head_attention(r: Rewriting) -> None:
    """onnxruntime's MultiHeadAttention (its optimizer writes it for ViT, CLIP, SAM and Whisper
    blocks) as the standard Attention it computes: q, k, v (batch, S, hidden), or k, v per head
    (batch, heads, L, size) made so; the bias added to each; a key padding mask (lengths, or
    0/1 per key) as mask_filter_value added where a key is masked, plus attention_bias;
    unidirectional as causal after any past cache; the past and present caches."""
    if r.input(8) or r.input(9):
        raise r.refuse("it has past_sequence_length or cache_indirection (a beam search's cache)")
    r.unread(3)
    if not r.input(1) or not r.input(2):
        raise r.refuse("its q, k, v or k, v are packed in one input (onnxruntime runs that on GPUs only)")
    heads = int(r.attr("num_heads"))
    q = r.input(0)
    k, v = (r.emit("MultiHeadAttention:flat", [r.input(i)], r.value(part)) for i, part in ((1, "k"), (2, "v")))
    if r.input(3):
        q, k, v = (r.emit("MultiHeadAttention:bias", [q, k, v, r.input(3)], r.value(f"{part}_biased"), part=index)
                   for index, part in enumerate("qkv"))
    mask = ""
    if r.input(4):
        mask = r.emit("MultiHeadAttention:mask", [r.input(4), q, k] + ([r.input(6)] if r.input(6) else []),
                      r.value("mask_bias"), mask_filter_value=float(r.attr("mask_filter_value", -10000.0)))
    if r.input(5):
        mask = r.emit("Add", [mask, r.input(5)], r.value("with_bias")) if mask else r.input(5)
    attrs = {"q_num_heads": heads, "kv_num_heads": heads, "is_causal": int(r.attr("unidirectional", 0))}
    if r.attr("scale", None):
        attrs["scale"] = float(r.attr("scale"))
    outputs = [r.output(i) for i in range(3)]
    while outputs and not outputs[-1]:
        outputs.pop()
    r.nodes.append(helper.make_node("Attention", [q, k, v, mask, r.input(6), r.input(7)], outputs,
                                    name=f"{r.stem}:Attention", **attrs))


@rewrites("RotaryEmbedding")
def _contrib_rotary_embedding(r: Rewriting) -> None:
    """onnxruntime's RotaryEmbedding (input, position_ids, cos_cache, sin_cache) as the standard
    one (input, cos_cache, sin_cache, position_ids); a single position id is the first token's."""
    if r.attr("is_packed_batching", 0):
        raise r.refuse("is_packed_batching is set")
    if float(r.attr("scale", 1.0)) != 1.0:
        raise r.refuse("its scale is not 1")
    positions = r.emit("RotaryEmbedding:positions", [r.input(0), r.input(1)], r.value("positions"))
    attrs = {"interleaved": int(r.attr("interleaved", 0))}
    for name in ("num_heads", "rotary_embedding_dim"):
        if r.attr(name, 0):
            attrs[name] = int(r.attr(name))
    r.nodes.append(helper.make_node("RotaryEmbedding", [r.input(0), r.input(2), r.input(3), positions],
                                    [r.output(0)], name=f"{r.stem}:RotaryEmbedding", **attrs))

@rewrites("GroupQueryAttention")
def _group_query_attention(r: Rewriting) -> None:
    """onnxruntime's GroupQueryAttention (one per decoder block in the LLM files its model builder,
    onnxruntime-genai, and its optimizer write) as the standard ops it computes: q, k, v (or one
    packed input split), the rotary embedding at each token's position (do_rotary), then Attention
    over the past cache and the new keys, masked by seqlens_k (padding), causally and within
    local_window_size; attention_bias added; the present caches. The cache is read as the past
    keys followed by the new ones: every sample's cache as long as the past input, as in a batch
    that generates in step (a shared buffer or ragged caches are not what rankfold computes)."""
    named_inputs = {11: "head_sink", 12: "k_scale", 13: "v_scale", 14: "q_norm_weight", 15: "k_norm_weight"}
    for index, name in named_inputs.items():
        if r.input(index):
            raise r.refuse(f"it has the input {name}")
    for name in ("smooth_softmax", "sliding_window_cache", "qk_output"):
        if r.attr(name, 0):
            raise r.refuse(f"{name} is set")
    for name in ("k_quant_type", "v_quant_type"):
        if r.attr(name, b"NONE") not in (b"NONE", "NONE"):
            raise r.refuse(f"its cache is quantized ({name})")
    r.unread(3)
    heads, kv_heads = int(r.attr("num_heads")), int(r.attr("kv_num_heads"))
    q, k, v = r.input(0), r.input(1), r.input(2)
    if not k:
        q, k, v = (r.emit("GroupQueryAttention:unpack", [r.input(0)], r.value(part), part=index,
                          num_heads=heads, kv_num_heads=kv_heads) for index, part in enumerate("qkv"))
    seqlens_k, total, cos, sin = r.input(5), r.input(6), r.input(7), r.input(8)
    if r.attr("do_rotary", 0):
        positions = r.emit("GroupQueryAttention:positions", [q, seqlens_k, total, r.input(9)], r.value("positions"))
        interleaved = int(r.attr("rotary_interleaved", 0))
        q, k = (r.emit("RotaryEmbedding", [x, cos, sin, positions], r.value(f"{part}_rotated"), num_heads=n,
                       interleaved=interleaved)
                for x, part, n in ((q, "q", heads), (k, "k", kv_heads)))
    mask = r.emit("GroupQueryAttention:mask", [q, k, seqlens_k, r.input(3)], r.value("mask"),
                  causal=int(r.attr("causal", 1)), local_window_size=int(r.attr("local_window_size", -1)))
    if r.input(10):
        mask = r.emit("Add", [mask, r.input(10)], r.value("with_bias"))
    attrs = {"q_num_heads": heads, "kv_num_heads": kv_heads}
    for name in ("scale", "softcap"):
        if r.attr(name, 0.0):
            attrs[name] = float(r.attr(name))
    outputs = [r.output(i) for i in range(3)]
    while outputs and not outputs[-1]:
        outputs.pop()
    r.nodes.append(helper.make_node("Attention", [q, k, v, mask, r.input(3), r.input(4)], outputs,
                                    name=f"{r.stem}:Attention", **attrs))

# ---- onnxruntime's dynamic quantization of fused BERT blocks (quantize_dynamic after its optimizer)

def _dequantized_constant(r: Rewriting, q: int, scale: int, zero: int) -> Tensor:
    """(q - zero) * scale of constant inputs, broadcast along the last axis (a scale per column)."""
    names = [r.input(q), r.input(scale), r.input(zero)]
    if any(name and name not in r.consts for name in names):
        raise r.refuse(f"its quantized weight {names[0]!r} or its scale or zero point is not a constant")
    value = r.consts[names[0]].float()
    if names[2]:
        value = value - r.consts[names[2]].float()
    return value * r.consts[names[1]].float()


def _delegated(r: Rewriting, op: str, inputs: list[str], weights: dict[str, Tensor]) -> None:
    """The float op `op` (another rewrite of REWRITES) on `inputs`, with r's outputs and attributes
    and the dequantized `weights` as its constants."""
    node = helper.make_node(op, inputs, list(r.node.output), name=r.stem, domain=CONTRIB)
    node.attribute.extend(r.node.attribute)
    for name, value in weights.items():
        r.added[name] = value
    inner = Rewriting(node, {**r.consts, **r.added}, r.read, r.foldable | set(r.added))
    REWRITES[f"{CONTRIB}.{op}"](inner)
    r.nodes += inner.nodes
    r.added.update(inner.added)


@rewrites("QAttention")
def _qattention(r: Rewriting) -> None:
    """Attention on DynamicQuantizeLinear's codes with int8 q, k, v weights: the codes dequantized
    by their scale and zero point, the weights to float constants, then Attention as above."""
    if r.input(8):
        raise r.refuse("it has a past key-value cache")
    x = _dequantized(r, r.input(0), r.input(3), r.input(6), "x")
    weight = r.value("qkv_weight")
    _delegated(r, "Attention", [x, weight, r.input(2), r.input(5)], {weight: _dequantized_constant(r, 1, 4, 7)})


@rewrites("QEmbedLayerNormalization")
def _qembed_layer_norm(r: Rewriting) -> None:
    """EmbedLayerNormalization with its tables, gain and bias stored in 8 bits (a scale and zero point each)."""
    names = ["word", "position", "segment", "gamma", "beta"]
    weights = {r.value(name): _dequantized_constant(r, 2 + i, 8 + i, 13 + i)
               for i, name in enumerate(names) if r.input(2 + i)}
    inputs = [r.input(0), r.input(1)] + [r.value(n) if r.input(2 + i) else "" for i, n in enumerate(names)]
    _delegated(r, "EmbedLayerNormalization", inputs + [r.input(7)], weights)


@rewrites("DynamicQuantizeLSTM")
def _dynamic_quantize_lstm(r: Rewriting) -> None:
    """The float LSTM onnxruntime's DynamicQuantizeLSTM quantizes: its int8 weights, kept as
    (directions, inputs, 4 * hidden) with a scale and zero point per direction (or per column),
    dequantized to ONNX's (directions, 4 * hidden, inputs)."""
    inputs = [r.input(i) for i in range(12)]
    if any(inputs[i] not in r.consts for i in (1, 2, 8, 9, 10, 11)):
        raise r.refuse("its weights, scales and zero points are not all constants")
    for index, scale, kind in ((1, 8, "W"), (2, 10, "R")):
        q = r.consts[inputs[index]].float()
        scales, zeros = (r.consts[inputs[i]].float() for i in (scale, scale + 1))
        spread = (-1, 1, 1) if scales.ndim == 1 else (scales.shape[0], 1, scales.shape[-1])
        inputs[index] = r.constant(kind, ((q - zeros.reshape(spread)) * scales.reshape(spread)).transpose(1, 2))
    r.nodes.append(helper.make_node("LSTM", inputs[:8], list(r.node.output), name=r.stem,
                                    **_plain_attributes(r, ())))


# ---- onnxruntime's QOperator format: DequantizeLinear -> float op -> QuantizeLinear ----------

def _dequantized(r: Rewriting, x: str, scale: str, zero: str, suffix: str, **attrs) -> str:
    return r.emit("DequantizeLinear", [x, scale] + ([zero] if zero else []), r.value(suffix), **attrs)


def _quantized(r: Rewriting, y: str, scale: str, zero: str) -> None:
    r.emit("QuantizeLinear", [y, scale] + ([zero] if zero else []), r.output(0))


@rewrites("QLinearConv", domain="")
def _qlinear_conv(r: Rewriting) -> bool | None:
    """Standard QLinearConv with constant weights: its input and weights dequantized (the weights
    fold to float), a float Conv (a layer) with the int32 bias at x_scale * w_scale, quantized again."""
    if r.input(3) not in r.foldable:
        return False  # weights computed from the input: the integer op runs as it is
    x = _dequantized(r, r.input(0), r.input(1), r.input(2), "x")
    w = _dequantized(r, r.input(3), r.input(4), r.input(5), "w", axis=0)
    inputs = [x, w]
    if r.input(8):
        bias_scale = r.emit("Mul", [r.input(1), r.input(4)], r.value("bias_scale"))
        inputs.append(r.emit("DequantizeLinear", [r.input(8), bias_scale], r.value("bias"), axis=0))
    _quantized(r, r.emit("Conv", inputs, r.value("y"), **_plain_attributes(r, ())), r.input(6), r.input(7))


@rewrites("QLinearMatMul", domain="")
def _qlinear_matmul(r: Rewriting) -> bool | None:
    if r.input(3) not in r.foldable or (r.input(3) in r.consts and r.consts[r.input(3)].ndim != 2):
        return False
    a = _dequantized(r, r.input(0), r.input(1), r.input(2), "a")
    b = _dequantized(r, r.input(3), r.input(4), r.input(5), "b", axis=1)
    _quantized(r, r.emit("MatMul", [a, b], r.value("y")), r.input(6), r.input(7))


@rewrites("QGemm")
def _qgemm(r: Rewriting) -> bool | None:
    """onnxruntime's QGemm: alpha * A' B' + C, C an int32 bias at a_scale * b_scale; the result
    quantized where y_scale is given, float otherwise."""
    if r.input(3) not in r.foldable:
        return False
    trans_b = int(r.attr("transB", 0))
    a = _dequantized(r, r.input(0), r.input(1), r.input(2), "a")
    b = _dequantized(r, r.input(3), r.input(4), r.input(5), "b", axis=0 if trans_b else 1)
    inputs = [a, b]
    if r.input(6):
        bias_scale = r.emit("Mul", [r.input(1), r.input(4)], r.value("bias_scale"))
        inputs.append(r.emit("DequantizeLinear", [r.input(6), bias_scale], r.value("bias"), axis=0))
    attrs = {"alpha": float(r.attr("alpha", 1.0)), "transA": int(r.attr("transA", 0)), "transB": trans_b}
    if not r.input(7):
        r.emit("Gemm", inputs, r.output(0), **attrs)
        return
    _quantized(r, r.emit("Gemm", inputs, r.value("y"), **attrs), r.input(7), r.input(8))


@rewrites("QLinearAdd", "QLinearMul")
def _qlinear_binary(r: Rewriting) -> None:
    a = _dequantized(r, r.input(0), r.input(1), r.input(2), "a")
    b = _dequantized(r, r.input(3), r.input(4), r.input(5), "b")
    op = r.node.op_type.removeprefix("QLinear")
    _quantized(r, r.emit(op, [a, b], r.value("y")), r.input(6), r.input(7))


@rewrites("QLinearSigmoid", "QLinearLeakyRelu", "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSoftmax")
def _qlinear_unary(r: Rewriting) -> None:
    """DequantizeLinear -> the op -> QuantizeLinear. QLinearSoftmax's `opset` names the Softmax
    semantics of the model's own opset, which the rewritten Softmax takes anyway."""
    if r.attr("channels_last", 0):
        raise r.refuse("channels_last is set")
    x = _dequantized(r, r.input(0), r.input(1), r.input(2), "x")
    op = r.node.op_type.removeprefix("QLinear")
    attrs = _plain_attributes(r, ("channels_last", "opset"))
    _quantized(r, r.emit(op, [x], r.value("y"), **attrs), r.input(3), r.input(4))


@rewrites("QLinearConcat")
def _qlinear_concat(r: Rewriting) -> None:
    parts = [_dequantized(r, r.input(i), r.input(i + 1), r.input(i + 2), f"x{i}")
             for i in range(2, len(r.node.input), 3)]
    _quantized(r, r.emit("Concat", parts, r.value("y"), axis=int(r.attr("axis"))), r.input(0), r.input(1))


@rewrites("QuantizeLinear", "DequantizeLinear")
def _contrib_quantizer(r: Rewriting) -> None:
    """onnxruntime's own (Q|DQ)uantizeLinear, as older quantizers wrote for 16-bit: the standard op."""
    r.emit(r.node.op_type, list(r.node.input), r.output(0), **_plain_attributes(r, ()))


def supported() -> set[str]:
    """The domain-qualified names of the ops rewritten here (the standard ones are supported anyway)."""
    return {name for name in REWRITES if "." in name}
