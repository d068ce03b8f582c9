"""The golden model: the integer program run in NumPy, exactly as the generated C computes it."""

from __future__ import annotations

import numpy as np

from rankfold.cexport.arith import multiply_by_quantized_multiplier as mbqm
from rankfold.cexport.ir import ADD_LEFT_SHIFT, Add, AvgPool, Conv, Program, Requant
from rankfold.quantize.core import ACT_QMAX

_MAX_EXACT = 2**53  # integer dot products are exact in float64 (and fast, through BLAS) below this


def _conv(op: Conv, x: np.ndarray, zp_in: int, out_shape: tuple[int, ...], zp_out: int) -> np.ndarray:
    n = x.shape[0]
    c_in = x.shape[1] if x.ndim == 4 else x.shape[1]
    x = x.reshape(n, c_in, *(x.shape[2:] if x.ndim == 4 else (1, 1))).astype(np.int64) - zp_in
    top, left, bottom, right = op.pads
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))  # padding is real 0 = zp_in - zp_in
    out_c, per_group, kh, kw = op.weight.shape
    out_h, out_w = (out_shape[1], out_shape[2]) if len(out_shape) == 3 else (1, 1)
    (sh, sw), (dh, dw) = op.stride, op.dilation
    acc = np.empty((n, out_c, out_h, out_w), np.int64)
    for g in range(op.groups):
        xs = x[:, g * per_group : (g + 1) * per_group].astype(np.float64)
        cols = np.empty((n, out_h, out_w, per_group, kh, kw))
        for i in range(kh):
            for j in range(kw):
                rows = slice(i * dh, i * dh + sh * (out_h - 1) + 1, sh)
                cols_ = slice(j * dw, j * dw + sw * (out_w - 1) + 1, sw)
                window = xs[:, :, rows, cols_]
                cols[:, :, :, :, i, j] = window.transpose(0, 2, 3, 1)
        group_out = out_c // op.groups
        w = op.weight[g * group_out : (g + 1) * group_out].reshape(group_out, -1).astype(np.float64)
        dots = cols.reshape(n * out_h * out_w, -1) @ w.T
        assert np.abs(dots).max(initial=0) < _MAX_EXACT
        acc[:, g * group_out : (g + 1) * group_out] = np.rint(dots).astype(np.int64).reshape(
            n, out_h, out_w, group_out).transpose(0, 3, 1, 2)
    acc += op.bias.astype(np.int64)[None, :, None, None]
    scaled = mbqm(acc, op.multiplier[None, :, None, None], op.shift[None, :, None, None]) + zp_out
    return np.clip(scaled, op.act_min, op.act_max).reshape(n, *out_shape).astype(np.int8)


def run_op(program: Program, op, env: dict[str, np.ndarray]) -> np.ndarray:
    """One op of the program on int8 tensors in `env` (each (N, *shape)); returns its output."""
    t = program.tensors
    out = t[op.out]
    if isinstance(op, Conv):
        return _conv(op, env[op.inp], t[op.inp].zero_point, out.shape, out.zero_point)
    if isinstance(op, Add):
        a = (env[op.a].astype(np.int64) - t[op.a].zero_point) << ADD_LEFT_SHIFT
        b = (env[op.b].astype(np.int64) - t[op.b].zero_point) << ADD_LEFT_SHIFT
        total = mbqm(a, *op.a_mult) + mbqm(b, *op.b_mult)
        return np.clip(mbqm(total, *op.out_mult) + out.zero_point, op.act_min, ACT_QMAX).astype(np.int8)
    x = env[op.inp].astype(np.int64) - t[op.inp].zero_point
    if isinstance(op, AvgPool):
        total = x.reshape(x.shape[0], x.shape[1], -1).sum(2)
        return np.clip(mbqm(total, *op.mult) + out.zero_point, -128, ACT_QMAX).reshape(
            x.shape[0], *out.shape).astype(np.int8)
    if isinstance(op, Requant):
        return np.clip(mbqm(x, *op.mult) + out.zero_point, op.act_min, ACT_QMAX).reshape(
            x.shape[0], *out.shape).astype(np.int8)
    raise TypeError(f"unknown op {type(op).__name__}")


def run_golden(program: Program, x_q: np.ndarray) -> np.ndarray:
    """Run on int8 inputs (N, *input shape); returns the int8 output (N, *output shape)."""
    env = {program.input: np.asarray(x_q, np.int8)}
    for op in program.ops:
        env[op.out] = run_op(program, op, env)
    return env[program.output]
