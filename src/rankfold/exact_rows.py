"""Wide output layers split into the rows the data reads and the rest (layers.ExactRows).

A text recogniser's last Linear scores 6,625 characters; English lines make PP-OCRv4's predict 67
of them. Kept whole, that layer is 30 % of the network's parameters, and the plan at half of them
spent 222,465 on it (rank 32): its 67 rows are the logits that decide every frame, and a low rank
serves them and 6,558 rows that never win alike. Held as their own layer (8,107 parameters), those
rows are exact at any rank of the rest, and the rest (their rows zeroed) costs a rank of 8 or
less: the head takes 68,329 parameters, and the budget freed goes to the layers before it
(bench/wide_head.py).

Only where the calibration data leaves no doubt which classes it reads: a sequence of class
scores (N, T, classes), the softmax of the layer or its logits (CTC), at least WIDE_CLASSES
classes, the ones some position predicts at most READ_SHARE of them, and the probability the
other classes hold at most UNREAD_MASS per position on average. A language model's next-token
distribution spreads far more than that and is left whole. The classes the calibration never
predicts keep what the rest's rank gives them: the plan says so.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from rankfold.analyze import as_input, model_outputs, run_checked, set_submodule, untouchable_layers
from rankfold.errors import RankfoldError
from rankfold.layers import ExactRows
from rankfold.output_metric import softmax_outputs
from rankfold.settings import calibration_batch

WIDE_CLASSES = 256
READ_SHARE = 1 / 8
UNREAD_MASS = 0.01


def read_rows(model: nn.Module, calib: Tensor) -> dict[str, list[int]]:
    """The wide output layers of an ONNX graph worth splitting, with the classes the calibration
    data predicts (sorted), by layer name."""
    if not hasattr(model, "steps"):  # torch modules are saved by their own code, which keeps their layers
        return {}
    calib = as_input(calib)
    untouchable = untouchable_layers(model)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in untouchable
             and m.out_features >= WIDE_CLASSES]
    heads = softmax_outputs(model, names, calib[:2]) if names else {}
    found = {}
    for name, (index, logits) in heads.items():
        tally = _class_tally(model, calib, index, logits)
        if tally is None:
            continue
        predicted, mass, frames = tally
        read = torch.nonzero(predicted).flatten()
        unread_mass = 1.0 - float(mass[read].sum()) / frames
        if len(read) <= READ_SHARE * predicted.numel() and unread_mass <= UNREAD_MASS:
            found[name] = [int(c) for c in read]
    return found


def _class_tally(model: nn.Module, calib: Tensor, index: int, logits: bool) -> tuple[Tensor, Tensor, int] | None:
    """Over every position of output `index` on the calibration data (a batch at a time): which
    classes some position predicts, each class's summed probability, and the positions; None
    unless the output is a sequence of class scores."""
    step = calibration_batch()
    predicted, mass, frames = None, None, 0
    with torch.no_grad():
        for start in range(0, calib.shape[0], step):
            y = model_outputs(run_checked(model, calib[start : start + step]))[index]
            if y.ndim < 3:
                return None
            p = (torch.softmax(y.double(), -1) if logits else y.double()).reshape(-1, y.shape[-1])
            if predicted is None:
                predicted = torch.zeros(p.shape[1], dtype=torch.bool)
                mass = torch.zeros(p.shape[1], dtype=torch.float64)
            predicted[p.argmax(-1)] = True
            mass += p.sum(0)
            frames += p.shape[0]
    return None if predicted is None else (predicted, mass, frames)


def with_exact_rows(model: nn.Module, rows: Mapping[str, list[int]]) -> nn.Module:
    """A copy of `model` with each named Linear held as ExactRows: its `rows` as a layer of their
    own, the others in a layer of the whole width with those rows zeroed (the same outputs)."""
    result = copy.deepcopy(model)
    modules = dict(result.named_modules())
    for name, read in rows.items():
        layer = modules.get(name)
        if not isinstance(layer, nn.Linear):
            raise RankfoldError(f"the plan does not match the model: no Linear {name!r} to split into exact rows")
        index = torch.tensor(read, dtype=torch.int64)
        if index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= layer.out_features:
            raise RankfoldError(f"exact_rows of {name!r} must be row indices below {layer.out_features}, got {read!r}")
        rest, exact = copy.deepcopy(layer), _rows_of(layer, index)
        with torch.no_grad():
            rest.weight[index] = 0.0
            if rest.bias is not None:
                rest.bias[index] = 0.0
        set_submodule(result, name, ExactRows(rest, exact, index))
    return result


def _rows_of(layer: nn.Linear, index: Tensor) -> nn.Linear:
    part = nn.Linear(layer.in_features, index.numel(), bias=layer.bias is not None)
    with torch.no_grad():
        part.weight.copy_(layer.weight[index])
        if layer.bias is not None:
            part.bias.copy_(layer.bias[index])
    return part
