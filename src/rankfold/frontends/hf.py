"""Hugging Face model directories (config.json + safetensors + tokenizer.json), as modules whose
Linear layers rankfold compresses like any other: token ids in, the model's answer out.

`transformers` and `tokenizers` are optional (`pip install 'rankfold[llm]'`); nothing here
downloads anything: a directory is read as it lies on disk.
"""

from __future__ import annotations

import json
import math
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


class CausalLM(nn.Module):
    """A causal language model (Llama, SmolLM2, GPT-2, ...): token ids (N, T) in, the next-token
    logits (N, T, vocabulary) out. Calibration and test windows are full (no padding): the ids
    themselves are the labels, so perplexity needs nothing beside them."""

    output_names = ("logits",)
    output_kinds = ("next_token",)  # the self-check compares perplexity, the planner the token KL
    # torch.onnx (TorchScript) lacks ops of transformers' causal masks (aten::diff): the result is
    # saved with rankfold.save_compressed, and planning does not try an export to time it.
    exports_to_onnx = False

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: Tensor) -> Tensor:
        return self.lm(input_ids=ids.long(), use_cache=False).logits


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


def is_causal_lm(config: dict) -> bool:
    return any(str(a).endswith("ForCausalLM") for a in config.get("architectures") or ())


def load_hf(directory: str | os.PathLike) -> nn.Module:
    """The model in `directory`, in eval mode and float32: a sentence-transformers directory
    (1_Pooling/) gives a SentenceEncoder, a causal language model (architectures *ForCausalLM) a
    CausalLM; other kinds are refused with what is supported."""
    directory = os.fspath(directory)
    with open(_require(directory, CONFIG)) as handle:
        config = json.load(handle)
    if is_causal_lm(config):
        lm = _transformers().AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                                  local_files_only=True)
        return CausalLM(lm.eval()).eval()
    if not os.path.isfile(os.path.join(directory, POOLING)):
        raise RankfoldError(f"{directory}: model_type {config.get('model_type')!r} is neither a causal language "
                            "model (architectures *ForCausalLM) nor a sentence encoder (sentence-transformers "
                            "pooling, 1_Pooling/config.json): rankfold loads those two kinds")
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


def _tokenizer(directory: str | os.PathLike):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise RankfoldError("tokenizing text needs the optional extra: pip install 'rankfold[llm]'") from None
    return Tokenizer.from_file(_require(os.fspath(directory), TOKENIZER))


def text_windows(directory: str | os.PathLike, texts: Sequence[str], seq_len: int, count: int | None = None,
                 ) -> Tensor:
    """Token ids (windows, seq_len) int64 for a causal language model: the texts tokenized one after
    the other (each ended by a newline) and cut into consecutive full windows, the last partial one
    dropped; the first `count` windows when given. No padding: every id is a label for perplexity."""
    if seq_len < 2:
        raise RankfoldError(f"seq_len must be at least 2, got {seq_len}")
    tokenizer = _tokenizer(directory)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch([t + "\n" for t in texts], add_special_tokens=False):
        ids.extend(encoding.ids)
        if count is not None and len(ids) >= count * seq_len:
            break
    windows = len(ids) // seq_len if count is None else min(count, len(ids) // seq_len)
    if windows < 1:
        raise RankfoldError(f"the text holds {len(ids)} tokens: not one window of {seq_len}")
    return torch.tensor(ids[: windows * seq_len], dtype=torch.int64).reshape(windows, seq_len)


def tokenize(directory: str | os.PathLike, texts: Sequence[str], seq_len: int) -> Tensor:
    """Token ids (len(texts), seq_len) int64 by the directory's tokenizer.json, cut at seq_len
    and padded with its pad id."""
    if seq_len < 2:
        raise RankfoldError(f"seq_len must be at least 2, got {seq_len}")
    tokenizer = _tokenizer(directory)
    pad_id = tokenizer.token_to_id("[PAD]")
    pad_id = 0 if pad_id is None else pad_id
    tokenizer.enable_truncation(seq_len)
    tokenizer.enable_padding(pad_id=pad_id, length=seq_len)
    return torch.tensor([e.ids for e in tokenizer.encode_batch(list(texts))], dtype=torch.int64)


def saved_base(module: nn.Module) -> dict:
    """How rankfold.load_compressed rebuilds `module` around its saved weights (rankfold.json's
    "base"); a module load_hf did not make is refused."""
    if isinstance(module, SentenceEncoder):
        return {"kind": "sentence-encoder", "pad_id": module.pad_id, "normalize": module.normalize}
    if isinstance(module, CausalLM):
        return {"kind": "causal-lm"}
    raise RankfoldError("hf_source is for models read from a Hugging Face directory (frontends.hf.load_hf: sentence "
                        "encoders and causal language models); save other models without it")


def rebuilt_base(directory: str, base: dict) -> nn.Module:
    """The architecture `base` names, built from the config.json in `directory` (weights not loaded)."""
    transformers = _transformers()
    hf_config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    if base.get("kind") == "causal-lm":
        return CausalLM(transformers.AutoModelForCausalLM.from_config(hf_config).float().eval())
    if base.get("kind") == "sentence-encoder":
        encoder = transformers.AutoModel.from_config(hf_config)
        if getattr(encoder, "pooler", None) is not None:  # dropped at load (load_hf): never saved
            encoder.pooler = None
        return SentenceEncoder(encoder.float().eval(), base["pad_id"], base["normalize"])
    raise RankfoldError(f"{directory}: unknown saved model kind {base.get('kind')!r} (sentence-encoder, causal-lm)")


def read_texts(path: str | os.PathLike, option: str = "--calib-text") -> list[str]:
    """The non-empty lines of a text file, or of every *.txt file under a directory (sorted by path);
    errors name `option`, the command-line option that gave the path."""
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(os.path.join(root, name) for root, _dirs, names in os.walk(path)
                       for name in names if name.endswith(".txt"))
    elif os.path.isfile(path):
        files = [path]
    else:
        raise RankfoldError(f"{option} {path}: no such file or directory")
    lines = []
    for file in files:
        with open(file, encoding="utf-8", errors="replace") as handle:
            lines.extend(line.strip() for line in handle if line.strip())
    if not lines:
        raise RankfoldError(f"{option} {path}: no text ({len(files)} .txt file(s), every line empty)")
    return lines


def calibration_ids(directory: str | os.PathLike, model: nn.Module, texts: Sequence[str], seq_len: int,
                    samples: int) -> Tensor:
    """Token ids the model calibrates on: for a causal language model, `samples` consecutive full
    windows of `seq_len` tokens of the text; for a sentence encoder, its first `samples` lines, one
    sentence each, cut or padded to `seq_len`."""
    if isinstance(model, CausalLM):
        return text_windows(directory, texts, seq_len, samples)
    return tokenize(directory, list(texts)[:samples], seq_len)


def training_ids(directory: str | os.PathLike, texts: Sequence[str], seq_len: int) -> Tensor:
    """Token ids to fine-tune the model in `directory` on, from all of `texts` (tokenizer and config
    only: made before the model is read): every full window of `seq_len` tokens for a causal
    language model, every line (a sentence) cut or padded to `seq_len` for an encoder."""
    with open(_require(os.fspath(directory), CONFIG)) as handle:
        causal = is_causal_lm(json.load(handle))
    return text_windows(directory, texts, seq_len) if causal else tokenize(directory, list(texts), seq_len)


def perplexity(model: nn.Module, windows: Tensor, batch: int = 8) -> float:
    """exp of the mean next-token negative log-likelihood over every position of full `windows`
    (N, T) of a causal language model, streamed `batch` windows at a time."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(windows), batch):
            ids = windows[start : start + batch]
            logits = model(ids)[:, :-1]
            nll += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                     reduction="sum"))
            count += ids[:, 1:].numel()
    return math.exp(nll / max(count, 1))


def embedding_cosine(model: nn.Module, original: nn.Module, ids: Tensor, batch: int = 50) -> float:
    """Mean cosine similarity of two sentence encoders' embeddings of `ids`."""
    with torch.no_grad():
        return float(torch.cat([nn.functional.cosine_similarity(model(ids[i : i + batch]),
                                                                original(ids[i : i + batch]), dim=-1)
                                for i in range(0, len(ids), batch)]).mean())
