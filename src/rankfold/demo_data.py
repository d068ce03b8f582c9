"""Offline datasets for the demo: Fashion-MNIST from Debian's dataset-fashion-mnist, else
scikit-learn's bundled 8x8 digits. Nothing is downloaded."""

from __future__ import annotations

import gzip
import os
from typing import NamedTuple

import numpy as np

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530


class Split(NamedTuple):
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def read_idx(path: str) -> np.ndarray:
    """An IDX file (the MNIST format), gzip-compressed, as a uint8 array."""
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fmnist_preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, 1, 32, 32), normalised and padded as the reference expects."""
    x = (images.astype(np.float32) / 255.0 - FMNIST_MEAN) / FMNIST_STD
    x = np.pad(x, ((0, 0), (2, 2), (2, 2)), constant_values=-FMNIST_MEAN / FMNIST_STD)
    return x[:, None].astype(np.float32)


def fashion_mnist(directory: str = FMNIST_DIR) -> Split:
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = fmnist_preprocess(read_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz")))
        y = read_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz")).astype(np.int64)
        parts[split] = (x, y)
    return Split("Fashion-MNIST", *parts["train"], *parts["test"])


def digits() -> Split:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = ((data.images / 16.0 - 0.5) / 0.5).astype(np.float32)[:, None]
    x = np.pad(x, ((0, 0), (0, 0), (4, 4), (4, 4)), constant_values=-1.0)  # 16x16
    y = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    cut = int(0.8 * len(x))
    return Split("sklearn digits", x[:cut], y[:cut], x[cut:], y[cut:])


def demo_dataset() -> Split:
    """Fashion-MNIST when the Debian package is installed, otherwise the bundled digits."""
    if os.path.isfile(os.path.join(FMNIST_DIR, "train-images-idx3-ubyte.gz")):
        return fashion_mnist()
    return digits()
