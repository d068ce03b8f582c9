"""Integer program -> a directory of plain C99: model.h, model.c (weights as static const
arrays, the layer sequence, one static-size arena), the kernels, a test main.c and a Makefile."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources

import numpy as np

from rankfold.cexport.ir import Add, AvgPool, Conv, Program, Requant
from rankfold.errors import RankfoldError
from rankfold.io import C_EXPORT_MARKER, cannot_write, replace_directory
from rankfold.quantize.core import pack_int4

MAX_TAPS = 64  # RF_MAX_TAPS in kernels.h


@dataclass
class ArenaPlan:
    offsets: dict[str, int]
    size: int


def plan_arena(program: Program) -> ArenaPlan:
    """Offsets for every tensor in one arena: a tensor may reuse bytes only of tensors whose
    lifetimes (first write .. last read) do not overlap its own; biggest tensors placed first,
    each at the lowest offset that fits (greedy)."""
    first: dict[str, int] = {program.input: -1}
    last: dict[str, int] = {program.input: -1}
    for i, op in enumerate(program.ops):
        inputs = [op.a, op.b] if isinstance(op, Add) else [op.inp]
        for name in inputs:
            last[name] = max(last.get(name, i), i)
        first.setdefault(op.out, i)
        last[op.out] = max(last.get(op.out, i), i)
    last[program.output] = len(program.ops)
    order = sorted(first, key=lambda n: -program.tensors[n].size)
    placed: list[tuple[int, int, int, int]] = []  # offset, size, first, last
    offsets = {}
    for name in order:
        size = program.tensors[name].size
        lo, hi = first[name], last[name]
        clashes = sorted((o, s) for o, s, f, e in placed if not (e < lo or hi < f))
        offset = 0
        for o, s in clashes:
            if offset + size <= o:
                break
            offset = max(offset, o + s)
        offset = (offset + 3) // 4 * 4  # word-aligned
        placed.append((offset, size, lo, hi))
        offsets[name] = offset
    return ArenaPlan(offsets, max((o + s for o, s, _f, _l in placed), default=0))


def _array(kind: str, name: str, values: np.ndarray) -> str:
    flat = np.asarray(values).reshape(-1).tolist()
    per_line = 24
    lines = [",".join(map(str, flat[i : i + per_line])) for i in range(0, len(flat), per_line)]
    joined = ",\n    ".join(lines)
    return f"static const {kind} {name}[{max(len(flat), 1)}] = {{\n    {joined or '0'}\n}};\n"


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


# Within each word of weights, the order that sign-extending bytes 0,2 then 1,3 (SXTB16) turns into
# consecutive pairs; for 4-bit words, low nibbles then high nibbles first (kernels.c, dot4_*).
_INTERLEAVE = {8: [0, 2, 1, 3], 4: [0, 4, 2, 6, 1, 5, 3, 7]}


def interleaved_weights(op: Conv) -> np.ndarray:
    """The im2col kernel's weights: each output channel's row zero-padded to row_length() and
    interleaved word by word; 4-bit rows packed two weights per byte."""
    rows = op.weight.reshape(op.weight.shape[0], -1)
    length, step = row_length(op), len(_INTERLEAVE[op.bits])
    padded = np.zeros((rows.shape[0], length), np.int8)
    padded[:, : rows.shape[1]] = rows
    flat = padded.reshape(rows.shape[0], length // step, step)[:, :, _INTERLEAVE[op.bits]].reshape(-1)
    return flat if op.bits == 8 else np.frombuffer(pack_int4(flat), np.int8)


def scratch_bytes(program: Program, op) -> int:
    """Scratch a layer's kernel needs beside the tensors: the im2col kernel's int16 columns, two
    (one where the output has a single pixel): RF_IM2COL_BYTES; the depthwise kernel's padded input
    rows of one output row: RF_DEPTHWISE_BYTES."""
    kernel = kernel_of(program, op)
    if kernel == "im2col":
        pixels = int(np.prod(program.tensors[op.out].shape[1:]))
        return row_length(op) * 2 * (2 if pixels > 1 else 1)
    if kernel == "depthwise":
        in_w = program.tensors[op.inp].shape[2] if len(program.tensors[op.inp].shape) > 2 else 1
        return op.weight.shape[2] * (op.pads[1] + in_w + op.pads[3])
    return 0


def arena_bytes(program: Program) -> int:
    """The whole arena the generated code declares: the tensors (4-byte aligned), then the
    largest scratch any layer needs."""
    scratch = max((scratch_bytes(program, op) for op in program.ops), default=0)
    return (plan_arena(program).size + 3) // 4 * 4 + scratch


def generate(program: Program, directory: str, *, extra: dict[str, bytes] | None = None) -> dict:
    """Write the C sources into `directory` (created; replaced atomically if it exists).
    Returns the numbers the report states: arena bytes, weight bytes, MACs."""
    arena = plan_arena(program)
    t = program.tensors
    decls, calls = [], []
    scratch = 0  # bytes of im2col columns, placed after the tensors
    for i, op in enumerate(program.ops):
        ident = _ident(i)
        out = t[op.out]
        if isinstance(op, Conv):
            x = t[op.inp]
            in_c, in_h, in_w = (x.shape + (1, 1))[:3] if len(x.shape) < 3 else x.shape
            out_c, out_h, out_w = (out.shape + (1, 1))[:3] if len(out.shape) < 3 else out.shape
            kernel = kernel_of(program, op)
            if kernel == "im2col":
                stored = interleaved_weights(op)
            else:
                stored = op.weight if op.bits == 8 else np.frombuffer(pack_int4(op.weight), np.int8)
            decls += [_array("int8_t", f"{ident}_w", stored), _array("int32_t", f"{ident}_b", op.bias),
                      _array("int32_t", f"{ident}_m", op.multiplier), _array("int32_t", f"{ident}_s", op.shift)]
            o_c, _i, k_h, k_w = op.weight.shape
            decls.append(
                f"static const rf_conv_params {ident} = {{{in_c}, {in_h}, {in_w}, {x.zero_point}, {out_c}, {out_h}, "
                f"{out_w}, {out.zero_point}, {k_h}, {k_w}, {op.stride[0]}, {op.stride[1]}, {op.pads[0]}, "
                f"{op.pads[1]}, {op.pads[2]}, {op.pads[3]}, {op.dilation[0]}, {op.dilation[1]}, {op.groups}, "
                f"{op.act_min}, {op.act_max}, "
                f"{op.bits}, {ident}_w, {ident}_b, {ident}_m, {ident}_s}};\n")
            where = f"A({arena.offsets[op.inp]}), A({arena.offsets[op.out]})"
            if kernel == "im2col":
                scratch = max(scratch, scratch_bytes(program, op))
                calls.append(f"    rf_conv_im2col_s8(&{ident}, {where}, (int16_t *)A(SCRATCH));  /* {op.name} */")
            elif kernel in ("depthwise", "fully_connected"):  # the zero point folded into the bias
                folded = op.bias.astype(np.int64) - x.zero_point * op.weight.reshape(o_c, -1).astype(np.int64).sum(1)
                if np.abs(folded).max(initial=0) >= 2**31:
                    raise RankfoldError(f"{op.name}: folded bias overflows int32")
                decls.append(_array("int32_t", f"{ident}_bf", folded))
                if kernel == "depthwise":
                    scratch = max(scratch, scratch_bytes(program, op))
                    calls.append(f"    rf_depthwise_s8(&{ident}, {ident}_bf, {where}, A(SCRATCH));  /* {op.name} */")
                else:
                    calls.append(f"    rf_fully_connected_s8(&{ident}, {ident}_bf, {where});  /* {op.name} */")
            else:
                calls.append(f"    rf_conv_s8(&{ident}, {where});  /* {op.name} */")
        elif isinstance(op, Add):
            a, b = t[op.a], t[op.b]
            calls.append(
                f"    rf_add_s8(A({arena.offsets[op.a]}), {a.zero_point}, {op.a_mult[0]}, {op.a_mult[1]}, "
                f"A({arena.offsets[op.b]}), {b.zero_point}, {op.b_mult[0]}, {op.b_mult[1]}, "
                f"A({arena.offsets[op.out]}), {out.zero_point}, {op.out_mult[0]}, {op.out_mult[1]}, {op.act_min}, "
                f"{out.size});  /* {op.name} */")
        elif isinstance(op, AvgPool):
            x = t[op.inp]
            calls.append(
                f"    rf_avgpool_s8(A({arena.offsets[op.inp]}), {x.zero_point}, {x.shape[0]}, "
                f"{x.size // x.shape[0]}, A({arena.offsets[op.out]}), {out.zero_point}, {op.mult[0]}, "
                f"{op.mult[1]});  /* {op.name} */")
        elif isinstance(op, Requant):
            x = t[op.inp]
            calls.append(
                f"    rf_requant_s8(A({arena.offsets[op.inp]}), {x.zero_point}, A({arena.offsets[op.out]}), "
                f"{out.zero_point}, {op.mult[0]}, {op.mult[1]}, {op.act_min}, {out.size});  /* {op.name} */")
        else:
            raise RankfoldError(f"no C code for {type(op).__name__}")
    x_in, x_out = t[program.input], t[program.output]
    scratch_offset = (arena.size + 3) // 4 * 4
    arena = ArenaPlan(arena.offsets, scratch_offset + scratch)
    header = f"""/* Generated by rankfold: int8 network, plain C99, no malloc. */
#ifndef RANKFOLD_MODEL_H
#define RANKFOLD_MODEL_H

#include <stdint.h>

#define MODEL_ARENA_SIZE {arena.size}
#define MODEL_INPUT_SIZE {x_in.size}
#define MODEL_OUTPUT_SIZE {x_out.size}
#define MODEL_INPUT_SHAPE {{{", ".join(map(str, x_in.shape))}}}
#define MODEL_OUTPUT_SHAPE {{{", ".join(map(str, x_out.shape))}}}
#define MODEL_INPUT_SCALE {x_in.scale!r}f
#define MODEL_INPUT_ZERO_POINT {x_in.zero_point}
#define MODEL_OUTPUT_SCALE {x_out.scale!r}f
#define MODEL_OUTPUT_ZERO_POINT {x_out.zero_point}
#define MODEL_MACS {program.macs}
#define MODEL_WEIGHT_BYTES {program.weight_bytes}

/* in: MODEL_INPUT_SIZE int8 values (NCHW, one sample); out: MODEL_OUTPUT_SIZE int8 values;
 * arena: MODEL_ARENA_SIZE bytes of scratch, 4-byte aligned. Returns 0. */
int model_run(const int8_t *in, int8_t *out, uint8_t *arena);

#endif
"""
    source = ["/* Generated by rankfold. */\n#include <string.h>\n\n#include \"model.h\"\n"
              "#include \"rankfold_kernels.h\"\n\n#define A(offset) ((int8_t *)(arena + (offset)))\n"
              f"#define SCRATCH {scratch_offset}\n\n",
              *decls,
              "\nint model_run(const int8_t *in, int8_t *out, uint8_t *arena)\n{\n",
              f"    memcpy(A({arena.offsets[program.input]}), in, MODEL_INPUT_SIZE);\n",
              "\n".join(calls), "\n",
              f"    memcpy(out, A({arena.offsets[program.output]}), MODEL_OUTPUT_SIZE);\n    return 0;\n}}\n"]
    files = {"model.h": header, "model.c": "".join(source),
             "rankfold_kernels.c": _resource("kernels.c"), "rankfold_kernels.h": _resource("kernels.h"),
             "main.c": _resource("main.c"), "Makefile": _resource("Makefile"), "startup.c": _resource("startup.c"),
             "cortex_m.ld": _resource("cortex_m.ld"), **(extra or {})}
    _write_directory(directory, files)
    return {"arena_bytes": arena.size, "weight_bytes": program.weight_bytes, "macs": program.macs}


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
