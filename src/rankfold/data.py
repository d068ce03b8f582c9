"""Datasets as .npz files: `x` float32 (N, ...) inputs and `y` integer (N,) labels."""

from __future__ import annotations

import os
import zipfile
from typing import NamedTuple

import numpy as np

from rankfold.errors import RankfoldError


class Dataset(NamedTuple):
    x: np.ndarray
    y: np.ndarray | None


def load_npz(path: str | os.PathLike, *, need_labels: bool = True) -> Dataset:
    """Read a dataset .npz; every way it can be wrong ends in one RankfoldError line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise RankfoldError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data.files:
                raise RankfoldError(f"{path}: no array 'x' (found: {', '.join(data.files) or 'none'})")
            x = np.asarray(data["x"])
            y = np.asarray(data["y"]) if "y" in data.files else None
    except RankfoldError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise RankfoldError(f"{path}: not a readable .npz file ({type(exc).__name__})") from None
    if x.ndim < 2 or len(x) == 0:
        raise RankfoldError(f"{path}: 'x' must be (N, ...) with N > 0, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise RankfoldError(f"{path}: 'x' must be numeric, got {x.dtype}")
    if need_labels and y is None:
        raise RankfoldError(f"{path}: no array 'y' of labels")
    if y is not None:
        if not np.issubdtype(y.dtype, np.integer) or y.shape != (len(x),):
            raise RankfoldError(f"{path}: 'y' must be {len(x)} integer labels, got {y.dtype} {y.shape}")
    return Dataset(x.astype(np.float32, copy=False), y)


def check_input_shape(x: np.ndarray, expected: list, source: str) -> None:
    """Raise when `x`'s per-sample shape contradicts the model's static input dims."""
    sample = list(x.shape[1:])
    dims = list(expected[1:])
    ok = len(sample) == len(dims) and all(not isinstance(d, int) or d == s for d, s in zip(dims, sample))
    if not ok:
        shown = ["N", *[d if isinstance(d, int) else "?" for d in dims]]
        raise RankfoldError(f"{source}: samples of shape {tuple(x.shape)} do not fit the model's input {shown}")
