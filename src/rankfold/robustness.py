"""Adversarial robustness of a model and of its compression: FGSM and PGD, measured on the model
as it runs.

Gradients come from a torch twin of the ONNX file (the ONNX front-end). For a float model the twin
is the model itself. For a QDQ model the twin keeps every QuantizeLinear's rounding and clipping in
the forward pass and passes gradients straight through them: the integer model's own gradients
are zero almost everywhere, and an attack on them would fail for that reason alone (gradient
masking mistaken for robustness). The adversarial inputs are then judged by onnxruntime on the
file itself, so a QDQ model is judged on its integer kernels. A transfer attack crafts the inputs
on another model (the original) and judges them on this one.

Epsilon is in pixel units when the input normalization is given ((pixel - mean) / std, pixels in
[0, 1]; the attack stays among valid pixels), otherwise in the model's input units, the attack
staying within the data's own range. Random starts use a fixed seed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rankfold.errors import RankfoldError
from rankfold.frontends.onnx_ops import STRAIGHT_THROUGH

# x_adv = attack(model, x, y, eps, step_size, steps, low, high, generator); eps, low and high are
# tensors that broadcast against x (per channel when the normalization is per channel).
Attack = Callable[..., Tensor]
ATTACKS: dict[str, Attack] = {}

DEFAULT_STEPS = 10
DEFAULT_EPS = 0.03
ATTACK_BATCH = 100  # samples per attack pass: memory stays flat in the number of samples


def attack(name: str) -> Callable[[Attack], Attack]:
    def register(fn: Attack) -> Attack:
        ATTACKS[name] = fn
        return fn

    return register


def _loss_gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    x = x.detach().requires_grad_(True)
    logits = _class_scores(model(x))
    loss = F.cross_entropy(logits, y)
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def _project(x_adv: Tensor, x: Tensor, eps: Tensor, low: Tensor, high: Tensor) -> Tensor:
    return torch.maximum(torch.minimum(x_adv, x + eps), x - eps).clamp(low, high)


@attack("fgsm")
def fgsm(model: nn.Module, x: Tensor, y: Tensor, *, eps: Tensor, low: Tensor, high: Tensor, **_) -> Tensor:
    """One step of size eps along the sign of the loss gradient (Goodfellow et al., 2015)."""
    return _project(x + eps * _loss_gradient(model, x, y).sign(), x, eps, low, high).detach()


@attack("pgd")
def pgd(model: nn.Module, x: Tensor, y: Tensor, *, eps: Tensor, low: Tensor, high: Tensor, steps: int,
        step_size: float, generator: torch.Generator, **_) -> Tensor:
    """Signed-gradient steps of step_size * eps, each projected back into the eps-ball, from a
    uniform random start inside it (Madry et al., 2018)."""
    start = (torch.rand(x.shape, generator=generator) * 2 - 1) * eps
    x_adv = _project(x + start, x, eps, low, high)
    for _ in range(steps):
        x_adv = _project(x_adv + step_size * eps * _loss_gradient(model, x_adv, y).sign(), x, eps, low, high)
    return x_adv.detach()


ATTACKS["transfer"] = pgd  # crafted by PGD on the source model, judged on another


def _class_scores(out) -> Tensor:
    scores = out[0] if isinstance(out, (tuple, list)) else out
    if scores.ndim != 2:
        raise RankfoldError(f"an attack needs (N, classes) scores as the model's first output, got shape "
                            f"{tuple(scores.shape)}")
    return scores


@dataclass(frozen=True)
class AttackConfig:
    """One attack. eps are in pixel units when `pixel_std` is given, else in input units."""

    kind: str = "pgd"
    eps: tuple[float, ...] = (DEFAULT_EPS,)
    steps: int = DEFAULT_STEPS
    step_size: float = 0.25  # a PGD step, as a fraction of eps (10 steps of eps/4 reach every corner)
    seed: int = 0
    pixel_mean: tuple[float, ...] | None = None
    pixel_std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ATTACKS:
            raise ValueError(f"attack must be one of {', '.join(sorted(ATTACKS))}, got {self.kind!r}")
        if not self.eps or any(not np.isfinite(e) or e < 0 for e in self.eps):
            raise ValueError(f"eps must be finite values >= 0, got {self.eps}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0 < self.step_size <= 1:
            raise ValueError(f"step_size must be in (0, 1] (a fraction of eps), got {self.step_size}")
        if (self.pixel_mean is None) != (self.pixel_std is None):
            raise ValueError("pixel_mean and pixel_std go together: give both or neither")
        if self.pixel_std is not None and any(not s > 0 for s in self.pixel_std):
            raise ValueError(f"pixel_std must be > 0, got {self.pixel_std}")

    @property
    def units(self) -> str:
        return "pixels in [0, 1] (before normalization)" if self.pixel_std else "model input units"

    def bounds(self, x: np.ndarray, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        """(eps, low, high) in input units, shaped to broadcast against x."""
        if self.pixel_std is None:
            low, high = float(x.min()), float(x.max())
            return torch.tensor(eps), torch.tensor(low), torch.tensor(high)
        channels = x.shape[1] if x.ndim > 1 else 1
        mean, std = (np.broadcast_to(np.asarray(v, np.float32), (channels,)) for v in (self.pixel_mean, self.pixel_std))
        shape = (1, channels) + (1,) * (x.ndim - 2)
        as_tensor = lambda v: torch.from_numpy(np.ascontiguousarray(v, np.float32)).reshape(shape)  # noqa: E731
        return as_tensor(eps / std), as_tensor(-mean / std), as_tensor((1 - mean) / std)

    def check_channels(self, x: np.ndarray, where: str) -> None:
        channels = x.shape[1] if x.ndim > 1 else 1
        for name, values in (("pixel mean", self.pixel_mean), ("pixel std", self.pixel_std)):
            if values is not None and len(values) not in (1, channels):
                raise RankfoldError(f"{where}: the {name} has {len(values)} values; the inputs have {channels} "
                                    "channels (give 1 or one per channel)")


def craft(model: nn.Module, x: np.ndarray, y: np.ndarray, config: AttackConfig, eps: float,
          progress: Callable[[str], None] | None = None) -> np.ndarray:
    """Adversarial inputs for (x, y) against `model`, ATTACK_BATCH samples at a time."""
    eps_t, low, high = config.bounds(x, eps)
    if eps == 0:
        return x.copy()
    generator = torch.Generator().manual_seed(config.seed)
    fn = ATTACKS[config.kind]
    model.eval()
    out = np.empty_like(x)
    for start in range(0, len(x), ATTACK_BATCH):
        xb = torch.from_numpy(x[start : start + ATTACK_BATCH])
        yb = torch.from_numpy(y[start : start + ATTACK_BATCH]).long()
        out[start : start + len(xb)] = fn(model, xb, yb, eps=eps_t, low=low, high=high, steps=config.steps,
                                          step_size=config.step_size, generator=generator).numpy()
        if progress is not None:
            progress(f"{config.kind} eps={eps:g}: {min(start + ATTACK_BATCH, len(x))}/{len(x)} samples")
    return out


def attack_twin(path: str | os.PathLike) -> tuple[nn.Module, str]:
    """A differentiable torch twin of an ONNX file, and which gradients it gives, in words."""
    from rankfold.frontends.onnx import load_onnx

    twin = load_onnx(path)
    # QDQ pairs load straight-through already; a QuantizeLinear read by other ops becomes so here
    quantizers = [step for step in twin.steps if step.op in ("QuantizeLinear", STRAIGHT_THROUGH)]
    for step in quantizers:
        step.op = STRAIGHT_THROUGH
    for p in twin.parameters():
        p.requires_grad_(False)
    if quantizers:
        return twin, (f"a float twin of the QDQ graph: its {len(quantizers)} QuantizeLinear keep their rounding "
                      "and clipping forward, and pass gradients straight through")
    return twin, "the float model's own gradients"


@dataclass
class RobustResult:
    attack: str
    eps: float
    eps_units: str
    steps: int
    samples: int
    clean_accuracy: float  # onnxruntime, the file itself
    adversarial_accuracy: float  # onnxruntime on the adversarial inputs
    gradients: str  # which model's gradients crafted the inputs, and how
    twin_agreement: float  # adversarial top-1 of the twin = of the file (white-box: the twin is faithful)

    def to_dict(self) -> dict:
        return asdict(self)


def _predictions(path: str, x: np.ndarray) -> np.ndarray:
    from rankfold.evaluate import class_scores

    return class_scores(path, x).argmax(axis=1)


def _twin_predictions(twin: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([_class_scores(twin(torch.from_numpy(x[s : s + ATTACK_BATCH]))).argmax(1).numpy()
                               for s in range(0, len(x), ATTACK_BATCH)])


def robust_accuracy(path: str | os.PathLike, x: np.ndarray, y: np.ndarray, config: AttackConfig, *,
                    source: str | os.PathLike | None = None,
                    progress: Callable[[str], None] | None = None) -> list[RobustResult]:
    """Clean and adversarial top-1 of the ONNX file at `path`, one result per eps of `config`.
    White-box attacks craft on the file's twin; `transfer` crafts on `source` (the original)."""
    path = os.fspath(path)
    if config.kind == "transfer" and source is None:
        raise RankfoldError("a transfer attack crafts its inputs on another model: give the original (--original)")
    config.check_channels(x, path)
    twin, gradients = attack_twin(path)
    crafter, words = (twin, gradients) if config.kind != "transfer" else attack_twin(source)
    if config.kind == "transfer":
        gradients = f"transferred from {os.fspath(source)} ({words})"
    clean = _predictions(path, x)
    results = []
    for eps in config.eps:
        x_adv = craft(crafter, x, y, config, eps, progress)
        adv = _predictions(path, x_adv)
        results.append(RobustResult(config.kind, eps, config.units, config.steps if config.kind != "fgsm" else 1,
                                    len(x), float((clean == y).mean()), float((adv == y).mean()), gradients,
                                    float((_twin_predictions(twin, x_adv) == adv).mean())))
    return results


def robustness_table(rows: Sequence[tuple[str, RobustResult]]) -> str:
    """One line per (model, result): clean and adversarial top-1 side by side."""
    lines = [f"{'model':28}{'attack':>9}{'eps':>8}{'clean':>9}{'adv.':>9}{'twin=file':>11}"]
    for name, r in rows:
        lines.append(f"{name:28}{r.attack:>9}{r.eps:>8g}{r.clean_accuracy:>9.4f}{r.adversarial_accuracy:>9.4f}"
                     f"{r.twin_agreement:>11.1%}")
    return "\n".join(lines)


def adversarial_calibration(model: nn.Module, calib: Tensor, config: AttackConfig,
                            progress: Callable[[str], None] | None = None) -> Tensor:
    """The calibration inputs followed by PGD inputs crafted on the original model against its own
    top-1 (no labels needed), at the largest eps of `config`: the data-aware factorization then
    fits the layers' inputs where an attacker takes them, not only where clean data lies."""
    x = calib.numpy()
    y = _twin_predictions(model, x)
    eps = max(config.eps)
    pgd_config = dataclasses.replace(config, kind="pgd", eps=(eps,))
    adversarial = torch.from_numpy(craft(model, x, y, pgd_config, eps, progress))
    # Interleaved, so that the samples the self-check holds back (the last eighth) are both kinds.
    return torch.stack([calib, adversarial], dim=1).reshape(2 * len(calib), *calib.shape[1:])


def clean_calibration_samples(calib: Tensor, start: int) -> Tensor:
    """The clean samples at positions `start` and after of what adversarial_calibration returned
    (even positions; for plain calibration data, a clean subset all the same)."""
    return calib[start + start % 2 :: 2]


def adversarial_batch(student: nn.Module, x: Tensor, teacher_outputs: Sequence[Tensor], kinds: Sequence[str],
                      temperature: float, eps: Tensor, low: Tensor, high: Tensor,
                      generator: torch.Generator) -> Tensor:
    """Inputs within eps of `x` where the student's outputs depart most from the teacher's on x:
    one signed gradient step of 1.25 eps from a uniform random start, projected back (the fast
    single-step attack of Wong et al., 2020, on the distillation loss, as adversarially robust
    distillation trains on; Goldblum et al., 2020)."""
    from rankfold.analyze import model_outputs
    from rankfold.training.losses import distillation_loss

    start = _project(x + (torch.rand(x.shape, generator=generator).to(x.device) * 2 - 1) * eps, x, eps, low, high)
    start = start.detach().requires_grad_(True)
    loss = distillation_loss(model_outputs(student(start)), teacher_outputs, kinds, temperature=temperature)
    (grad,) = torch.autograd.grad(loss, start)
    return _project(start + 1.25 * eps * grad.sign(), x, eps, low, high).detach()
