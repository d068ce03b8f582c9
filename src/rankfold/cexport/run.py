"""export-c and run-c: QDQ ONNX -> C directory; build it, run it on data, compare."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable

import numpy as np
import onnx

from rankfold.cexport.codegen import generate
from rankfold.cexport.golden import run_golden
from rankfold.cexport.ir import Program, read_program
from rankfold.errors import RankfoldError
from rankfold.target import Target

QDQ_COPY = "model.onnx"  # the QDQ model the C was generated from: run-c's reference
PER_OP_SAMPLES = 32  # samples for the op-by-op comparison with onnxruntime


def is_qdq(model: onnx.ModelProto) -> bool:
    return any(n.op_type == "QuantizeLinear" for n in model.graph.node)


def quantize_for_c(model_path: str, calib: np.ndarray, progress: Callable[[str], None]) -> onnx.ModelProto:
    """A float model -> QDQ with every layer at int8 (the C back-end runs integers only)."""
    import torch

    from rankfold.analyze import COMPRESSIBLE
    from rankfold.frontends.onnx import load_onnx
    from rankfold.quantize.export import export_quantized

    module = load_onnx(model_path)
    bits = {n: 8 for n, m in module.named_modules() if isinstance(m, COMPRESSIBLE)}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "q.onnx")
        x = torch.from_numpy(calib)
        # The C kernels accumulate in int32: full 8-bit weights, whatever this CPU's onnxruntime needs.
        export_quantized(module, bits, path, calib=x, example_input=x[:2], reduce_range=False, progress=progress)
        return onnx.load(path)


def check_fits(program: Program, target: Target | None, arena: int) -> None:
    if target is None:
        return
    problems = []
    if target.flash_bytes is not None and program.weight_bytes > target.flash_bytes:
        problems.append(f"weights need {program.weight_bytes:,} bytes of flash, {target.name} has "
                        f"{target.flash_bytes:,} (over by {program.weight_bytes - target.flash_bytes:,})")
    if target.ram_bytes is not None and arena > target.ram_bytes:
        problems.append(f"the arena needs {arena:,} bytes of RAM, {target.name} has {target.ram_bytes:,} "
                        f"(over by {arena - target.ram_bytes:,})")
    if problems:
        raise RankfoldError("the model does not fit the target: " + "; ".join(problems))


def with_input_size(model: onnx.ModelProto, sample_shape: tuple[int, ...]) -> onnx.ModelProto:
    """A copy whose graph input has this per-sample shape (open height and width fixed; the batch
    stays as it was): the C program runs one input size, and run-c reads it back from the copy."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    inits = {i.name for i in fixed.graph.initializer}
    graph_input = next(i for i in fixed.graph.input if i.name not in inits)
    dims = graph_input.type.tensor_type.shape.dim
    if len(dims) != len(sample_shape) + 1:
        raise RankfoldError(f"the data's samples have shape {tuple(sample_shape)}; the model's input "
                            f"{graph_input.name!r} has {len(dims) - 1} dimensions after the batch")
    for dim, size in zip(list(dims)[1:], sample_shape):
        if dim.HasField("dim_value") and dim.dim_value != size:
            raise RankfoldError(f"the data's samples have shape {tuple(sample_shape)}; the model's input "
                                f"{graph_input.name!r} is fixed at {[d.dim_value for d in list(dims)[1:]]}")
        dim.ClearField("dim_param")
        dim.dim_value = int(size)
    return fixed


def export_c(model: onnx.ModelProto, directory: str, *, target: Target | None = None,
             sample_shape: tuple[int, ...] | None = None) -> dict:
    """Generate DIR; for a Cortex-M target with the Arm toolchain installed, also cross-compile it
    and add its flash (text + data) and static RAM (data + bss) to the result. `sample_shape` fixes
    an input size the model leaves open (the C program runs one size)."""
    from rankfold.cexport.codegen import arena_bytes

    if sample_shape is not None:
        model = with_input_size(model, sample_shape)
    program = read_program(model)
    check_fits(program, target, arena_bytes(program))  # the scratch included: what the C declares
    info = generate(program, directory, extra={QDQ_COPY: model.SerializeToString()})
    info["ops"] = len(program.ops)
    if target is not None and target.name.startswith("cortex-m") and shutil.which("arm-none-eabi-gcc"):
        info.update(cross_compile(directory, target.name))
    return info


def cross_compile(directory: str, cpu: str, *, profile: bool = False) -> dict:
    command = ["make", "-B", "-C", directory, "cortex-m", f"CPU={cpu}"] + (["EXTRA=-DRF_PROFILE"] if profile else [])
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RankfoldError(f"cross-compiling for {cpu} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    elf = os.path.join(directory, f"model_{cpu}.elf")
    size = subprocess.run(["arm-none-eabi-size", "-A", elf], capture_output=True, text=True, check=True).stdout
    sections = {parts[0]: int(parts[1]) for parts in (line.split() for line in size.splitlines())
                if len(parts) >= 3 and parts[0].startswith(".") and parts[1].isdigit()}
    flash = sum(sections.get(k, 0) for k in (".text", ".ARM.exidx", ".init_array", ".fini_array", ".data"))
    return {"cpu": cpu, "elf": elf, "flash_bytes": flash,
            "static_ram_bytes": sum(sections.get(k, 0) for k in (".data", ".bss"))}


def build_host(directory: str, *, sanitize: bool = False) -> str:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        raise RankfoldError("no C compiler (cc/gcc) found to build the host program")
    flags = "-O2 -std=c99 -Wall -Wextra -pedantic -Werror"
    if sanitize:
        flags += " -g -fsanitize=address,undefined -fno-sanitize-recover=all"
    proc = subprocess.run(["make", "-B", "-C", directory, "host", f"CFLAGS={flags}"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RankfoldError(f"building {directory} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return os.path.join(directory, "model_test")


def quantize_input(program: Program, x: np.ndarray) -> np.ndarray:
    t = program.tensors[program.input]
    return np.clip(np.round(x / t.scale) + t.zero_point, -128, 127).astype(np.int8)


def run_host(binary: str, program: Program, x_q: np.ndarray) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        inputs, outputs = os.path.join(tmp, "in.bin"), os.path.join(tmp, "out.bin")
        x_q.astype(np.int8).tofile(inputs)
        proc = subprocess.run([binary, inputs, outputs], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RankfoldError(f"{binary} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        out = np.fromfile(outputs, np.int8)
    return out.reshape(len(x_q), -1)


def per_op_unit_differences(model: onnx.ModelProto, program: Program, x: np.ndarray) -> dict:
    """Each op of the golden model fed with onnxruntime's own int8 input tensors and compared with
    onnxruntime's int8 output tensor: the rounding difference of that op alone, in units. onnxruntime
    runs its reference arithmetic (no graph optimizations): the same on every CPU."""
    from rankfold.cexport.golden import run_op
    from rankfold.runtime import session as ort_session

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    q_of = {n.input[0]: n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    wanted = [q_of[name] for name in program.tensors if name in q_of]
    for name in wanted:
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = ort_session(probe.SerializeToString(), optimized=False)
    values = session.run(wanted, {session.get_inputs()[0].name: x.astype(np.float32)})
    by_tensor = {f: v for f, v in zip((n for n in program.tensors if n in q_of), values)}
    worst, within, total = 0, 0, 0
    by_kind: dict[str, int] = {}
    for op in program.ops:
        inputs = op.inputs
        if op.out not in by_tensor or any(i not in by_tensor for i in inputs):
            continue
        env = {i: by_tensor[i].reshape(len(x), *program.tensors[i].shape) for i in inputs}
        diff = np.abs(run_op(program, op, env).astype(np.int64).reshape(len(x), -1)
                      - by_tensor[op.out].astype(np.int64).reshape(len(x), -1))
        worst = max(worst, int(diff.max(initial=0)))
        kind = getattr(op, "function", "") or getattr(op, "kind", "") or type(op).__name__
        kind = {"max": "MaxPool", "avg": "AveragePool"}.get(kind, kind)
        by_kind[kind] = max(by_kind.get(kind, 0), int(diff.max(initial=0)))
        within += int((diff <= 1).sum())
        total += diff.size
    return {"onnx_op_max_unit_difference": worst, "onnx_op_within_one_unit": within / max(total, 1),
            "onnx_op_max_unit_difference_by_op": by_kind}


BOARDS = {"mps2-an385": "cortex-m3", "mps2-an386": "cortex-m4", "mps2-an500": "cortex-m7"}


def qemu_tools_missing() -> str | None:
    """Why the Cortex-M run cannot happen here, or None."""
    for tool in ("arm-none-eabi-gcc", "arm-none-eabi-size", "qemu-system-arm"):
        if shutil.which(tool) is None:
            return (f"{tool} not found: install gcc-arm-none-eabi, libnewlib-arm-none-eabi and qemu-system-arm "
                    "(apt-get install --no-install-recommends)")
    return None


def run_qemu(directory: str, board: str, x_q: np.ndarray, *, timeout: int = 3000, profile: bool = False) -> dict:
    """Cross-compile for the board's CPU, run under qemu (semihosting, -icount shift=0) and return
    its outputs, flash and RAM (arm-none-eabi-size) and instructions per inference; with `profile`,
    also each op's instructions (summed over the samples; the timing adds a little to each)."""
    if board not in BOARDS:
        raise RankfoldError(f"unknown board {board!r}; supported: {', '.join(BOARDS)}")
    missing = qemu_tools_missing()
    if missing:
        raise RankfoldError(missing)
    cpu = BOARDS[board]
    built = cross_compile(directory, cpu, profile=profile)
    elf, flash, ram = built["elf"], built["flash_bytes"], built["static_ram_bytes"]
    with tempfile.TemporaryDirectory() as tmp:
        inputs, outputs = os.path.join(tmp, "in.bin"), os.path.join(tmp, "out.bin")
        x_q.astype(np.int8).tofile(inputs)
        command = ["qemu-system-arm", "-M", board, "-nographic", "-monitor", "none", "-serial", "none",
                   "-semihosting-config", f"enable=on,target=native,arg=model,arg={inputs},arg={outputs}",
                   "-icount", "shift=0", "-kernel", elf]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RankfoldError(f"qemu did not finish within {timeout} s") from None
        if proc.returncode != 0:
            raise RankfoldError(f"qemu run failed ({proc.returncode}): {proc.stdout[-1000:]}{proc.stderr[-1000:]}")
        out = np.fromfile(outputs, np.int8).reshape(len(x_q), -1)
    per_tick = None
    ticks = []
    op_ticks: dict[int, int] = {}
    stack = 0
    for line in proc.stdout.splitlines():
        parts = line.split()
        if parts[:1] == ["instructions_per_tick_x1000"]:
            per_tick = int(parts[1]) / 1000
        elif parts[:1] == ["stack_bytes"]:
            stack = int(parts[1])
        elif parts[:1] == ["sample"] and len(parts) == 4:
            ticks.append(int(parts[3]))
        elif parts[:1] == ["op"] and len(parts) == 4:
            op_ticks[int(parts[1])] = int(parts[3])
    instructions = int(np.median(ticks) * per_tick) if ticks and per_tick else None
    per_op = None
    if op_ticks and per_tick:
        per_op = [int(op_ticks[i] * per_tick / max(len(x_q), 1)) for i in sorted(op_ticks)]
    return {"outputs": out, "flash_bytes": flash, "ram_bytes": ram + stack, "stack_bytes": stack,
            "instructions": instructions, "cpu": cpu, "instructions_per_op": per_op}


def run_c(directory: str, x: np.ndarray, y: np.ndarray | None, *, sanitize: bool = False, qemu: str | None = None,
          qemu_samples: int = 5, progress: Callable[[str], None] | None = None) -> dict:
    """Build the host program, run it on `x`, and compare with the golden model and onnxruntime.
    The comparison is with onnxruntime's reference arithmetic (graph optimizations off), which is
    the same on every CPU; its default session's top-1 agreement is reported beside it, with the
    layer-by-layer check of its int8 kernels on this CPU (on x86 without VNNI they saturate for
    full 8-bit weights, which the C does not)."""
    from rankfold.runtime import cpu_summary, int8_kernel_check
    from rankfold.runtime import session as ort_session

    say = progress or (lambda _m: None)
    if qemu is not None and qemu not in BOARDS:  # before any build
        raise RankfoldError(f"unknown board {qemu!r}; supported: {', '.join(BOARDS)}")
    reference = os.path.join(directory, QDQ_COPY)
    if not os.path.isfile(reference):
        raise RankfoldError(f"{directory}: no {QDQ_COPY}; not a directory written by rankfold export-c")
    program = read_program(onnx.load(reference))
    say("building the host program")
    binary = build_host(directory, sanitize=sanitize)
    x_q = quantize_input(program, x)
    say(f"running {len(x)} samples in C")
    c_out = run_host(binary, program, x_q)
    say("running the golden model")
    golden = run_golden(program, x_q).reshape(len(x), -1)
    def run_onnx(optimized: bool) -> list[np.ndarray]:
        session = ort_session(reference, optimized=optimized)
        outputs = session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})
        return [o.reshape(len(x), -1) for o in outputs]

    ort_all, ort_default_all = run_onnx(False), run_onnx(True)
    ort_q = np.concatenate([np.clip(np.round(o / program.tensors[name].scale) + program.tensors[name].zero_point,
                                    -128, 127) for o, name in zip(ort_all, program.outputs)], axis=1)
    # top-1 and agreement on the first output (a classifier's scores); every output is compared in units
    ort_out, ort_default = ort_all[0], ort_default_all[0]
    first = c_out[:, : program.tensors[program.output].size]
    result = {
        "samples": int(len(x)),
        "outputs": len(program.outputs),
        "accuracy": None if y is None else float((first.argmax(1) == y).mean()),
        "onnx_accuracy": None if y is None else float((ort_out.argmax(1) == y).mean()),
        "golden_mismatches": int((c_out != golden).sum()),
        "onnx_agreement": float((first.argmax(1) == ort_out.argmax(1)).mean()),
        "onnx_max_unit_difference": int(np.abs(c_out.astype(np.int64) - ort_q).max(initial=0)),
        "onnx_compared_with": "onnxruntime reference arithmetic (graph optimizations off)",
        "onnx_default_session_agreement": float((first.argmax(1) == ort_default.argmax(1)).mean()),
        "onnx_default_int8_kernel_max_units": int8_kernel_check(reference, x[:PER_OP_SAMPLES]).worst_units,
        "host_cpu": cpu_summary(),
        **per_op_unit_differences(onnx.load(reference), program, x[:PER_OP_SAMPLES]),
        "flash_bytes": None,
        "ram_bytes": None,
        "instructions": None,
    }
    if qemu:
        count = min(qemu_samples, len(x))
        say(f"cross-compiling and running {count} samples under qemu ({qemu})")
        emulated = run_qemu(directory, qemu, x_q[:count])
        result.update(
            board=qemu, cpu=emulated["cpu"], qemu_samples=count,
            qemu_matches_host=bool(np.array_equal(emulated["outputs"], c_out[:count])),
            flash_bytes=emulated["flash_bytes"], ram_bytes=emulated["ram_bytes"], stack_bytes=emulated["stack_bytes"],
            instructions=emulated["instructions"],
            instructions_per_mac=None if emulated["instructions"] is None else emulated["instructions"] / program.macs)
    return result
