"""Quantization arithmetic, pure functions on arrays (NumPy and torch alike).

Convention (TFLite / CMSIS-NN, see DESIGN.md): real = scale * (q - zero_point).
Weights: symmetric, zero point 0, q in [-(2^(b-1) - 1), 2^(b-1) - 1] (int8: +-127, int4: +-7),
one scale per output channel (or per group of input elements along the channel), or one for the
whole tensor (`per_tensor`: the file stores a single scale, 4 bytes fewer per channel; an int32
bias's scale is computed in the file from the weight's and the input's). With
`reduce_range`, int8 codes stay within +-63: onnxruntime on x86 without VNNI computes only those
exactly (rankfold/runtime.py); int4 is exact everywhere.
Activations: asymmetric int8, q in [-128, 127], one scale and zero point per tensor.
Rounding is half to even, as ONNX QuantizeLinear does.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

ACT_QMIN, ACT_QMAX = -128, 127
WEIGHT_BITS = (4, 8)


REDUCED_INT8_QMAX = 63


def weight_qmax(bits: int, reduce_range: bool = False) -> int:
    if bits not in WEIGHT_BITS:
        raise ValueError(f"weight bits must be one of {WEIGHT_BITS}, got {bits!r}")
    if reduce_range and bits == 8:
        return REDUCED_INT8_QMAX
    return 2 ** (bits - 1) - 1


class QuantizedWeight(NamedTuple):
    q: np.ndarray  # int8 array holding values within +-qmax (int4 values too, before packing)
    scale: np.ndarray  # (out_ch,) or (out_ch, groups): float32
    bits: int
    group_size: int | None  # elements of the flattened input axis per scale; None: per channel

    def dequantize(self) -> np.ndarray:
        out_ch = self.q.shape[0]
        flat = self.q.reshape(out_ch, -1).astype(np.float32)
        if self.group_size is None:
            return (flat * self.scale[:, None]).reshape(self.q.shape)
        scales = np.repeat(self.scale, self.group_size, axis=1)[:, : flat.shape[1]]
        return (flat * scales).reshape(self.q.shape)


def quantize_weight(weight: np.ndarray, bits: int, group_size: int | None = None, *,
                    reduce_range: bool = False, per_tensor: bool = False) -> QuantizedWeight:
    """Symmetric quantization with one scale per output channel (axis 0), or per `group_size`
    consecutive elements of each channel's flattened weights, or (`per_tensor`) one scale for
    all, repeated per channel in the result."""
    qmax = weight_qmax(bits, reduce_range)
    w = np.asarray(weight, dtype=np.float32)
    flat = w.reshape(w.shape[0], -1)
    if per_tensor and group_size is not None:
        raise ValueError("per_tensor and group_size exclude each other")
    if group_size is None:
        ranges = np.abs(flat).max(axis=1)
        scale = (np.full_like(ranges, ranges.max(initial=0.0)) if per_tensor else ranges) / qmax
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.round(flat / scale[:, None]), -qmax, qmax)
    else:
        if group_size < 1:
            raise ValueError(f"group_size must be positive, got {group_size}")
        groups = -(-flat.shape[1] // group_size)
        padded = np.zeros((flat.shape[0], groups * group_size), np.float32)
        padded[:, : flat.shape[1]] = flat
        blocks = padded.reshape(flat.shape[0], groups, group_size)
        scale = np.abs(blocks).max(axis=2) / qmax
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.round(blocks / scale[:, :, None]), -qmax, qmax).reshape(flat.shape[0], -1)[:, : flat.shape[1]]
    return QuantizedWeight(q.astype(np.int8).reshape(w.shape), scale, bits, group_size)


# int32 bias codes stay within this: a kernel adds a whole dot product's products to its bias code.
BIAS_CODE_LIMIT = 2**30


def with_bias_room(weight: np.ndarray, qw: QuantizedWeight, bias: np.ndarray, input_scale: float,
                   reduce_range: bool = False) -> QuantizedWeight:
    """`qw` (one scale per output channel) with each channel's scale raised where its bias would
    need an int32 code past BIAS_CODE_LIMIT at scale input_scale x weight scale; that channel's
    codes are made again at the raised scale.

    A channel whose weights are nearly zero but whose bias is not (a dead filter once a BatchNorm
    or an affine block is folded in: PP-OCRv4's recogniser has dozens) would otherwise have its
    bias clipped to a code that means almost nothing. Its weights are a rounding error of its
    output, so coarser steps cost nothing that matters."""
    floor = np.abs(np.asarray(bias, np.float64)) / (np.float64(input_scale) * BIAS_CODE_LIMIT)
    short = floor > qw.scale
    if not short.any():
        return qw
    # twice the least scale: the code lands at half the limit, whatever float32 does to the product
    scale = qw.scale.copy()
    scale[short] = (2 * floor[short]).astype(np.float32)
    qmax = weight_qmax(qw.bits, reduce_range)
    flat = np.asarray(weight, np.float32).reshape(weight.shape[0], -1)
    q = qw.q.reshape(flat.shape[0], -1).copy()
    q[short] = np.clip(np.round(flat[short] / scale[short, None]), -qmax, qmax)
    return QuantizedWeight(q.reshape(qw.q.shape), scale, qw.bits, None)


def fake_quantize_weight(weight: np.ndarray, bits: int, group_size: int | None = None, *,
                         reduce_range: bool = False, per_tensor: bool = False) -> np.ndarray:
    return quantize_weight(weight, bits, group_size, reduce_range=reduce_range, per_tensor=per_tensor).dequantize()


class ActivationParams(NamedTuple):
    scale: float
    zero_point: int

    def quantize(self, x: np.ndarray) -> np.ndarray:
        return np.clip(np.round(x / self.scale) + self.zero_point, ACT_QMIN, ACT_QMAX).astype(np.int8)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return ((q.astype(np.int32) - self.zero_point) * self.scale).astype(np.float32)


def activation_params(low: float, high: float) -> ActivationParams:
    """int8 asymmetric parameters covering [low, high]; the range always includes 0 so that
    zero (padding, ReLU) is exact."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    if high - low < 1e-12:
        return ActivationParams(1.0, 0)
    scale = (high - low) / (ACT_QMAX - ACT_QMIN)
    zero_point = int(np.clip(round(ACT_QMIN - low / scale), ACT_QMIN, ACT_QMAX))
    return ActivationParams(float(scale), zero_point)


def pack_int4(values: np.ndarray) -> bytes:
    """Two signed 4-bit values per byte, the first in the low nibble (ONNX INT4 layout)."""
    flat = np.asarray(values, dtype=np.int8).reshape(-1)
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise ValueError("int4 values must lie in [-8, 7]")
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    nibbles = (flat.astype(np.uint8) & 0x0F).reshape(-1, 2)
    return (nibbles[:, 0] | (nibbles[:, 1] << 4)).astype(np.uint8).tobytes()


def unpack_int4(data: bytes, count: int) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8)
    nibbles = np.stack([raw & 0x0F, raw >> 4], axis=1).reshape(-1)[:count].astype(np.int8)
    return np.where(nibbles > 7, nibbles - 16, nibbles).astype(np.int8)
