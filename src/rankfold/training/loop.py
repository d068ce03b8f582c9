"""The distillation loop: the student learns the teacher's outputs on training inputs, on one
process or on many under torchrun (DistributedDataParallel), the same global batch giving the
same step whatever the number of processes."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from rankfold.analyze import as_input, model_outputs, output_kind
from rankfold.errors import RankfoldError
from rankfold.host_memory import format_bytes, training_memory
from rankfold.quantize.core import ActivationParams
from rankfold.quantize.weights import quantized_leaves
from rankfold.robustness import AttackConfig, adversarial_batch
from rankfold.training.checkpoint import fingerprint, load_checkpoint, save_checkpoint
from rankfold.training.config import FinetuneConfig
from rankfold.training.distributed import World, join_world
from rankfold.training.losses import distillation_loss, feature_matching_loss
from rankfold.training.qat import (
    attach_activation_quant,
    attach_fake_quant,
    detach_activation_quant,
    detach_fake_quant,
)

TEACHER_CACHE_BYTES = 1 << 30  # teacher outputs kept per sample up to this; above it, recomputed
TIMED_STEPS = 5  # a time budget sets the number of steps from the speed of these (after the first)
# A time budget also stops the run once this share of it is spent, whatever number of steps its
# first steps set: work sharing the machine can slow the later steps (three trainings on one GPU
# overran a 5.5-minute budget by half).
OVERRUN = 1.1
ACTIVATION_CALIBRATION_SAMPLES = 256  # training samples that start the learned activation steps


@dataclass
class FinetuneLog:
    """What the run did, for the report: steps, time, samples seen, the loss and the held-back
    agreement as they went."""

    steps: int
    seconds: float
    processes: int
    samples_seen: int
    resumed_from: int = 0
    history: list[dict] = field(default_factory=list)
    # with learned activation steps: each quantized layer's input (scale, zero point), by layer
    input_steps: dict[str, ActivationParams] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**self.__dict__, "input_steps": {n: p._asdict() for n, p in self.input_steps.items()}}


def finetune(student: nn.Module, teacher: nn.Module, train_x: Tensor, *, labels: Tensor | None = None,
             config: FinetuneConfig, held: Tensor | None = None, checkpoint_dir: str | None = None,
             progress: Callable[[str], None] | None = None, world: World | None = None,
             fake_quant: Mapping[str, int] | None = None, reduce_range: bool = False,
             attack: AttackConfig | None = None, per_tensor: Collection[str] = (),
             max_memory: int | None = None, device: str | None = None) -> tuple[nn.Module, FinetuneLog]:
    """A trained copy of `student` (`student` and `teacher` are left as they are) and the log.

    Every output of the teacher is distilled (losses.LOSS_OF_KIND by output kind). Batch
    normalization and dropout stay in inference mode: statistics are those the network was
    compressed with, and a step does not depend on how the batch is split across processes.
    With `checkpoint_dir` the run saves there every `config.checkpoint_every` steps and resumes
    from what it finds there (when it is this run's). `fake_quant` ({layer: bits}, as a plan's
    layer_bits()): those layers train through their weights' quantization (training/qat.py) and
    come out with weights on the grid the QDQ export uses (int8 on 7 bits with `reduce_range`; one
    scale per tensor for the layers in `per_tensor`, as a plan's per_tensor_layers()).
    With `attack` (robustness.AttackConfig) the distillation is adversarial: each batch also
    trains on inputs moved, within the config's largest eps, to where the student departs most
    from the teacher's outputs on the clean batch (one signed step from a random start), so the
    student keeps the teacher's answers inside the eps-ball (robustness.adversarial_batch).
    `max_memory`: bytes the run stays under (default half the memory available): a batch too large
    for it runs in micro-batches whose gradients add up to the batch's (host memory: on a GPU the
    batch runs whole). `device`: where one process trains (distributed.training_device; default
    cpu); the teacher runs there too, the held-back agreement on the CPU, and the trained copy
    comes back on the CPU."""
    world = world or join_world(device)
    say = progress if (progress and world.is_main) else (lambda _m: None)
    check_training_data(train_x, labels, config, world)
    student = copy.deepcopy(student).to(world.device).eval()
    # The teacher answers on the training device; the held-back check keeps the caller's (CPU) one.
    teacher = teacher.eval()
    host_teacher = teacher
    if world.device.type != "cpu":
        teacher = copy.deepcopy(teacher).to(world.device).eval()
    input_hooks = []
    if fake_quant and config.activation_steps == "lsq":  # before the weights' parametrization: the
        # student is exported to find each layer's input tensor, and exported as the file will be
        input_hooks = attach_activation_quant(student, quantized_leaves(student, fake_quant),
                                              as_input(train_x[:ACTIVATION_CALIBRATION_SAMPLES]).to(world.device))
    quantized = attach_fake_quant(student, fake_quant, reduce_range=reduce_range,
                                  steps=config.weight_steps, per_tensor=per_tensor) if fake_quant else []
    if quantized:
        say(f"quantization-aware: {len(quantized)} layer(s) train through their weights' quantization "
            f"({config.weight_steps} steps)" + (f" and {len(input_hooks)} through their inputs' int8 quantization "
                                                "(learned steps)" if input_hooks else ""))
    kinds = _output_kinds(teacher, train_x[:2].to(world.device))
    trainable = [p for p in student.parameters() if p.requires_grad]
    if not trainable:
        raise RankfoldError("the compressed network has no trainable parameters")
    optimizer = _optimizer(trainable, config)
    settings = {k: v for k, v in config.to_dict().items() if k not in ("log_every", "checkpoint_every", "minutes")}
    stamp = fingerprint(student, train_x, {**settings, "labels": labels is not None,
                                           "attack": None if attack is None else repr(attack)})
    state = load_checkpoint(checkpoint_dir, stamp) if checkpoint_dir else None
    start, total = 0, config.steps
    history: list[dict] = []
    if state is not None:
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        start, total, history = state["step"], state["total_steps"], state["history"]
        say(f"resumed from {os.path.join(checkpoint_dir, 'finetune-checkpoint.pt')} at step {start} of {total}")
    if held is not None and start == 0:
        history.append({"step": 0, **_held_agreement(host_teacher, student, held), "seconds": 0.0})
        say(f"before fine-tuning: held-back {history[0]['held_measure']} {history[0]['held_agreement']:.1%}")
    trained = _wrapped(student, world)
    cache = _TeacherCache(teacher, train_x, world.device)
    per_epoch = len(train_x) // config.batch_size
    ball = tuple(b.to(world.device) for b in attack.bounds(train_x.numpy(), max(attack.eps))) \
        if attack is not None else None
    if ball is not None:
        say(f"adversarial distillation: eps {max(attack.eps):g} in {attack.units}, one signed step from a random "
            "start per batch")
    micro = _micro_batch(student, teacher, train_x, config, world, max_memory, ball is not None, say) \
        if world.device.type == "cpu" else config.batch_size // world.size
    features = _FeatureTaps(student, teacher, changed_layers(student, teacher, fake_quant)) \
        if config.feature_weight > 0 else None
    if features is not None:
        say(f"feature matching at {len(features.names)} changed layer(s), weight {config.feature_weight:g}")
    distiller = _Distiller(trained, student, teacher, train_x, labels, cache, kinds, config, world.device, ball,
                           features)
    t0 = time.time()
    step = start
    # A time budget sets the number of steps once, from the speed of the steps after the first (whose
    # lazy initialization, on a GPU its warm-up, took a third of a short budget on an H200); a
    # resumed run keeps the number its checkpoint recorded, so its schedule is the one it started with.
    timed_total = config.minutes is not None and (state is None or total is None)
    first_done = t0
    while step < (total or math.inf):
        if timed_total and step == start + 1 + TIMED_STEPS:
            per_step = (time.time() - first_done) / TIMED_STEPS
            total = _steps_in_time(config, step, time.time() - t0, per_step, world)
            say(f"{config.minutes:g} min allow {total} steps in all ({per_step:.3f} s a step; the first took "
                f"{first_done - t0:.2f} s)")
            timed_total = False
            if step >= total:
                break
        epoch, index_in_epoch = divmod(step, per_epoch)
        batch = world.shard(_epoch_order(len(train_x), config.seed, epoch)
                            [index_in_epoch * config.batch_size : (index_in_epoch + 1) * config.batch_size])
        _set_lr(optimizer, config, step, total or (start + 10 * TIMED_STEPS))
        optimizer.zero_grad(set_to_none=True)
        chunks = batch.split(micro)
        step_loss = 0.0
        for index, chunk in enumerate(chunks):
            # Gradients of the micro-batches add up (each loss weighted by its share of the batch);
            # under DDP they are averaged across processes once, on the last micro-batch.
            last = index == len(chunks) - 1
            with contextlib.nullcontext() if last or world.size == 1 else trained.no_sync():
                seed = config.seed * 1_000_003 + step * 97 + world.rank + 7919 * index
                loss = distiller.loss(chunk, seed) * (len(chunk) / len(batch))
                if not torch.isfinite(loss):
                    raise RankfoldError(f"fine-tuning diverged at step {step + 1} (loss {float(loss.detach())}): lower "
                                        f"the learning rate (now {config.lr:g}) or use the adamw optimizer")
                loss.backward()
            step_loss += float(loss.detach())
        optimizer.step()
        step += 1
        if step == start + 1:
            first_done = time.time()
        stopping = _out_of_time(config, time.time() - t0, step, total, world)
        if step % config.log_every == 0 or step == total or stopping:
            entry = {"step": step, "loss": world.mean(step_loss), "seconds": round(time.time() - t0, 1)}
            if held is not None:
                entry.update(_held_agreement(host_teacher, student, held))
            history.append(entry)
            say(_progress_line(entry, total))
        if checkpoint_dir and (step % config.checkpoint_every == 0 or step == total or stopping):
            if world.is_main:
                save_checkpoint(checkpoint_dir, {"fingerprint": stamp, "step": step, "total_steps": total,
                                                 "student": student.state_dict(), "history": history,
                                                 "optimizer": optimizer.state_dict()})
            world.barrier()
        if stopping:
            say(f"the {config.minutes:g} min budget is spent at step {step} of {total}: stopped there (the "
                "learning rate had not reached 0)")
            break
    seconds = time.time() - t0
    if features is not None:
        features.remove()
    detach_fake_quant(student)
    learned = detach_activation_quant(student, input_hooks) if input_hooks else {}
    return student.cpu(), FinetuneLog(step, round(seconds, 1), world.size, (step - start) * config.batch_size,
                                      start, history, learned)


@dataclass
class _Distiller:
    """What the loss of every micro-batch reads: the networks, the training data, the settings."""

    trained: nn.Module  # the student as it trains (wrapped in DDP under torchrun)
    student: nn.Module
    teacher: nn.Module
    train_x: Tensor
    labels: Tensor | None
    cache: _TeacherCache
    kinds: list[str]
    config: FinetuneConfig
    device: torch.device
    ball: tuple | None  # adversarial distillation's bounds, else None
    features: _FeatureTaps | None

    def loss(self, rows: Tensor, seed: int) -> Tensor:
        """The distillation loss of the training samples `rows` (a mean over them)."""
        config = self.config
        x = as_input(self.train_x[rows]).to(self.device)
        targets = self.cache.outputs(rows)
        y = None if self.labels is None else self.labels[rows].to(self.device)
        if self.ball is not None:
            # Half the batch is moved: a third of the loss, so the clean answers keep most of the weight.
            # One forward over clean and moved inputs together (DDP: one pass per step).
            half = (len(x) + 1) // 2
            moved = adversarial_batch(self.student, x[:half], [t[:half] for t in targets], self.kinds,
                                      config.temperature, *self.ball, torch.Generator().manual_seed(seed))
            x, targets = torch.cat([x, moved]), [torch.cat([t, t[:half]]) for t in targets]
            y = None if y is None else torch.cat([y, y[:half]])
        loss = distillation_loss(model_outputs(self.trained(x)), targets, self.kinds, temperature=config.temperature,
                                 labels=y, label_weight=config.label_weight)
        if self.features is not None:
            with torch.no_grad():
                self.teacher(x)  # the teacher's layer outputs on this very batch (moved inputs included)
            loss = loss + config.feature_weight * feature_matching_loss(self.features.student, self.features.teacher)
        return loss


def _micro_batch(student: nn.Module, teacher: nn.Module, train_x: Tensor, config: FinetuneConfig, world: World,
                 max_memory: int | None, adversarial: bool, say: Callable[[str], None]) -> int:
    """How many samples one forward/backward pass takes so that the run stays under `max_memory`
    (host_memory.training_memory), said when it splits the batch."""
    per_process = config.batch_size // world.size
    with torch.no_grad():
        outs = model_outputs(teacher(as_input(train_x[:1])))
    cached = sum(y[0].numel() * y.element_size() for y in outs) * len(train_x)
    memory = training_memory(student, as_input(train_x[:2]), per_process, max_memory,
                             reserved=cached if cached <= TEACHER_CACHE_BYTES else 0,
                             inputs_per_sample=1.5 if adversarial else 1.0)
    if memory.batch < per_process:
        say(f"memory: each step's {per_process} samples run in micro-batches of {memory.batch} (gradients summed), "
            f"about {format_bytes(memory.estimate)} at peak (limit {format_bytes(memory.limit)})")
    return memory.batch


def check_training_data(train_x: Tensor, labels: Tensor | None, config: FinetuneConfig, world: World) -> None:
    """Before any work: enough samples for one batch, a batch the processes share evenly."""
    if not isinstance(train_x, Tensor) or train_x.ndim < 2:
        raise RankfoldError("training inputs must be a tensor (N, ...)")
    if len(train_x) < config.batch_size:
        raise RankfoldError(f"the batch size ({config.batch_size}) is larger than the training set "
                            f"({len(train_x)} samples)")
    if config.batch_size % world.size:
        raise RankfoldError(f"the batch size ({config.batch_size}) must divide evenly among the {world.size} "
                            "processes")
    if labels is not None and labels.shape[:1] != train_x.shape[:1]:
        raise RankfoldError(f"{len(labels)} labels for {len(train_x)} training inputs")
    if labels is not None and labels.dtype not in (torch.int64, torch.int32):
        raise RankfoldError(f"labels must be integer class indices, got {labels.dtype}")


def _output_kinds(teacher: nn.Module, probe: Tensor) -> list[str]:
    declared = tuple(getattr(teacher, "output_kinds", ()) or ())
    with torch.no_grad():
        outputs = model_outputs(teacher(as_input(probe)))
    return [(declared[i] if i < len(declared) else None) or output_kind(y) for i, y in enumerate(outputs)]


def _optimizer(params: list, config: FinetuneConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0,
                           weight_decay=config.weight_decay)


def _wrapped(student: nn.Module, world: World) -> nn.Module:
    """DDP under torchrun: rank 0's weights are broadcast at wrapping and gradients averaged."""
    if world.size == 1:
        return student
    from torch.nn.parallel import DistributedDataParallel

    ids = [world.local_rank] if world.device.type == "cuda" else None
    return DistributedDataParallel(student, device_ids=ids, broadcast_buffers=False)


def _epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The sample order of an epoch: the same on every process and on resume."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def _set_lr(optimizer: torch.optim.Optimizer, config: FinetuneConfig, step: int, total: int) -> None:
    warmup = max(1, total // 20)
    scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) /
                                                                         max(1, total - warmup)))
    for group in optimizer.param_groups:
        group["lr"] = config.lr * scale


def _out_of_time(config: FinetuneConfig, elapsed: float, step: int, total: int | None, world: World) -> bool:
    """Whether a run with a time budget stops after `step`: OVERRUN of its budget is spent before its
    last step. Every process agrees (one that is out of time stops them all)."""
    if config.minutes is None or total is None or step >= total:
        return False
    return world.minimum(int(elapsed <= OVERRUN * config.minutes * 60)) == 0


def _steps_in_time(config: FinetuneConfig, step: int, elapsed: float, per_step: float, world: World) -> int:
    """The step the run ends at: as many more as the rest of the budget holds at `per_step` seconds."""
    allowed = step + int((config.minutes * 60 - elapsed) / max(per_step, 1e-9))
    total = min(allowed, config.steps) if config.steps else allowed
    return world.minimum(max(total, step))  # every process stops at the same step


# What the progress calls each default measure of the self-check (selfcheck.default_rules)
_MEASURE_NAMES = {"sequence": "sequences read alike", "top1": "top-1 agreement", "iou": "score IoU",
                  "cosine": "embedding cosine"}


def _held_agreement(teacher: nn.Module, student: nn.Module, held: Tensor) -> dict:
    """{"held_agreement": share, "held_measure": its name}: on the held-back samples, the measure
    the self-check judges each output by by default (whole sequences read alike, top-1, score IoU,
    cosine; 1 - relative error where it has none that rises with agreement), the worst output's."""
    from rankfold.selfcheck import agreement, default_rules

    if next(student.parameters()).device.type != "cpu":  # a copy on the CPU, where `held` and the teacher are
        student = copy.deepcopy(student).cpu()
    check = agreement(teacher, student, held)
    measures = []
    for out in check.outputs:
        rules = [r for r in default_rules(out.kind, 0.0, 0.0) if r.metric in _MEASURE_NAMES and r.key in out.metrics]
        measures.append((out.metrics[rules[0].key], _MEASURE_NAMES[rules[0].metric]) if rules
                        else (1.0 - out.rel_output_error, "1 - relative error"))
    value, name = min(measures) if measures else (1.0 - check.rel_output_error, "1 - relative error")
    return {"held_agreement": value, "held_measure": name}


def _progress_line(entry: dict, total: int | None) -> str:
    held = f", held-back {entry['held_measure']} {entry['held_agreement']:.1%}" if "held_agreement" in entry else ""
    return f"step {entry['step']}/{total or '?'}: loss {entry['loss']:.4f}{held} ({entry['seconds']:.0f} s)"


class _TeacherCache:
    """The teacher's outputs per training sample, computed when first needed and kept when they fit
    in TEACHER_CACHE_BYTES (class scores always do), so each epoch after the first costs only the
    student."""

    def __init__(self, teacher: nn.Module, train_x: Tensor, device: torch.device):
        self.teacher, self.train_x, self.device = teacher, train_x, device
        self.kept: list[Tensor] | None = None
        self.have: Tensor | None = None

    def outputs(self, batch: Tensor) -> list[Tensor]:
        if self.have is not None and bool(self.have[batch].all()):
            return [k[batch].to(self.device) for k in self.kept]
        with torch.no_grad():
            outs = [y.detach() for y in model_outputs(self.teacher(as_input(self.train_x[batch]).to(self.device)))]
        self._keep(batch, outs)
        return [y.to(self.device) for y in outs]

    def _keep(self, batch: Tensor, outs: list[Tensor]) -> None:
        n = len(self.train_x)
        if self.kept is None:
            per_sample = sum(y[0].numel() * y.element_size() for y in outs)
            if per_sample * n > TEACHER_CACHE_BYTES:
                return
            self.kept = [torch.empty((n, *y.shape[1:]), dtype=y.dtype) for y in outs]
            self.have = torch.zeros(n, dtype=torch.bool)
        for keep, y in zip(self.kept, outs):
            keep[batch] = y.cpu()
        self.have[batch] = True


def _out_width(module: nn.Module) -> int | None:
    """Output channels of a layer, or of a factorized chain's last factor (None: not a layer)."""
    children = list(module.children())
    weight = getattr(children[-1] if children else module, "weight", None)
    return None if weight is None else int(weight.shape[0])


def changed_layers(student: nn.Module, teacher: nn.Module, fake_quant: Mapping[str, int] | None) -> list[str]:
    """The layers the compression changed that the teacher also has, by name: factorized ones
    (LowRank in place of the original layer), quantized ones, and ones --mlp-keep refitted to fewer
    inputs, wherever both give outputs of the same width (a projection whose neurons were pruned
    has no teacher output to match)."""
    from rankfold.layers import LowRank

    in_teacher = dict(teacher.named_modules())
    quantized = {n for n, b in (fake_quant or {}).items() if b < 32}

    def changed(name: str, module: nn.Module) -> bool:
        original = in_teacher[name]
        reshaped = isinstance(getattr(module, "weight", None), Tensor) and \
            isinstance(getattr(original, "weight", None), Tensor) and module.weight.shape != original.weight.shape
        return isinstance(module, LowRank) or name in quantized or reshaped

    return [n for n, m in student.named_modules() if n in in_teacher and not isinstance(in_teacher[n], LowRank)
            and changed(n, m) and _out_width(m) == _out_width(in_teacher[n])]


class _FeatureTaps:
    """The outputs of the same named layers of student and teacher, as their last forward left them."""

    def __init__(self, student: nn.Module, teacher: nn.Module, names: list[str]):
        if not names:
            raise RankfoldError("feature matching: the compressed network has no factorized or quantized layer "
                                "that the original also has")
        self.names = names
        self.student: dict[str, Tensor] = {}
        self.teacher: dict[str, Tensor] = {}
        self.handles = []
        for network, store in ((student, self.student), (teacher, self.teacher)):
            modules = dict(network.named_modules())
            for name in names:
                self.handles.append(modules[name].register_forward_hook(
                    lambda _m, _i, out, name=name, store=store: store.__setitem__(name, out)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
