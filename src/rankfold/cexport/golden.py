"""The golden model: the integer program run in NumPy, exactly as the generated C computes it."""

from __future__ import annotations

import numpy as np

from rankfold.cexport.arith import multiply_by_quantized_multiplier as mbqm
from rankfold.cexport.ir import (
    ADD_LEFT_SHIFT,
    SOFTMAX_SCALE_BITS,
    Add,
    AvgPool,
    Concat,
    Conv,
    Lookup,
    Mul,
    Pad,
    Pool,
    Program,
    Requant,
    Softmax,
    Transpose,
    mul_broadcast,
)
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


def _requant(x: np.ndarray, mult: tuple[int, int], zp_out: int, act_min: int = -128) -> np.ndarray:
    return np.clip(mbqm(x, *mult) + zp_out, act_min, ACT_QMAX)


def _windows(x: np.ndarray, op: Pool, out_hw: tuple[int, int], fill: int) -> tuple[np.ndarray, np.ndarray]:
    """Every output's window of taps (N, C, out_h, out_w, taps) from x padded with `fill`, and which
    taps lie inside the input (taps,) per output position (out_h, out_w, taps)."""
    top, left, bottom, right = op.pads
    (kh, kw), (sh, sw), (dh, dw) = op.kernel, op.stride, op.dilation
    out_h, out_w = out_hw
    h, w = x.shape[2], x.shape[3]
    extra_h = max((out_h - 1) * sh + (kh - 1) * dh + 1 - (h + top + bottom), 0)  # ceil_mode windows
    extra_w = max((out_w - 1) * sw + (kw - 1) * dw + 1 - (w + left + right), 0)
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom + extra_h), (left, right + extra_w)), constant_values=fill)
    inside = np.zeros((h + top + bottom + extra_h, w + left + right + extra_w), np.int64)
    inside[top : top + h, left : left + w] = 1  # 1: the input
    inside[: h + top + bottom, : w + left + right] += 1  # 2: the input, 1: padding, 0: beyond (ceil_mode)
    taps, where = [], []
    for i in range(kh):
        for j in range(kw):
            rows = slice(i * dh, i * dh + sh * (out_h - 1) + 1, sh)
            cols = slice(j * dw, j * dw + sw * (out_w - 1) + 1, sw)
            taps.append(padded[:, :, rows, cols])
            where.append(inside[rows, cols])
    return np.stack(taps, -1), np.stack(where, -1)


def _pool(op: Pool, x: np.ndarray, zp_in: int, out_shape: tuple[int, ...], zp_out: int) -> np.ndarray:
    if op.kind == "max":
        window, where = _windows(x.astype(np.int64), op, out_shape[1:], -(2**31))
        best = np.where(where == 2, window, -(2**31)).max(-1)
        return _requant(best - zp_in, op.mults[0], zp_out)
    window, where = _windows(x.astype(np.int64) - zp_in, op, out_shape[1:], 0)
    counted = where >= (1 if op.count_include_pad else 2)
    total = np.where(where == 2, window, 0).sum(-1)
    count = counted.sum(-1)
    mult = np.array([m for m, _ in op.mults])[count]
    shift = np.array([s for _, s in op.mults])[count]
    return _requant(total, (mult, shift), zp_out)


def _pad(op: Pad, x: np.ndarray, zp_in: int, zp_out: int) -> np.ndarray:
    moved = _requant(x.astype(np.int64) - zp_in, op.mult, zp_out)
    return np.pad(moved, ((0, 0), *op.pads), constant_values=op.value)


def _softmax(op: Softmax, x: np.ndarray, zp_out: int) -> np.ndarray:
    x = x.astype(np.int64)
    e = op.exp_table.astype(np.int64)[x.max(-1, keepdims=True) - x]
    total = e.sum(-1, keepdims=True) << SOFTMAX_SCALE_BITS
    return np.clip((e * op.inv_out_scale + total // 2) // total + zp_out, -128, ACT_QMAX)


def _mul(program: Program, op: Mul, env) -> np.ndarray:
    t = program.tensors
    a = env[op.a].astype(np.int64).reshape(len(env[op.a]), -1) - t[op.a].zero_point
    b = env[op.b].astype(np.int64).reshape(len(env[op.b]), -1) - t[op.b].zero_point
    count, inner = mul_broadcast(t[op.a].shape, t[op.b].shape)
    b_full = np.repeat(b, inner, axis=1) if b.shape[1] == count else b
    b_full = np.tile(b_full, (1, a.shape[1] // b_full.shape[1]))
    return _requant(a * b_full, op.mult, t[op.out].zero_point, op.act_min)


def _golden_conv(program: Program, op: Conv, env, n: int) -> np.ndarray:
    t = program.tensors
    return _conv(op, env[op.inp], t[op.inp].zero_point, t[op.out].shape, t[op.out].zero_point)


def _golden_add(program: Program, op: Add, env, n: int) -> np.ndarray:
    t = program.tensors
    a = (env[op.a].astype(np.int64) - t[op.a].zero_point) << ADD_LEFT_SHIFT
    b = (env[op.b].astype(np.int64) - t[op.b].zero_point) << ADD_LEFT_SHIFT
    total = mbqm(a, *op.a_mult) + mbqm(b, *op.b_mult)
    return np.clip(mbqm(total, *op.out_mult) + t[op.out].zero_point, op.act_min, ACT_QMAX)


def _golden_mul(program: Program, op: Mul, env, n: int) -> np.ndarray:
    return _mul(program, op, env).reshape(n, *program.tensors[op.out].shape)


def _golden_concat(program: Program, op: Concat, env, n: int) -> np.ndarray:
    t = program.tensors
    parts = [_requant(env[p].astype(np.int64).reshape(n, *t[p].shape) - t[p].zero_point, m, t[op.out].zero_point)
             for p, m in zip(op.parts, op.mults)]
    return np.concatenate(parts, axis=op.axis + 1)


def _one_input(function):
    """A golden op of one input: `function(op, x, zp_in, out)`, x the int8 values as int64 (N, *shape)."""

    def run(program: Program, op, env, n: int) -> np.ndarray:
        x = env[op.inp].astype(np.int64).reshape(n, *program.tensors[op.inp].shape)
        out = program.tensors[op.out]
        return function(op, x, program.tensors[op.inp].zero_point, out).reshape(n, *out.shape)

    return run


def _lookup(op: Lookup, x: np.ndarray, zp_in: int, out) -> np.ndarray:
    rows = op.table.shape[0]
    return op.table[np.arange(rows)[None, :, None], x.reshape(len(x), rows, -1) + 128]


def _global_average(op: AvgPool, x: np.ndarray, zp_in: int, out) -> np.ndarray:
    return _requant((x - zp_in).reshape(len(x), x.shape[1], -1).sum(2), op.mult, out.zero_point)


GOLDEN = {
    Conv: _golden_conv,
    Add: _golden_add,
    Mul: _golden_mul,
    Concat: _golden_concat,
    AvgPool: _one_input(_global_average),
    Requant: _one_input(lambda op, x, zp, out: _requant(x - zp, op.mult, out.zero_point, op.act_min)),
    Pool: _one_input(lambda op, x, zp, out: _pool(op, x, zp, out.shape, out.zero_point)),
    Lookup: _one_input(_lookup),
    Pad: _one_input(lambda op, x, zp, out: _pad(op, x, zp, out.zero_point)),
    Transpose: _one_input(lambda op, x, zp, out: _requant(x - zp, op.mult, out.zero_point).transpose(
        0, *(p + 1 for p in op.perm))),
    Softmax: _one_input(lambda op, x, zp, out: _softmax(op, x, out.zero_point)),
}


def run_op(program: Program, op, env: dict[str, np.ndarray]) -> np.ndarray:
    """One op of the program on int8 tensors in `env` (each (N, *shape)); returns its output."""
    golden = GOLDEN.get(type(op))
    if golden is None:
        raise TypeError(f"unknown op {type(op).__name__}")
    return golden(program, op, env, len(env[op.inputs[0]])).astype(np.int8)


def run_golden(program: Program, x_q: np.ndarray) -> np.ndarray:
    """Run on int8 inputs (N, *input shape); returns the int8 output (N, *output shape), or for a
    model with several outputs all of them flattened one after another (N, total), as the C does."""
    env = {program.input: np.asarray(x_q, np.int8)}
    for op in program.ops:
        env[op.out] = run_op(program, op, env)
    if len(program.outputs) == 1:
        return env[program.output]
    return np.concatenate([env[o].reshape(len(x_q), -1) for o in program.outputs], axis=1)
