"""The standard ONNX transformer operators of opsets 23 and 24: Attention and RotaryEmbedding.

torch.onnx writes `scaled_dot_product_attention` as one Attention node from opset 23 on, so a
transformer exported at a recent opset holds one per block; its q, k, v and output projections
stay MatMul nodes around it, so they become layers like any other. These ops compute what the
ONNX reference computes (the op's function body): keys and values appended to a past cache,
query heads sharing key heads (grouped-query attention), a causal mask aligned to the last key,
an additive or boolean mask, softcap; registered into onnx_ops' OPS table like every op, and
written with torch functions the TorchScript exporter translates.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rankfold.frontends.onnx_ops import op


def _heads_first(x: Tensor, heads: int) -> Tensor:
    """(batch, S, heads * size) -> (batch, heads, S, size)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _padded_mask(mask: Tensor, keys: int) -> Tensor:
    """The mask as an additive bias over all `keys` (a mask shorter than the keys leaves the last
    ones masked, as the spec pads it); a boolean mask marks the keys to attend."""
    if mask.dtype == torch.bool:
        mask = torch.where(mask, 0.0, float("-inf"))
    # decided on the sizes at hand (while the exporter traces, a mask as long as the keys must not
    # become a pad computed from sizes: one size read as a constant there would bake it)
    missing = int(keys) - int(mask.shape[-1])
    if missing > 0:
        pad = torch.full((*mask.shape[:-1], missing), float("-inf"), dtype=mask.dtype, device=mask.device)
        mask = torch.cat([mask, pad], dim=-1)
    return mask


def _causal_bias(queries, keys, offset, like: Tensor) -> Tensor:
    """0 where key j may be read by query i (j <= i + offset), -inf elsewhere: offset is the
    cache's length (one per sample with nonpad_kv_seqlen), so the last query reads every key."""
    i = torch.arange(queries, device=like.device).reshape(-1, 1)
    j = torch.arange(keys, device=like.device).reshape(1, -1)
    if isinstance(offset, Tensor) and offset.ndim == 1:  # per sample: (batch, 1, S, T)
        allowed = j.unsqueeze(0) <= i.unsqueeze(0) + offset.reshape(-1, 1, 1)
        return torch.where(allowed, 0.0, float("-inf")).to(like.dtype).unsqueeze(1)
    return torch.where(j <= i + offset, 0.0, float("-inf")).to(like.dtype)


@op("Attention")
def _attention(vals, attrs):
    """softmax(softcap(Q K^T * scale) + bias) V per head. Q (batch, q heads, S, size) and K, V
    (batch, kv heads, T, size), or 3-D (batch, S, heads * size) with q_num_heads / kv_num_heads;
    outputs Y and the caches with the new keys and values appended (present_key, present_value)."""
    q, k, v = vals[:3]
    mask, past_key, past_value, nonpad = (list(vals[3:]) + [None] * 4)[:4]
    if attrs.get("_outputs", 1) > 3:
        raise ValueError("its output 3 (qk_matmul_output) is read; rankfold computes Y and the caches")
    if attrs.get("left_window_size", -1) >= 0 or attrs.get("right_window_size", -1) >= 0:
        raise ValueError("it has a sliding window (left_window_size / right_window_size)")
    flat = q.ndim == 3
    if flat:
        q = _heads_first(q, int(attrs["q_num_heads"]))
        k = _heads_first(k, int(attrs["kv_num_heads"]))
        v = _heads_first(v, int(attrs["kv_num_heads"]))
    if past_key is not None:
        k, v = torch.cat([past_key, k], dim=2), torch.cat([past_value, v], dim=2)
    present_key, present_value = k, v
    queries, keys = q.shape[2], k.shape[2]
    scale = attrs.get("scale")
    root = (float(scale) if scale is not None else 1.0 / q.shape[3] ** 0.5) ** 0.5
    if q.shape[1] != k.shape[1]:  # grouped-query attention: each key head serves a group of query heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = (q * root) @ (k * root).transpose(-1, -2)  # the scale split between Q and K, as the spec does
    softcap = float(attrs.get("softcap", 0.0))
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    bias = _padded_mask(mask, keys) if mask is not None else None
    if attrs.get("is_causal", 0):
        offset = past_key.shape[2] if past_key is not None else (nonpad - queries if nonpad is not None else 0)
        causal = _causal_bias(queries, keys, offset, scores)
        bias = causal if bias is None else bias + causal
    if nonpad is not None:
        padding = torch.arange(keys, device=q.device).reshape(1, -1) < nonpad.reshape(-1, 1)
        padding = torch.where(padding, 0.0, float("-inf")).to(scores.dtype).reshape(-1, 1, 1, keys)
        bias = padding if bias is None else bias + padding
    if bias is None:
        weights = torch.softmax(scores, dim=-1)
    else:
        weights = torch.softmax(scores + bias, dim=-1)
        # a query that may read no key reads nothing (softmax of all -inf would be NaN)
        weights = torch.where(bias.amax(dim=-1, keepdim=True) == float("-inf"), 0.0, weights)
    y = weights @ v
    if flat:
        y = y.transpose(1, 2).flatten(2)
    return [y, present_key, present_value][: attrs.get("_outputs", 1)]


@op("RotaryEmbedding")
def _rotary_embedding(vals, attrs):
    """Rotary position embedding (opset 23): the first rotary_embedding_dim features of each head
    rotated pairwise by the cached angles of each token's position (halves, or neighbours when
    interleaved); input (batch, heads, S, size) or (batch, S, heads * size) with num_heads."""
    x, cos, sin = vals[:3]
    positions = vals[3] if len(vals) > 3 else None
    flat = x.ndim == 3
    by_head = x.unflatten(-1, (int(attrs["num_heads"]), -1)) if flat else x.transpose(1, 2)  # (B, S, H, size)
    if positions is not None:
        cos, sin = cos[positions], sin[positions]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (B, S, 1, dim / 2)
    # unset, the caches' width says it (a partial rotation, as Phi's, has narrower caches)
    dim = int(attrs.get("rotary_embedding_dim", 0)) or 2 * cos.shape[-1]
    rotated, kept = by_head[..., :dim], by_head[..., dim:]
    interleaved = bool(attrs.get("interleaved", 0))
    first, second = (rotated[..., 0::2], rotated[..., 1::2]) if interleaved else rotated.chunk(2, dim=-1)
    real, imaginary = cos * first - sin * second, sin * first + cos * second
    rotated = torch.stack([real, imaginary], dim=-1).flatten(-2) if interleaved else torch.cat([real, imaginary], -1)
    out = torch.cat([rotated, kept], dim=-1)
    return [out.flatten(2) if flat else out.transpose(1, 2)]


# ---- onnxruntime's MultiHeadAttention and RotaryEmbedding (onnx_contrib rewrites them) -----------

@op("MultiHeadAttention:flat")
def _flat_heads(vals, attrs):
    """k or v as (batch, S, hidden): per head (batch, heads, S, size) is put tokens first."""
    x = vals[0]
    if x.ndim == 4:
        return [x.transpose(1, 2).flatten(2)]
    if x.ndim != 3:
        raise ValueError(f"a key or value of shape {tuple(x.shape)}: packed ones run on GPUs only in onnxruntime, "
                         "rankfold reads (batch, S, hidden) and (batch, heads, S, size)")
    return [x]


@op("MultiHeadAttention:bias")
def _biased(vals, attrs):
    """q, k or v (by `part`) plus its share of the packed (q + k + v) bias."""
    q, k, v, bias = vals
    sizes = [q.shape[-1], k.shape[-1], v.shape[-1]]
    part = attrs.get("part", 0)
    start = sum(sizes[:part])
    return [(q, k, v)[part] + bias[start : start + sizes[part]]]


def _kept_keys(mask: Tensor, keys) -> Tensor:
    """Which keys each sample's queries read, (batch, 1, 1 or queries, keys) bool, from onnxruntime's
    masks: lengths (batch,), 0/1 per key (batch, keys) or per query and key (batch, queries, keys)."""
    if mask.ndim == 1:
        keep = torch.arange(keys, device=mask.device).reshape(1, -1) < mask.reshape(-1, 1)
    elif mask.ndim in (2, 3):
        keep = mask != 0
    else:
        raise ValueError(f"a mask of shape {tuple(mask.shape)} (read: (batch,) lengths, (batch, keys) or "
                         "(batch, queries, keys) 0/1 masks)")
    return keep.reshape(keep.shape[0], 1, -1, keep.shape[-1])


@op("Attention:mask-bias")
def _attention_mask_bias(vals, attrs):
    """onnxruntime's Attention mask as an additive bias for the (batch, heads, S, T) scores: its
    mask_index (lengths or a 0/1 mask per key), and/or unidirectional; masked keys get mask_filter_value."""
    scores = vals[0]
    queries, keys = scores.shape[-2], scores.shape[-1]
    keep = torch.ones(1, 1, 1, keys, dtype=torch.bool, device=scores.device)
    if len(vals) > 1 and vals[1] is not None:
        index = vals[1]
        if index.ndim not in (1, 2) or (index.ndim == 1 and index.shape[0] != scores.shape[0]):
            raise ValueError(f"mask_index of shape {tuple(index.shape)} (read: (batch,) lengths, (batch, keys) masks)")
        keep = _kept_keys(index, keys)
    if attrs.get("unidirectional", 0):
        causal = torch.ones(queries, keys, dtype=torch.bool, device=scores.device).tril(keys - queries)
        keep = keep & causal.reshape(1, 1, queries, keys)
    return [torch.where(keep, 0.0, attrs.get("mask_filter_value", -10000.0)).to(scores.dtype)]


@op("MultiHeadAttention:mask")
def _key_padding_bias(vals, attrs):
    """The key padding mask as an additive bias over every key (a past cache's first):
    mask_filter_value where a key is masked."""
    mask, q, k = vals[:3]
    keys = k.shape[1] + (vals[3].shape[2] if len(vals) > 3 and vals[3] is not None else 0)
    return [torch.where(_kept_keys(mask, keys), 0.0, attrs.get("mask_filter_value", -10000.0)).to(q.dtype)]


@op("RotaryEmbedding:positions")
def _rotary_positions(vals, attrs):
    """Position ids (batch, S), from onnxruntime's (batch, S) ids or one offset (the first token's)."""
    x, ids = vals
    if ids.numel() != 1:
        return [ids]
    tokens = x.shape[1] if x.ndim == 3 else x.shape[2]
    offset = ids.reshape(()).to(torch.int64)
    return [(offset + torch.arange(tokens, device=x.device)).reshape(1, -1).expand(x.shape[0], -1)]


# ---- onnxruntime's GroupQueryAttention (onnx_contrib rewrites it) ------------------------------

@op("GroupQueryAttention:unpack")
def _unpacked_qkv(vals, attrs):
    """q, k or v (by `part`) out of a packed (batch, S, (heads + 2 kv heads) * size) input."""
    qkv = vals[0]
    heads, kv_heads = int(attrs["num_heads"]), int(attrs["kv_num_heads"])
    size = qkv.shape[-1] // (heads + 2 * kv_heads)
    return [qkv.split([heads * size, kv_heads * size, kv_heads * size], dim=-1)[int(attrs["part"])]]


def _cache_offsets(seqlens_k: Tensor, total: Tensor, tokens: int) -> Tensor:
    """Where each sample's first new token sits, (batch,): 0 on a first prompt (as many tokens as
    the total), else after its cache (seqlens_k + 1 - tokens)."""
    first = torch.as_tensor(total).reshape(()).to(torch.int64) == tokens  # a size read from a Shape is an int
    return torch.where(first, 0, torch.as_tensor(seqlens_k).to(torch.int64) + 1 - tokens)


@op("GroupQueryAttention:positions")
def _gqa_positions(vals, attrs):
    """Each new token's position for the rotary embedding, (batch, S): its position ids where given."""
    x, seqlens_k, total = vals[:3]
    if len(vals) > 3 and vals[3] is not None:
        return [vals[3]]
    tokens = x.shape[1]
    return [_cache_offsets(seqlens_k, total, tokens).reshape(-1, 1) + torch.arange(tokens, device=x.device)]


@op("GroupQueryAttention:mask")
def _gqa_mask(vals, attrs):
    """The additive bias (batch, 1, S, T) over the cache and the new keys: a sample reads its first
    seqlens_k + 1 keys (the rest is padding), causally (key j up to the query's own position, the
    cache's length after it), within the last local_window_size keys where that is set."""
    q, k, seqlens_k = vals[:3]
    past = vals[3] if len(vals) > 3 and vals[3] is not None else None
    queries = q.shape[1]
    keys = k.shape[1] + (past.shape[2] if past is not None else 0)
    i = torch.arange(queries, device=q.device).reshape(1, -1, 1)
    j = torch.arange(keys, device=q.device).reshape(1, 1, -1)
    allowed = j < torch.as_tensor(seqlens_k).to(torch.int64).reshape(-1, 1, 1) + 1
    position = i + (keys - queries)
    if attrs.get("causal", 1):
        allowed = allowed & (j <= position)
    window = int(attrs.get("local_window_size", -1))
    if window >= 0:
        allowed = allowed & (j > position - window)
    return [torch.where(allowed, 0.0, float("-inf")).to(q.dtype).unsqueeze(1)]
