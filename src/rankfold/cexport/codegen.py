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


def dense_scratch_bytes(input_shape: tuple, op: Conv) -> int:
    """Scratch the dense kernel needs for `op`: a padded copy of its input (when it pads) and one
    output channel's unpacked int4 weights."""
    in_c, in_h, in_w = (tuple(input_shape) + (1, 1))[:3] if len(input_shape) < 3 else input_shape
    _o, _i, k_h, k_w = op.weight.shape
    padded = in_c * (in_h + op.pads[0] + op.pads[2]) * (in_w + op.pads[1] + op.pads[3])
    unpacked = in_c * k_h * k_w if op.bits == 4 else 0
    return (padded if any(op.pads) else 0) + unpacked


def uses_dense_kernel(op) -> bool:
    return isinstance(op, Conv) and op.groups == 1 and op.weight.shape[2] * op.weight.shape[3] <= MAX_TAPS


def arena_bytes(program: Program) -> int:
    """The whole arena the generated code declares: the tensors (4-byte aligned), then the
    largest scratch any dense convolution needs."""
    scratch = max((dense_scratch_bytes(program.tensors[op.inp].shape, op) for op in program.ops
                   if uses_dense_kernel(op)), default=0)
    return (plan_arena(program).size + 3) // 4 * 4 + scratch


def generate(program: Program, directory: str, *, extra: dict[str, bytes] | None = None) -> dict:
    """Write the C sources into `directory` (created; replaced atomically if it exists).
    Returns the numbers the report states: arena bytes, weight bytes, MACs."""
    arena = plan_arena(program)
    t = program.tensors
    decls, calls = [], []
    scratch = 0  # bytes of padded input the dense kernel needs, placed after the tensors
    for i, op in enumerate(program.ops):
        ident = _ident(i)
        out = t[op.out]
        if isinstance(op, Conv):
            x = t[op.inp]
            in_c, in_h, in_w = (x.shape + (1, 1))[:3] if len(x.shape) < 3 else x.shape
            out_c, out_h, out_w = (out.shape + (1, 1))[:3] if len(out.shape) < 3 else out.shape
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
            if uses_dense_kernel(op):  # the fast path: zero point folded into the bias
                folded = op.bias.astype(np.int64) - x.zero_point * op.weight.reshape(o_c, -1).astype(np.int64).sum(1)
                if np.abs(folded).max(initial=0) >= 2**31:
                    raise RankfoldError(f"{op.name}: folded bias overflows int32")
                decls.append(_array("int32_t", f"{ident}_bf", folded))
                scratch = max(scratch, dense_scratch_bytes(x.shape, op))
                calls.append(f"    rf_conv_dense_s8(&{ident}, {ident}_bf, A({arena.offsets[op.inp]}), "
                             f"A({arena.offsets[op.out]}), A(SCRATCH));  /* {op.name} */")
            else:
                calls.append(f"    rf_conv_s8(&{ident}, A({arena.offsets[op.inp]}), A({arena.offsets[op.out]}));"
                             f"  /* {op.name} */")
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
