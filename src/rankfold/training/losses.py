"""Distillation losses, one per output kind: what the student is asked to match on each output of
the teacher. Pure functions of tensors."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-8


def _kl_of_scores(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """KL(teacher || student) on class scores (logits, classes on axis 1) softened at `temperature`,
    scaled by T^2 so that its gradients keep their size as T changes (Hinton et al.)."""
    t = temperature
    log_p_student = F.log_softmax(student / t, dim=1)
    log_p_teacher = F.log_softmax(teacher / t, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean") * t * t


def _kl_of_probabilities(student: Tensor, teacher: Tensor, _temperature: float) -> Tensor:
    """KL(teacher || student) per position for outputs that already are probabilities over the last
    axis (a softmax at the end: CTC frames, class maps), averaged over positions. Not softened: at
    T = 4 the thousands of characters a recogniser never reads (6,625 in PP-OCRv4's) hold most of
    the softened mass, and the student learns their tail instead of the answer. Measured on
    PP-OCRv4's recogniser at half its parameters: softened, 60 steps on 224 lines took per-frame
    agreement from 0.90 to 0.84; unsoftened, 150 steps of 32 on 2,048 lines took lines read alike
    on 128 fresh lines from 0.27 to 0.72."""
    log_s = torch.log(student.clamp_min(EPS)).flatten(0, -2)
    log_t = torch.log(teacher.clamp_min(EPS)).flatten(0, -2)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")


def _kl_per_token(student: Tensor, teacher: Tensor, _temperature: float) -> Tensor:
    """KL(teacher || student) of the next-token distributions (logits over the last axis) at every
    position, averaged over positions. Not softened, for the reason _kl_of_probabilities gives: a
    vocabulary of tens of thousands of tokens would hold most of the softened mass in its tail."""
    log_s = F.log_softmax(student.flatten(0, -2).float(), dim=-1)
    log_t = F.log_softmax(teacher.flatten(0, -2).float(), dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")


def _relative_squared_error(student: Tensor, teacher: Tensor, _temperature: float) -> Tensor:
    """||s - t||^2 / ||t||^2: dense maps, regressions, embeddings, detector heads, on one scale
    whatever their units."""
    return (student - teacher).pow(2).sum() / teacher.pow(2).sum().clamp_min(EPS)


def _score_channels(teacher: Tensor) -> Tensor:
    """The channels (axis 1) of a batch of maps whose values all lie in [0, 1]: a detector head's
    class scores beside its box coordinates (the self-check's grouping)."""
    rows = teacher.detach().movedim(1, -1).reshape(-1, teacher.shape[1])
    return (rows.amin(0) >= 0) & (rows.amax(0) <= 1)


def _relative_squared_error_by_group(student: Tensor, teacher: Tensor, _temperature: float) -> Tensor:
    """A map with score channels and others: the mean of each group's relative squared error, as
    the self-check judges each group apart. Pooled, box coordinates in pixels outweigh the scores
    some 10^4 times and the student learns the boxes alone (YOLOv8n at half its parameters: 2,670
    steps left score IoU@0.25 on fresh scenes at 0.60, from 0.58 before training). Any other
    output: one relative squared error."""
    if teacher.ndim < 3:
        return _relative_squared_error(student, teacher, _temperature)
    scores = _score_channels(teacher)
    if bool(scores.all()) or not bool(scores.any()):
        return _relative_squared_error(student, teacher, _temperature)
    return 0.5 * (_relative_squared_error(student[:, scores], teacher[:, scores], _temperature)
                  + _relative_squared_error(student[:, ~scores], teacher[:, ~scores], _temperature))


LOSS_OF_KIND: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "classes": _kl_of_scores,
    "sequence": _kl_of_probabilities,
    "distribution": _kl_of_probabilities,
    "dense": _relative_squared_error_by_group,
    "embedding": _relative_squared_error,
    "next_token": _kl_per_token,
}


def distillation_loss(students: Sequence[Tensor], teachers: Sequence[Tensor], kinds: Sequence[str], *,
                      temperature: float, labels: Tensor | None = None, label_weight: float = 0.0) -> Tensor:
    """The mean over outputs of each output's distillation loss; with labels, the first class-score
    output also pays cross-entropy, weighted `label_weight`."""
    # a decoder's key / value caches are judged through its logits (rankfold.frontends.onnx.decoder_outputs)
    losses = [LOSS_OF_KIND[kind](s, t, temperature) for s, t, kind in zip(students, teachers, kinds)
              if kind != "cache"]
    loss = torch.stack(losses).mean()
    if labels is not None and label_weight > 0:
        scores = next(s for s, kind in zip(students, kinds) if kind == "classes")
        loss = (1 - label_weight) * loss + label_weight * F.cross_entropy(scores, labels)
    return loss


def feature_matching_loss(students: Mapping[str, Tensor], teachers: Mapping[str, Tensor]) -> Tensor:
    """The mean over layers of the relative squared error of the student's output of each layer to
    the teacher's output of the same layer (keys: layer names)."""
    return torch.stack([_relative_squared_error(students[n], teachers[n].detach(), 1.0) for n in teachers]).mean()
