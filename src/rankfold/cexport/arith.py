"""The integer requantization arithmetic (TFLite / CMSIS-NN convention, DESIGN.md), in NumPy.
The generated C implements exactly these functions; the golden model calls these."""

from __future__ import annotations

import math

import numpy as np

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def quantize_multiplier(real: float) -> tuple[int, int]:
    """real = multiplier * 2^(shift - 31), multiplier in [2^30, 2^31): frexp, then rounding the
    mantissa half away from zero (a mantissa that rounds up to 2^31 is halved, the shift raised)."""
    if real <= 0:
        return 0, 0
    mantissa, exponent = math.frexp(real)
    multiplier = int(math.floor(mantissa * 2**31 + 0.5))
    if multiplier == 2**31:
        multiplier //= 2
        exponent += 1
    if exponent < -31:  # too small to matter: the product rounds to zero
        return 0, 0
    return multiplier, exponent


def _trunc_div_pow2(x: np.ndarray, bits: int) -> np.ndarray:
    """x / 2^bits rounded toward zero, as C's integer division does."""
    return np.where(x >= 0, x >> bits, -((-x) >> bits))


def saturating_rounding_doubling_high_mul(a: np.ndarray, b: np.ndarray | int) -> np.ndarray:
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    product = a * b
    nudge = np.where(product >= 0, np.int64(1 << 30), np.int64(1 - (1 << 30)))
    result = _trunc_div_pow2(product + nudge, 31)
    overflow = (a == INT32_MIN) & (b == INT32_MIN)
    return np.where(overflow, INT32_MAX, result).astype(np.int64)


def rounding_divide_by_pow2(x: np.ndarray, exponent: np.ndarray | int) -> np.ndarray:
    """x / 2^exponent rounded to nearest, halves away from zero (exponent >= 0, per element)."""
    x = np.asarray(x, dtype=np.int64)
    exponent = np.asarray(exponent, dtype=np.int64)
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def multiply_by_quantized_multiplier(x: np.ndarray, multiplier, shift) -> np.ndarray:
    """round(x * multiplier * 2^(shift - 31)) in int32 arithmetic; per-channel arrays broadcast."""
    x = np.asarray(x, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    left, right = np.maximum(shift, 0), np.maximum(-shift, 0)
    scaled = np.clip(x << left, INT32_MIN, INT32_MAX)
    return rounding_divide_by_pow2(saturating_rounding_doubling_high_mul(scaled, multiplier), right)
