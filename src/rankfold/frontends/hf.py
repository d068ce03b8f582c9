"""Hugging Face model directories (config.json + safetensors + tokenizer.json), as modules whose
Linear layers rankfold compresses like any other: token ids in, the model's answer out.

`transformers` and `tokenizers` are optional (`pip install 'rankfold[llm]'`); nothing here
downloads anything: a directory is read as it lies on disk.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from rankfold.errors import RankfoldError

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
POOLING = os.path.join("1_Pooling", "config.json")  # sentence-transformers' pooling settings
MODULES = "modules.json"  # sentence-transformers' pipeline (Transformer, Pooling, Normalize)


class SentenceEncoder(nn.Module):
    """A sentence-transformers encoder: token ids (N, T), `pad_id` where a sentence has ended, in;
    the sentence embedding (N, hidden) out: the mean of the last hidden states over the tokens,
    L2-normalised when the model's pipeline normalises."""

    output_names = ("embedding",)
    output_kinds = ("embedding",)  # the self-check compares these by cosine, not by argmax

    def __init__(self, encoder: nn.Module, pad_id: int, normalize: bool) -> None:
        super().__init__()
        self.encoder, self.pad_id, self.normalize = encoder, int(pad_id), bool(normalize)

    def forward(self, ids: Tensor) -> Tensor:
        ids = ids.long()  # exact for float ids too (vocabularies are far below 2^24)
        mask = ids != self.pad_id
        hidden = self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        embedding = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return nn.functional.normalize(embedding, dim=-1) if self.normalize else embedding


def _require(directory: str, name: str) -> str:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise RankfoldError(f"{directory}: no {name}; expected a Hugging Face model directory (config.json, "
                            "model.safetensors, tokenizer.json)")
    return path


def _transformers():
    try:
        import transformers
    except ImportError:
        raise RankfoldError("Hugging Face models need the optional extra: pip install 'rankfold[llm]' "
                            "(transformers, safetensors)") from None
    return transformers


def is_hf_directory(path: str | os.PathLike) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG))


def load_hf(directory: str | os.PathLike) -> nn.Module:
    """The model in `directory`, in eval mode and float32. A sentence-transformers directory
    (1_Pooling/) gives a SentenceEncoder; other kinds are refused with what is supported."""
    directory = os.fspath(directory)
    with open(_require(directory, CONFIG)) as handle:
        config = json.load(handle)
    if not os.path.isfile(os.path.join(directory, POOLING)):
        raise RankfoldError(f"{directory}: model_type {config.get('model_type')!r} without sentence-transformers "
                            "pooling (1_Pooling/config.json); rankfold loads sentence encoders so far")
    with open(os.path.join(directory, POOLING)) as handle:
        pooling = json.load(handle)
    if not pooling.get("pooling_mode_mean_tokens", False):
        raise RankfoldError(f"{directory}: only mean pooling is supported, the model's pooling is {pooling}")
    normalize = False
    if os.path.isfile(os.path.join(directory, MODULES)):
        with open(os.path.join(directory, MODULES)) as handle:
            normalize = any(m.get("type", "").endswith("Normalize") for m in json.load(handle))
    encoder = _transformers().AutoModel.from_pretrained(directory, dtype=torch.float32, local_files_only=True)
    if getattr(encoder, "pooler", None) is not None:
        # Mean pooling never reads the [CLS] pooler: dropped, so that it is neither priced, planned,
        # nor run (an ONNX export would drop it anyway, leaving its plan nothing to act on).
        encoder.pooler = None
    return SentenceEncoder(encoder.eval(), config.get("pad_token_id", 0) or 0, normalize).eval()


def tokenize(directory: str | os.PathLike, texts: Sequence[str], seq_len: int) -> Tensor:
    """Token ids (len(texts), seq_len) int64 by the directory's tokenizer.json, cut at seq_len
    and padded with its pad id."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise RankfoldError("tokenizing text needs the optional extra: pip install 'rankfold[llm]'") from None
    if seq_len < 2:
        raise RankfoldError(f"seq_len must be at least 2, got {seq_len}")
    tokenizer = Tokenizer.from_file(_require(os.fspath(directory), TOKENIZER))
    pad_id = tokenizer.token_to_id("[PAD]")
    pad_id = 0 if pad_id is None else pad_id
    tokenizer.enable_truncation(seq_len)
    tokenizer.enable_padding(pad_id=pad_id, length=seq_len)
    return torch.tensor([e.ids for e in tokenizer.encode_batch(list(texts))], dtype=torch.int64)
