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
    _check_headers(path)
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
    if not np.issubdtype(x.dtype, np.floating):
        hint = " (preprocess it as the model expects, e.g. pixel / 255 then normalized, and save float32)" \
            if np.issubdtype(x.dtype, np.integer) else ""
        raise RankfoldError(f"{path}: 'x' must be floating point, got {x.dtype}{hint}")
    finite = np.isfinite(x)
    if not finite.all():
        bad = np.flatnonzero(~finite.reshape(len(x), -1).all(axis=1))
        raise RankfoldError(f"{path}: 'x' has NaN or infinite values in {len(bad)} sample(s), the first at index "
                            f"{int(bad[0])}")
    if need_labels and y is None:
        raise RankfoldError(f"{path}: no array 'y' of labels")
    if y is not None:
        if not np.issubdtype(y.dtype, np.integer) or y.shape != (len(x),):
            raise RankfoldError(f"{path}: 'y' must be {len(x)} integer labels, got {y.dtype} {y.shape}")
        if len(y) and y.min() < 0:
            raise RankfoldError(f"{path}: labels must be class indices >= 0, found {int(y.min())}")
    return Dataset(x.astype(np.float32, copy=False), y)


def _check_headers(path: str) -> None:
    """Each array's header against the bytes the archive holds, before anything is loaded: a header
    claiming 10^12 samples is a corrupt file, not a MemoryError."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
                    if version not in read:
                        continue
                    shape, _order, dtype = read[version](member)
                claimed = int(np.prod(shape, dtype=np.float64) * dtype.itemsize) if not dtype.hasobject else 0
                if claimed > info.file_size:
                    raise RankfoldError(f"{path}: {info.filename[:-4]!r} claims shape {tuple(shape)} ({claimed:,} "
                                        f"bytes) but the file holds {info.file_size:,}: corrupt or truncated")
    except RankfoldError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return  # np.load below names the problem


def check_input_shape(x: np.ndarray, expected: list, source: str) -> None:
    """Raise when `x`'s per-sample shape contradicts the model's static input dims."""
    sample = list(x.shape[1:])
    dims = list(expected[1:])
    ok = len(sample) == len(dims) and all(not isinstance(d, int) or d == s for d, s in zip(dims, sample))
    if not ok:
        shown = ["N", *[d if isinstance(d, int) else "?" for d in dims]]
        raise RankfoldError(f"{source}: samples of shape {tuple(x.shape)} do not fit the model's input {shown}")
