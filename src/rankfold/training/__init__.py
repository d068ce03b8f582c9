"""Fine-tuning after compression: distillation from the original (the teacher) into the compressed
network (the student), on one process or under torchrun. `finetune_result` takes a Compressed and
returns one, checked again, whose save() writes it as compress does."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import Tensor

from rankfold.result import Compressed
from rankfold.robustness import AttackConfig
from rankfold.training.config import FinetuneConfig
from rankfold.training.loop import FinetuneLog, finetune

__all__ = ["FinetuneConfig", "FinetuneLog", "finetune", "finetune_result"]


def finetune_result(result: Compressed, train_x: Tensor, *, config: FinetuneConfig, labels: Tensor | None = None,
                    checkpoint_dir: str | None = None, check: bool = True, qat: bool = True,
                    progress: Callable[[str], None] | None = None,
                    attack: AttackConfig | None = None,
                    max_memory: int | None = None, device: str | None = None) -> tuple[Compressed, FinetuneLog]:
    """`result` with its module distilled from `result.original` on `train_x`, then the self-check
    of compress on the same held-back calibration samples (refusing a result below its rules);
    progress shows the loss and the held-back agreement as training goes. With `qat` (default) a
    plan's quantized layers train through their weights' quantization and save() writes exactly
    those weights; qat=False trains in float and save() quantizes after training as compress does.
    `attack`: adversarial distillation within its eps (see training.loop.finetune). The self-check
    judges `result.check_samples` when set (with adversarial distillation after adversarial
    calibration, the clean held-back ones: the student is taught the teacher's clean answers where
    the teacher's own adversarial inputs fool it). `max_memory`: bytes the training stays under
    (default half the memory available; a large batch then runs in micro-batches). `device`: where
    the training runs (cpu by default, or cuda); the result comes back on the CPU."""
    from rankfold.planner.pipeline import check_result

    say = progress or (lambda _m: None)
    held = _held_back(result)
    fake_quant = result.plan.layer_bits() if qat and result.quantized else None
    module, log = finetune(result.module, result.original, train_x, labels=labels, config=config, held=held,
                           checkpoint_dir=checkpoint_dir, progress=progress, fake_quant=fake_quant,
                           reduce_range=bool(result.plan and result.plan.reduce_range), attack=attack,
                           per_tensor=result.plan.per_tensor_layers() if fake_quant else (), max_memory=max_memory,
                           device=device)
    checked = check_result(result.original, module, held, result.min_agreement, say, result.max_output_error,
                           result.rules) if check else None
    return dataclasses.replace(result, module=module, check=checked, weights_on_grid=fake_quant is not None,
                               input_steps=log.input_steps), log


def _held_back(result: Compressed) -> Tensor | None:
    """The calibration samples the result's self-check used (never fitted on)."""
    from rankfold.selfcheck import split_holdout

    if result.check_samples is not None:
        return result.check_samples
    if result.calib is None:
        return None
    if result.plan is not None and result.plan.held_back is not None:
        n = result.plan.held_back
        return result.calib[len(result.calib) - n:] if n else None
    return split_holdout(result.calib)[1]
