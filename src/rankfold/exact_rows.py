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
import dataclasses
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from rankfold.analyze import set_submodule, untouchable_layers
from rankfold.errors import RankfoldError
from rankfold.layers import ExactRows
from rankfold.output_metric import ClassTally, head_pass

WIDE_CLASSES = 256
READ_SHARE = 1 / 8
UNREAD_MASS = 0.01


def wide_heads(model: nn.Module) -> list[str]:
    """The Linear layers of an ONNX graph wide enough to split (torch modules are saved by their
    own code, which keeps their layers)."""
    if not hasattr(model, "steps"):
        return []
    untouchable = untouchable_layers(model)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in untouchable
            and m.out_features >= WIDE_CLASSES]


def read_rows(model: nn.Module, tallies: Mapping[str, ClassTally]) -> dict[str, list[int]]:
    """The wide output layers worth splitting, with the classes the calibration data predicts
    (sorted), by layer name: from each softmax head's tally over the calibration data, which the
    planner's sensitivity pass gathers (LayerStats.class_tally), or calibration_rows in a pass of its own."""
    found: dict[str, list[int]] = {}
    for name in wide_heads(model) if tallies else []:
        tally = tallies.get(name)
        if tally is None or not tally.sequence:
            continue
        read = torch.nonzero(tally.predicted).flatten()
        unread_mass = 1.0 - float(tally.mass[read].sum()) / tally.positions
        if len(read) <= READ_SHARE * tally.predicted.numel() and unread_mass <= UNREAD_MASS:
            found[name] = [int(c) for c in read]
    return found


def calibration_rows(model: nn.Module, calib: Tensor) -> dict[str, list[int]]:
    """read_rows on `calib`, in a forward pass of its own."""
    names = wide_heads(model)
    return read_rows(model, head_pass(model, names, calib).class_tallies()) if names else {}


def split_stats(stats: Mapping, rows: Mapping[str, list[int]]) -> dict:
    """`stats` (LayerStats by name, measured on the model before with_exact_rows) with each split
    layer's replaced by its two parts' (what the same pass measures on the split model): both read
    its input; `read` outputs its rows, `rest` every row with those overwritten, so no change there
    reaches the output (no sensitivity). The head's softmax metric stays with neither."""
    out = dict(stats)
    for name, read in rows.items():
        whole = out.pop(name)
        index = torch.tensor(read, dtype=torch.int64)
        rest_sensitivity = whole.sensitivity.clone()
        rest_sensitivity[index] = 0.0
        base = dataclasses.replace(whole, output_metric=None, class_tally=None)
        out[f"{name}.rest"] = dataclasses.replace(base, name=f"{name}.rest", sensitivity=rest_sensitivity)
        out[f"{name}.read"] = dataclasses.replace(base, name=f"{name}.read", sensitivity=whole.sensitivity[index],
                                                  output_shape=(*whole.output_shape[:-1], len(read)))
    return out


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
