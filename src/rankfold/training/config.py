"""FinetuneConfig: the knobs of a distillation run, validated where they are made."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from rankfold.training.qat import ACTIVATION_STEPS, WEIGHT_STEPS

OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class FinetuneConfig:
    """How the compressed network (the student) learns from the original (the teacher).

    steps: optimizer steps (each over `batch_size` samples, across all processes together).
    minutes: a time budget instead of, or on top of, `steps`: the number of steps is set from the
        speed of the first steps so that the learning-rate schedule still ends at zero; if later
        steps slow down, the run stops once loop.OVERRUN times the budget is spent.
    batch_size: the global batch; under torchrun each of the N processes takes batch_size / N.
    lr: peak learning rate (linear warm-up over the first 5 % of the steps, then cosine to 0).
    temperature: softening of class scores in the distillation loss (KL, scaled by T^2).
    label_weight: with labels, the loss is (1 - w) * distillation + w * cross-entropy.
    feature_weight: adds w times feature matching: the relative squared error of the student's
        output of each layer the compression changed (factorized or quantized) to the teacher's
        output of that layer on the same batch (costs one teacher pass per step; 0: off).
    weight_steps: how quantization-aware training sets each quantized channel's step (qat.WEIGHT_STEPS):
        "max-abs" (the exporter's rule) or "lsq" (learned, started at the least-error clipping).
    activation_steps: "calibrated" (the int8 activation steps come from the calibration data after
        training, as in compress) or "lsq" (each quantized layer's input trains through its int8
        quantization with a learned step, started at the calibrated one; the file holds the learned
        steps for those tensors).
    """

    steps: int | None = None
    minutes: float | None = None
    batch_size: int = 64
    lr: float = 3e-4
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 0.0
    temperature: float = 4.0
    label_weight: float = 0.0
    feature_weight: float = 0.0
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 100
    weight_steps: str = "max-abs"
    activation_steps: str = "calibrated"

    def __post_init__(self) -> None:
        if self.steps is None and self.minutes is None:
            raise ValueError("give steps or minutes (how long to fine-tune)")
        _positive_int("steps", self.steps, optional=True)
        _positive_int("batch_size", self.batch_size)
        _positive_int("log_every", self.log_every)
        _positive_int("checkpoint_every", self.checkpoint_every)
        if self.minutes is not None:
            _in_range("minutes", self.minutes, 0.0, math.inf, "a number of minutes > 0", open_low=True)
        _in_range("lr", self.lr, 0.0, 10.0, "a learning rate in (0, 10]", open_low=True)
        _in_range("momentum", self.momentum, 0.0, 1.0, "a number in [0, 1)", open_high=True)
        _in_range("weight_decay", self.weight_decay, 0.0, 1.0, "a number in [0, 1]")
        _in_range("temperature", self.temperature, 0.0, 100.0, "a temperature in (0, 100]", open_low=True)
        _in_range("label_weight", self.label_weight, 0.0, 1.0, "a number in [0, 1]")
        _in_range("feature_weight", self.feature_weight, 0.0, 100.0, "a number in [0, 100]")
        if self.weight_steps not in WEIGHT_STEPS:
            raise ValueError(f"weight_steps must be one of {', '.join(WEIGHT_STEPS)}, got {self.weight_steps!r}")
        if self.activation_steps not in ACTIVATION_STEPS:
            raise ValueError(f"activation_steps must be one of {', '.join(ACTIVATION_STEPS)}, "
                             f"got {self.activation_steps!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"seed must be an integer, got {self.seed!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _positive_int(name: str, value, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _in_range(name: str, value, low: float, high: float, expected: str, *, open_low: bool = False,
              open_high: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
