"""Datasets as .npz files: `x` float32 (N, ...) inputs and `y` integer (N,) labels; or, for a
graph with several inputs, one array per input, keyed by the input's name (graph_data)."""

from __future__ import annotations

import os
import zipfile
from typing import NamedTuple

import numpy as np

from rankfold.errors import RankfoldError


class Dataset(NamedTuple):
    x: np.ndarray
    y: np.ndarray | None
    # The graph inputs packed in x, in slot order, where several differ per sample
    # (rankfold.frontends.packing); empty where x is the one per-sample input.
    packed: tuple[str, ...] = ()
    # Their per-sample shapes where they differ (x holds each sample's values flattened, one input
    # after another); None where they are stacked on axis 1
    packed_shapes: tuple[tuple[int, ...], ...] | None = None


class GraphInput(NamedTuple):
    """One input of a graph as it declares it: dims are ints where static, None where open."""

    name: str
    dims: list
    dtype: np.dtype
    symbols: tuple = ()  # the open dims' names (dim_param) where the graph gives them, else None


def load_npz(path: str | os.PathLike, *, need_labels: bool = True) -> Dataset:
    """Read a dataset .npz; every way it can be wrong ends in one RankfoldError line."""
    path = os.fspath(path)
    arrays = _arrays(path)
    if "x" not in arrays:
        raise RankfoldError(f"{path}: no array 'x' (found: {', '.join(arrays) or 'none'})")
    return _labelled(path, _checked_samples(path, "x", arrays["x"]), arrays.get("y"), need_labels)


def _labelled(path: str, x: np.ndarray, y: np.ndarray | None, need_labels: bool) -> Dataset:
    """The samples with their labels `y`, checked (required with `need_labels`)."""
    if need_labels and y is None:
        raise RankfoldError(f"{path}: no array 'y' of labels")
    if y is not None:
        if not np.issubdtype(y.dtype, np.integer) or y.shape != (len(x),):
            raise RankfoldError(f"{path}: 'y' must be {len(x)} integer labels, got {y.dtype} {y.shape}")
        if len(y) and y.min() < 0:
            raise RankfoldError(f"{path}: labels must be class indices >= 0, found {int(y.min())}")
    return Dataset(x, y)


def _arrays(path: str) -> dict[str, np.ndarray]:
    """Every array of the .npz file at `path`, by name; one RankfoldError line for a bad file."""
    if not os.path.isfile(path):
        raise RankfoldError(f"{path}: no such file")
    _check_headers(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: np.asarray(data[name]) for name in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise RankfoldError(f"{path}: not a readable .npz file ({type(exc).__name__})") from None


def _checked_samples(path: str, name: str, x: np.ndarray, declared: np.dtype | None = None) -> np.ndarray:
    """The per-sample array `name` as float32, refused when it is empty, not floating point or not
    finite; where the graph declares an integer input (token ids, bytes), integers of its dtype."""
    if x.ndim < 2 or len(x) == 0:
        raise RankfoldError(f"{path}: '{name}' must be (N, ...) with N > 0, got shape {x.shape}")
    if declared is not None and np.dtype(declared) == np.bool_:  # a mask
        if x.dtype != np.bool_ and not (np.issubdtype(x.dtype, np.integer) and np.isin(x, (0, 1)).all()):
            raise RankfoldError(f"{path}: '{name}' must be booleans (or 0 and 1) for the graph's bool input, got "
                                f"{x.dtype}")
        return x.astype(np.bool_, copy=False)
    if declared is not None and np.issubdtype(declared, np.integer):
        if not np.issubdtype(x.dtype, np.integer) or not np.can_cast(x.dtype, declared, "same_kind") or \
                (x.size and (x.min() < np.iinfo(declared).min or x.max() > np.iinfo(declared).max)):
            raise RankfoldError(f"{path}: '{name}' must be integers the graph's {np.dtype(declared).name} input "
                                f"holds, got {x.dtype}")
        return x.astype(declared, copy=False)
    if not np.issubdtype(x.dtype, np.floating):
        hint = " (preprocess it as the model expects, e.g. pixel / 255 then normalized, and save float32)" \
            if np.issubdtype(x.dtype, np.integer) else ""
        raise RankfoldError(f"{path}: '{name}' must be floating point, got {x.dtype}{hint}")
    finite = np.isfinite(x)
    if not finite.all():
        bad = np.flatnonzero(~finite.reshape(len(x), -1).all(axis=1))
        raise RankfoldError(f"{path}: '{name}' has NaN or infinite values in {len(bad)} sample(s), the first at "
                            f"index {int(bad[0])}")
    return x.astype(np.float32, copy=False)


def graph_data(path: str | os.PathLike, inputs: list[GraphInput], *,
               need_labels: bool = True) -> tuple[Dataset, dict[str, np.ndarray]]:
    """A graph's data: the per-sample input as Dataset.x (with labels y), and the inputs given once
    (a sample rate, an initial state), by name, in the dtype the graph declares.

    A single-input graph also takes the file `load_npz` reads (`x`). Otherwise every input has an
    array named after it. The per-sample input is the one whose leading axis is open (the batch)
    and whose array has the declared rank; every other array is given once, as the graph takes it
    for one call, and becomes a constant of the result (state is then the same for every sample).
    Several inputs that differ per sample (token ids and a padding mask) come packed in one x,
    their names in Dataset.packed (rankfold.frontends.packing).
    """
    path = os.fspath(path)
    arrays = _arrays(path)
    files = list(arrays)
    if "x" in files and len(inputs) == 1:
        return _labelled(path, _checked_samples(path, "x", arrays["x"], inputs[0].dtype), arrays.get("y"),
                         need_labels), {}
    names = [i.name for i in inputs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise RankfoldError(f"{path}: no array for the graph input(s) {', '.join(map(repr, missing))}: a graph with "
                            f"{len(names)} inputs takes one array per input, named after it ({', '.join(names)}; "
                            f"found: {', '.join(files) or 'none'})")
    extra = [n for n in files if n not in names and n != "y"]
    if extra:
        raise RankfoldError(f"{path}: array(s) {', '.join(map(repr, extra))} name no input of the graph "
                            f"(inputs: {', '.join(names)})")
    from rankfold.frontends.packing import pack_arrays

    varying = _per_sample_inputs(path, inputs, arrays)
    checked = {i.name: _checked_samples(path, i.name, arrays[i.name], i.dtype) for i in varying}
    names = [i.name for i in varying]
    x, shapes = (checked[names[0]], None) if len(names) == 1 else pack_arrays(path, names, checked)
    batch = {i.symbols[0] for i in varying if i.symbols and i.symbols[0]}
    fixed = {i.name: _given_once(path, i, arrays[i.name], len(x), batch) for i in inputs if i.name not in checked}
    data = _labelled(path, x, arrays.get("y"), need_labels)
    return (data._replace(packed=tuple(names), packed_shapes=shapes) if len(names) > 1 else data), fixed


def _per_sample_inputs(path: str, inputs: list[GraphInput], arrays: dict[str, np.ndarray]) -> list[GraphInput]:
    """The inputs that vary per sample: an open (or batch-1) leading axis, the declared rank, and
    the most rows. Several that differ per sample (ids and a padding mask) are calibrated
    together, packed (rankfold.frontends.packing). One the same for every sample (an all-ones
    mask stored per sample) is cut to its first row in `arrays`, to be given once."""
    candidates = [i for i in inputs if i.dims and i.dims[0] in (None, 1) and arrays[i.name].ndim == len(i.dims)]
    if not candidates:
        raise RankfoldError(f"{path}: no array is a batch of samples for the graph's inputs "
                            f"({', '.join(f'{i.name} {_shown(i.dims)}' for i in inputs)})")
    rows = max(len(arrays[i.name]) for i in candidates)
    most = [i for i in candidates if len(arrays[i.name]) == rows]
    if len(most) > 1 and rows > 1:
        varying = [i for i in most if not (arrays[i.name] == arrays[i.name][:1]).all()] or most[:1]
        for spec in most:
            if spec not in varying:
                arrays[spec.name] = arrays[spec.name][:1]
        return varying
    return most[:1]


def _given_once(path: str, spec: GraphInput, value: np.ndarray, samples: int, batch: set = frozenset()) -> np.ndarray:
    if value.ndim != len(spec.dims) or any(d is not None and d != s for d, s in zip(spec.dims, value.shape)):
        raise RankfoldError(f"{path}: '{spec.name}' given once must have the graph's shape {_shown(spec.dims)}, got "
                            f"{tuple(value.shape)}")

    def maybe_the_batch(axis: int) -> bool:  # an axis the graph names, not as the batch, is not (a mask's tokens)
        symbol = spec.symbols[axis] if axis < len(spec.symbols) else None
        return not (symbol and batch and symbol not in batch)

    per_sample = [axis for axis, (d, s) in enumerate(zip(spec.dims, value.shape))
                  if d is None and s == samples > 1 and maybe_the_batch(axis)]
    if per_sample:  # e.g. a recurrent state (2, N, 128): its batch axis is not the first
        raise RankfoldError(f"{path}: '{spec.name}' {tuple(value.shape)} holds one value per sample on axis "
                            f"{per_sample[0]}; rankfold takes it given once, the same for every sample: make that "
                            "axis 1")
    if value.dtype.kind in "fc" and not np.isfinite(value).all():
        raise RankfoldError(f"{path}: '{spec.name}' has NaN or infinite values")
    if value.dtype.kind not in "biuf":
        raise RankfoldError(f"{path}: '{spec.name}' must be numbers, got {value.dtype}")
    return value.astype(spec.dtype, copy=False)


def _shown(dims: list) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


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


def listed(names: list[str], shown: int = 3) -> str:
    """Input names for a progress line: all of a few, the first `shown` and a count of many (a
    decoder's 60 caches)."""
    if len(names) <= shown + 1:
        return ", ".join(names)
    return f"{', '.join(names[:shown])} and {len(names) - shown} more"
