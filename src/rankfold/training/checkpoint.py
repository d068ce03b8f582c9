"""Checkpoints that survive a crash or a kill: written whole under a unique name and renamed into
place, and refused on resume when they belong to another run."""

from __future__ import annotations

import hashlib
import io
import json
import os

import torch
from torch import Tensor, nn

from rankfold.errors import RankfoldError
from rankfold.io import replace_atomically

CHECKPOINT_NAME = "finetune-checkpoint.pt"


def fingerprint(student: nn.Module, train_x: Tensor, settings: dict) -> str:
    """What makes two runs the same run: the student's parameter names and shapes, the training
    data's size and a sample of its values, and the settings that shape the trajectory (not the
    number of processes: the global batch is the same whatever it is)."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(settings.items()), default=str).encode())
    h.update(json.dumps([(n, list(p.shape)) for n, p in student.named_parameters()]).encode())
    h.update(json.dumps(list(train_x.shape)).encode())
    h.update(train_x.flatten()[:: max(1, train_x.numel() // 4096)].double().numpy().tobytes())
    return h.hexdigest()[:16]


def save_checkpoint(directory: str, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    replace_atomically(os.path.join(directory, CHECKPOINT_NAME), buffer.getvalue())


def load_checkpoint(directory: str, expected_fingerprint: str) -> dict | None:
    """The checkpoint in `directory`, or None when there is none; an error when it is another run's."""
    path = os.path.join(directory, CHECKPOINT_NAME)
    if not os.path.exists(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which, do not guess
        raise RankfoldError(f"{path}: not a readable rankfold checkpoint ({type(exc).__name__}); remove it to "
                            "start afresh") from None
    if not isinstance(state, dict) or state.get("fingerprint") != expected_fingerprint:
        raise RankfoldError(f"{path} belongs to another run (other model, data or settings): remove it, or give "
                            "another --checkpoint directory")
    return state
