"""Integer program -> a directory of plain C99: model.h, model.c (weights as static const
arrays, the layer sequence, one static-size arena), the kernels, a test main.c and a Makefile."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources

import numpy as np

from rankfold.cexport.ir import (
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
from rankfold.errors import RankfoldError
from rankfold.io import C_EXPORT_MARKER, cannot_write, replace_directory
from rankfold.quantize.core import pack_int4

MAX_TAPS = 64  # RF_MAX_TAPS in kernels.h
RAM_TABLE = "ram.txt"  # every op's RAM, written beside the sources


@dataclass
class ArenaPlan:
    offsets: dict[str, int]
    size: int


def scratch_name(index: int) -> str:
    """The arena entry of op `index`'s scratch (its kernel's working memory, alive during that op)."""
    return f"#scratch{index}"


def tensor_lifetimes(program: Program) -> tuple[dict[str, int], dict[str, int]]:
    """Each tensor's first write and last read, as op indices (the input: -1; outputs: past the end)."""
    first: dict[str, int] = {program.input: -1}
    last: dict[str, int] = {program.input: -1}
    for i, op in enumerate(program.ops):
        for name in op.inputs:
            last[name] = max(last.get(name, i), i)
        first.setdefault(op.out, i)
        last[op.out] = max(last.get(op.out, i), i)
    for name in program.outputs:
        last[name] = len(program.ops)
    return first, last


def plan_arena(program: Program) -> ArenaPlan:
    """Offsets for every tensor and every kernel's scratch in one arena: each may reuse bytes only
    of those whose lifetimes (first write .. last read; a scratch: its op) do not overlap its own;
    biggest placed first, each at the lowest word-aligned offset that fits (greedy)."""
    first, last = tensor_lifetimes(program)
    sizes = {name: t.size for name, t in program.tensors.items()}
    for i, op in enumerate(program.ops):
        scratch = scratch_bytes(program, op)
        if scratch:
            first[scratch_name(i)] = last[scratch_name(i)] = i
            sizes[scratch_name(i)] = scratch
    order = sorted(first, key=lambda n: -sizes[n])
    placed: list[tuple[int, int, int, int]] = []  # offset, size, first, last
    offsets = {}
    for name in order:
        size = sizes[name]
        lo, hi = first[name], last[name]
        clashes = sorted((o, s) for o, s, f, e in placed if not (e < lo or hi < f))
        offset = 0
        for o, s in clashes:
            if offset + size <= o:
                break
            offset = max(offset, (o + s + 3) // 4 * 4)  # word-aligned
        placed.append((offset, size, lo, hi))
        offsets[name] = offset
    return ArenaPlan(offsets, max((o + s for o, s, _f, _l in placed), default=0))


def _array(kind: str, name: str, values: np.ndarray) -> str:
    flat = np.asarray(values).reshape(-1).tolist()
    per_line = 24
    lines = [",".join(map(str, flat[i : i + per_line])) for i in range(0, len(flat), per_line)]
    joined = ",\n    ".join(lines)
    return f"static const {kind} {name}[{max(len(flat), 1)}] = {{\n    {joined or '0'}\n}};\n"


def _as_bytes(values: np.ndarray, what: str) -> np.ndarray:
    """Values stored in int8 arrays (a requantization's shift: a power of two), checked to fit."""
    values = np.asarray(values)
    if values.size and (values.min() < -128 or values.max() > 127):
        raise RankfoldError(f"a {what} of {int(values.min())}..{int(values.max())} does not fit a byte")
    return values.astype(np.int8)


def _ident(i: int) -> str:
    return f"L{i}"


def kernel_of(program: Program, op) -> str:
    """Which C kernel runs a convolution: fully connected layers with 8-bit weights on the input in
    place, other dense ones by im2col columns and dual multiply-accumulates, depthwise ones channel
    by channel, anything else generically."""
    if not isinstance(op, Conv):
        return ""
    out_c, per_group, k_h, k_w = op.weight.shape
    one_pixel = int(np.prod(program.tensors[op.inp].shape[1:])) == 1
    if op.groups == 1 and k_h * k_w == 1 and one_pixel and op.bits == 8 and per_group % 4 == 0:
        return "fully_connected"
    if op.groups == 1:
        return "im2col"
    if per_group == 1 and out_c == op.groups and k_h * k_w <= MAX_TAPS:
        return "depthwise"
    return "generic"


def row_length(op: Conv) -> int:
    """One output channel's weights rounded up to whole words (4 int8 or 8 int4): RF_ROW_LEN."""
    step = 8 if op.bits == 4 else 4
    return -(-int(np.prod(op.weight.shape[1:])) // step) * step


# Within each word of 8-bit weights, the order that sign-extending bytes 0,2 then 1,3 (SXTB16)
# turns into consecutive pairs; within each word of 4-bit weights, the nibble order that masking the
# word shifted by 0, 4, 8, 12 bits with 0x000F000F turns into consecutive pairs (kernels.c, dot4_*).
_INTERLEAVE = {8: [0, 2, 1, 3], 4: [0, 2, 4, 6, 1, 3, 5, 7]}


def interleaved_weights(op: Conv) -> np.ndarray:
    """The im2col kernel's weights: each output channel's row zero-padded to row_length() and
    interleaved word by word; 4-bit rows hold w + 8 (0..15; the kernel subtracts 8 * the column
    sum), two to a byte, the first in the low nibble."""
    rows = op.weight.reshape(op.weight.shape[0], -1).astype(np.int16)
    length, step = row_length(op), len(_INTERLEAVE[op.bits])
    offset = 8 if op.bits == 4 else 0
    padded = np.full((rows.shape[0], length), offset, np.int16)  # padding: weight 0
    padded[:, : rows.shape[1]] = rows + offset
    flat = padded.reshape(rows.shape[0], length // step, step)[:, :, _INTERLEAVE[op.bits]].reshape(-1)
    if op.bits == 8:
        return flat.astype(np.int8)
    nibbles = flat.astype(np.uint8).reshape(-1, 2)
    return (nibbles[:, 0] | (nibbles[:, 1] << 4)).astype(np.uint8).view(np.int8)


def scratch_bytes(program: Program, op) -> int:
    """Scratch a layer's kernel needs beside the tensors: the im2col kernel's int16 columns, two
    (one where the output has a single pixel); the depthwise kernel's input plane of one channel,
    padded (none without padding)."""
    kernel = kernel_of(program, op)
    if kernel == "im2col":
        pixels = int(np.prod(program.tensors[op.out].shape[1:]))
        return row_length(op) * 2 * (2 if pixels > 1 else 1)
    if kernel == "depthwise":
        _c, in_h, in_w = _spatial(program.tensors[op.inp].shape)
        top, left, bottom, right = op.pads
        return (top + in_h + bottom) * (left + in_w + right) if any(op.pads) else 0
    return 0


def ram_per_op(program: Program) -> list[dict]:
    """What each op holds in RAM while it runs: the tensors alive then (its inputs and output and
    whatever later ops still read) and its kernel's scratch."""
    first, last = tensor_lifetimes(program)
    rows = []
    for i, op in enumerate(program.ops):
        live = sum(program.tensors[n].size for n in first if first[n] <= i <= last[n])
        rows.append({"op": op.name or type(op).__name__, "tensor_bytes": live,
                     "scratch_bytes": scratch_bytes(program, op)})
    return rows


def arena_bytes(program: Program) -> int:
    """The whole arena the generated code declares: tensors and scratch, as planned."""
    return (plan_arena(program).size + 3) // 4 * 4


@dataclass
class _Emit:
    """What one op adds to model.c: declarations (weights, parameters) and its call."""

    decls: list[str]
    call: str


def _spatial(shape: tuple[int, ...]) -> tuple[int, int, int]:
    return (tuple(shape) + (1, 1))[:3] if len(shape) < 3 else tuple(shape)


def _emit_conv(program: Program, op: Conv, ident: str, at, scratch: str) -> _Emit:
    t = program.tensors
    x, out = t[op.inp], t[op.out]
    in_c, in_h, in_w = _spatial(x.shape)
    out_c, out_h, out_w = _spatial(out.shape)
    kernel = kernel_of(program, op)
    if kernel == "im2col":
        stored = interleaved_weights(op)
    else:
        stored = op.weight if op.bits == 8 else np.frombuffer(pack_int4(op.weight), np.int8)
    decls = [_array("int8_t", f"{ident}_w", stored), _array("int32_t", f"{ident}_b", op.bias),
             _array("int32_t", f"{ident}_m", op.multiplier),
             _array("int8_t", f"{ident}_s", _as_bytes(op.shift, "shift"))]
    o_c, _i, k_h, k_w = op.weight.shape
    decls.append(
        f"static const rf_conv_params {ident} = {{{in_c}, {in_h}, {in_w}, {x.zero_point}, {out_c}, {out_h}, "
        f"{out_w}, {out.zero_point}, {k_h}, {k_w}, {op.stride[0]}, {op.stride[1]}, {op.pads[0]}, "
        f"{op.pads[1]}, {op.pads[2]}, {op.pads[3]}, {op.dilation[0]}, {op.dilation[1]}, {op.groups}, "
        f"{op.act_min}, {op.act_max}, "
        f"{op.bits}, {ident}_w, {ident}_b, {ident}_m, {ident}_s}};\n")
    where = f"{at(op.inp)}, {at(op.out)}"
    if kernel == "im2col":
        return _Emit(decls, f"rf_conv_im2col_s8(&{ident}, {where}, (int16_t *){scratch})")
    if kernel in ("depthwise", "fully_connected"):  # the zero point folded into the bias
        folded = op.bias.astype(np.int64) - x.zero_point * op.weight.reshape(o_c, -1).astype(np.int64).sum(1)
        if np.abs(folded).max(initial=0) >= 2**31:
            raise RankfoldError(f"{op.name}: folded bias overflows int32")
        decls.append(_array("int32_t", f"{ident}_bf", folded))
        if kernel == "depthwise":
            return _Emit(decls, f"rf_depthwise_s8(&{ident}, {ident}_bf, {where}, {scratch})")
        return _Emit(decls, f"rf_fully_connected_s8(&{ident}, {ident}_bf, {where})")
    return _Emit(decls, f"rf_conv_s8(&{ident}, {where})")


def _emit_add(program: Program, op: Add, ident: str, at, scratch: str) -> _Emit:
    a, b, out = program.tensors[op.a], program.tensors[op.b], program.tensors[op.out]
    return _Emit([], f"rf_add_s8({at(op.a)}, {a.zero_point}, {op.a_mult[0]}, {op.a_mult[1]}, {at(op.b)}, "
                     f"{b.zero_point}, {op.b_mult[0]}, {op.b_mult[1]}, {at(op.out)}, {out.zero_point}, "
                     f"{op.out_mult[0]}, {op.out_mult[1]}, {op.act_min}, {out.size})")


def _emit_avgpool(program: Program, op: AvgPool, ident: str, at, scratch: str) -> _Emit:
    x, out = program.tensors[op.inp], program.tensors[op.out]
    return _Emit([], f"rf_avgpool_s8({at(op.inp)}, {x.zero_point}, {x.shape[0]}, {x.size // x.shape[0]}, "
                     f"{at(op.out)}, {out.zero_point}, {op.mult[0]}, {op.mult[1]})")


def _emit_requant(program: Program, op: Requant, ident: str, at, scratch: str) -> _Emit:
    x, out = program.tensors[op.inp], program.tensors[op.out]
    return _Emit([], f"rf_requant_s8({at(op.inp)}, {x.zero_point}, {at(op.out)}, {out.zero_point}, {op.mult[0]}, "
                     f"{op.mult[1]}, {op.act_min}, {out.size})")


def _emit_pool(program: Program, op: Pool, ident: str, at, scratch: str) -> _Emit:
    x, out = program.tensors[op.inp], program.tensors[op.out]
    (c, in_h, in_w), (_c, out_h, out_w) = _spatial(x.shape), _spatial(out.shape)
    decls = [_array("int32_t", f"{ident}_m", np.array(op.mults, np.int64).reshape(-1)),
             f"static const rf_pool_params {ident} = {{{c}, {in_h}, {in_w}, {x.zero_point}, {out_h}, {out_w}, "
             f"{out.zero_point}, {op.kernel[0]}, {op.kernel[1]}, {op.stride[0]}, {op.stride[1]}, "
             f"{', '.join(map(str, op.pads))}, {op.dilation[0]}, {op.dilation[1]}, {int(op.kind == 'max')}, "
             f"{int(op.count_include_pad)}}};\n"]
    return _Emit(decls, f"rf_pool_s8(&{ident}, {ident}_m, {at(op.inp)}, {at(op.out)})")


def _emit_concat(program: Program, op: Concat, ident: str, at, scratch: str) -> _Emit:
    out = program.tensors[op.out]
    outer = int(np.prod(out.shape[: op.axis]))
    inner = int(np.prod(out.shape[op.axis + 1 :]))
    calls, offset = [], 0
    for part, (mult, shift) in zip(op.parts, op.mults):
        x = program.tensors[part]
        block = x.shape[op.axis] * inner
        calls.append(f"rf_copy_blocks_s8({at(part)}, {x.zero_point}, {at(op.out)} + {offset}, {out.zero_point}, "
                     f"{mult}, {shift}, {outer}, {block}, {out.shape[op.axis] * inner})")
        offset += block
    return _Emit([], ";\n    ".join(calls))


def _emit_mul(program: Program, op: Mul, ident: str, at, scratch: str) -> _Emit:
    a, b, out = program.tensors[op.a], program.tensors[op.b], program.tensors[op.out]
    count, inner = mul_broadcast(a.shape, b.shape)
    return _Emit([], f"rf_mul_s8({at(op.a)}, {a.zero_point}, {at(op.b)}, {b.zero_point}, {at(op.out)}, "
                     f"{out.zero_point}, {op.mult[0]}, {op.mult[1]}, {op.act_min}, {out.size}, {count}, {inner})")


def _emit_lookup(program: Program, op: Lookup, ident: str, at, scratch: str) -> _Emit:
    out = program.tensors[op.out]
    rows = op.table.shape[0]
    return _Emit([_array("int8_t", f"{ident}_t", op.table)],
                 f"rf_lookup_s8({at(op.inp)}, {at(op.out)}, {ident}_t, {rows}, {out.size // rows})")


def _dims4(shape) -> list[int]:
    return [1] * (4 - len(shape)) + list(shape)


def _emit_pad(program: Program, op: Pad, ident: str, at, scratch: str) -> _Emit:
    x, out = program.tensors[op.inp], program.tensors[op.out]
    before = [0] * (4 - len(op.pads)) + [b for b, _e in op.pads]
    decls = [_array("int32_t", f"{ident}_in", np.array(_dims4(x.shape))),
             _array("int32_t", f"{ident}_out", np.array(_dims4(out.shape))),
             _array("int32_t", f"{ident}_before", np.array(before))]
    return _Emit(decls, f"rf_pad_s8({at(op.inp)}, {x.zero_point}, {at(op.out)}, {out.zero_point}, {op.mult[0]}, "
                        f"{op.mult[1]}, {op.value}, {ident}_in, {ident}_out, {ident}_before)")


def _emit_transpose(program: Program, op: Transpose, ident: str, at, scratch: str) -> _Emit:
    x, out = program.tensors[op.inp], program.tensors[op.out]
    in_strides = [int(np.prod(x.shape[k + 1 :])) for k in range(len(x.shape))]
    strides = [0] * (4 - len(op.perm)) + [in_strides[p] for p in op.perm]
    decls = [_array("int32_t", f"{ident}_dims", np.array(_dims4(out.shape))),
             _array("int32_t", f"{ident}_strides", np.array(strides))]
    return _Emit(decls, f"rf_transpose_s8({at(op.inp)}, {x.zero_point}, {at(op.out)}, {out.zero_point}, "
                        f"{op.mult[0]}, {op.mult[1]}, {ident}_dims, {ident}_strides)")


def _emit_softmax(program: Program, op: Softmax, ident: str, at, scratch: str) -> _Emit:
    x, out = program.tensors[op.inp], program.tensors[op.out]
    length = x.shape[-1]
    return _Emit([_array("int32_t", f"{ident}_exp", op.exp_table)],
                 f"rf_softmax_s8({at(op.inp)}, {at(op.out)}, {x.size // length}, {length}, {ident}_exp, "
                 f"{op.inv_out_scale}, {out.zero_point})")


EMITTERS = {Conv: _emit_conv, Add: _emit_add, AvgPool: _emit_avgpool, Requant: _emit_requant, Pool: _emit_pool,
            Concat: _emit_concat, Mul: _emit_mul, Lookup: _emit_lookup, Pad: _emit_pad, Transpose: _emit_transpose,
            Softmax: _emit_softmax}


def generate(program: Program, directory: str, *, extra: dict[str, bytes] | None = None) -> dict:
    """Write the C sources into `directory` (created; replaced atomically if it exists).
    Returns the numbers the report states: arena bytes, weight bytes, MACs."""
    arena = plan_arena(program)
    t = program.tensors
    decls, calls = [], []

    def at(name: str) -> str:
        return f"A({arena.offsets[name]})"

    for i, op in enumerate(program.ops):
        emitter = EMITTERS.get(type(op))
        if emitter is None:
            raise RankfoldError(f"no C code for {type(op).__name__}")
        scratch = at(scratch_name(i)) if scratch_name(i) in arena.offsets else "NULL"
        emitted = emitter(program, op, _ident(i), at, scratch)
        decls += emitted.decls
        calls.append(f"    {emitted.call};  /* {op.name} */\n    RF_MARK({i});")
    x_in, x_out = t[program.input], t[program.output]
    each_output = "".join(
        f"#define MODEL_OUTPUT{k}_OFFSET {offset}\n#define MODEL_OUTPUT{k}_SIZE {t[name].size}\n"
        f"#define MODEL_OUTPUT{k}_SCALE {t[name].scale!r}f\n#define MODEL_OUTPUT{k}_ZERO_POINT {t[name].zero_point}\n"
        for k, (name, offset) in enumerate(zip(program.outputs, program.output_offsets)))
    arena = ArenaPlan(arena.offsets, (arena.size + 3) // 4 * 4)
    header = f"""/* Generated by rankfold: int8 network, plain C99, no malloc. */
#ifndef RANKFOLD_MODEL_H
#define RANKFOLD_MODEL_H

#include <stdint.h>

#define MODEL_ARENA_SIZE {arena.size}
#define MODEL_INPUT_SIZE {x_in.size}
#define MODEL_OUTPUT_SIZE {program.output_size}
#define MODEL_INPUT_SHAPE {{{", ".join(map(str, x_in.shape))}}}
#define MODEL_OUTPUT_SHAPE {{{", ".join(map(str, x_out.shape))}}}
#define MODEL_INPUT_SCALE {x_in.scale!r}f
#define MODEL_INPUT_ZERO_POINT {x_in.zero_point}
#define MODEL_OUTPUT_SCALE {x_out.scale!r}f
#define MODEL_OUTPUT_ZERO_POINT {x_out.zero_point}
#define MODEL_OUTPUTS {len(program.outputs)} /* one after another in `out`, in the graph's order: */
{each_output}
#define MODEL_MACS {program.macs}
#define MODEL_OPS {len(program.ops)}
#define MODEL_WEIGHT_BYTES {program.weight_bytes}

/* in: MODEL_INPUT_SIZE int8 values (NCHW, one sample); out: MODEL_OUTPUT_SIZE int8 values (every
 * output; MODEL_OUTPUT_SHAPE, _SCALE, _ZERO_POINT describe the first);
 * arena: MODEL_ARENA_SIZE bytes of scratch, 4-byte aligned. Returns 0. */
int model_run(const int8_t *in, int8_t *out, uint8_t *arena);

#endif
"""
    source = ["/* Generated by rankfold. */\n#include <string.h>\n\n#include \"model.h\"\n"
              "#include \"rankfold_kernels.h\"\n\n#define A(offset) ((int8_t *)(arena + (offset)))\n"
              "#ifdef RF_PROFILE /* main.c times each op */\nvoid rf_profile_mark(int op);\n"
              "#define RF_MARK(op) rf_profile_mark(op)\n#else\n#define RF_MARK(op) ((void)0)\n#endif\n"
              "\n",
              *decls,
              "\nint model_run(const int8_t *in, int8_t *out, uint8_t *arena)\n{\n",
              f"    memcpy(A({arena.offsets[program.input]}), in, MODEL_INPUT_SIZE);\n",
              "\n".join(calls), "\n",
              *(f"    memcpy(out + {offset}, A({arena.offsets[name]}), {t[name].size});\n"
                for name, offset in zip(program.outputs, program.output_offsets)),
              "    return 0;\n}\n"]
    files = {"model.h": header, "model.c": "".join(source),
             "rankfold_kernels.c": _resource("kernels.c"), "rankfold_kernels.h": _resource("kernels.h"),
             "main.c": _resource("main.c"), "Makefile": _resource("Makefile"), "startup.c": _resource("startup.c"),
             "cortex_m.ld": _resource("cortex_m.ld"), RAM_TABLE: _ram_table(program, arena.size),
             **(extra or {})}
    _write_directory(directory, files)
    return {"arena_bytes": arena.size, "weight_bytes": program.weight_bytes, "macs": program.macs,
            "ram_per_op": ram_per_op(program)}


def _ram_table(program: Program, arena: int) -> str:
    lines = [f"# RAM each op needs while it runs (bytes): live tensors + its kernel's scratch; arena {arena}",
             "op\ttensors\tscratch\ttotal"]
    lines += [f"{r['op']}\t{r['tensor_bytes']}\t{r['scratch_bytes']}\t{r['tensor_bytes'] + r['scratch_bytes']}"
              for r in ram_per_op(program)]
    return "\n".join(lines) + "\n"


def _resource(name: str) -> str:
    return (resources.files("rankfold") / "cexport" / name).read_text()


def _write_directory(directory: str, files: dict[str, str | bytes]) -> None:
    """All files or none: written into a temporary sibling, then renamed into place."""
    parent = os.path.dirname(os.path.abspath(directory))
    if not os.path.isdir(parent):
        raise RankfoldError(f"{directory}: the parent directory {parent} does not exist")
    staging = None
    try:
        staging = tempfile.mkdtemp(prefix=".rankfold-c-", dir=parent)
        marker = "# written by rankfold export-c; `export-c --force` replaces this directory\n" + "\n".join(files)
        for name, content in {**files, C_EXPORT_MARKER: marker + "\n"}.items():
            with open(os.path.join(staging, name), "wb") as handle:
                handle.write(content.encode() if isinstance(content, str) else content)
        os.chmod(staging, 0o755)
        replace_directory(staging, directory)
    except OSError as exc:
        raise cannot_write(directory, exc) from None
    finally:
        if staging is not None and os.path.exists(staging):
            shutil.rmtree(staging)
