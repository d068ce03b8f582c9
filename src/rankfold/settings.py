"""Defaults and run settings shared by the CLI and the API, importable without torch (so that
`rankfold --help` starts at once)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

# A factorization narrower than this many channels cuts a layer to a sliver (a 1->64 stem at rank
# 2, a 10-class classifier at rank 2) for a negligible saving: such layers are left alone.
DEFAULT_MIN_RANK = 8
DEFAULT_MIN_AGREEMENT = 0.8  # top-1 agreement with the original the self-check requires
DEFAULT_MAX_OUTPUT_ERROR = 0.2  # relative error allowed on an output that is not (N, classes)
DEFAULT_MIN_COSINE = 0.98  # mean cosine similarity to the original an embedding output must keep
# A causal language model's held-back perplexity may rise at most this many times (SVD-LLM's
# best published 20 % cut of LLaMA-7B rises 1.40 times; rankfold's goal at 20 % is 1.25).
DEFAULT_MAX_PERPLEXITY_RATIO = 1.25

# Calibration samples per pass: peak memory grows with this, never with the number of samples.
DEFAULT_BATCH = 64  # samples per pass when memory allows; the memory budget may lower it

_batch = contextvars.ContextVar("rankfold_calibration_batch", default=DEFAULT_BATCH)


def calibration_batch() -> int:
    """Samples per pass over calibration data in the current run."""
    return _batch.get()


def use_batch(samples: int) -> None:
    """Calibration passes run `samples` at a time until the enclosing batches_of() block ends."""
    _batch.set(samples)


@contextlib.contextmanager
def batches_of(samples: int) -> Iterator[None]:
    """Every calibration pass inside the block runs `samples` at a time."""
    token = _batch.set(samples)
    try:
        yield
    finally:
        _batch.reset(token)





# Bytes a run may spend beyond its calibration batches on holding graph state between layers
# (GraphCursor): set from the memory plan; None means a quarter of the memory available.
_headroom = contextvars.ContextVar("rankfold_memory_headroom", default=None)


def memory_headroom() -> int | None:
    return _headroom.get()


def use_memory_headroom(bytes_: int | None) -> None:
    _headroom.set(bytes_)


@contextlib.contextmanager
def memory_headroom_of(bytes_: int | None) -> Iterator[None]:
    """Graph state inside the block may take `bytes_` beyond the calibration batches."""
    token = _headroom.set(bytes_)
    try:
        yield
    finally:
        _headroom.reset(token)
