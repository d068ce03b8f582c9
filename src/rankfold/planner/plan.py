"""The plan: one (method, ranks, bits) choice per layer with its estimated costs, as an editable
JSON file checked field by field when read back, and how a plan is applied to a model."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

from torch import Tensor, nn

from rankfold.analyze import COMPRESSIBLE, TABLES
from rankfold.apply import compress_with_report
from rankfold.config import MethodConfig, SkipConfig
from rankfold.errors import RankfoldError
from rankfold.exact_rows import with_exact_rows
from rankfold.io import write_json_atomic
from rankfold.layers import layer_spec
from rankfold.methods import method_named, method_names
from rankfold.selfcheck import split_holdout
from rankfold.target import RUNTIMES

PLAN_FORMAT = "rankfold-plan/1"
# One weight scale per output channel, one per tensor, or (int4) one per group of N consecutive
# input elements of each channel: "group32".
WEIGHT_SCALES = ("channel", "tensor", "groupN")
Progress = Callable[[str], None]


@dataclass
class LayerPlan:
    name: str
    layer: str  # e.g. "Conv 3x3 64->128"
    method: str  # "none" when left alone
    ranks: list[int] = field(default_factory=list)
    est_loss: float = 0.0  # estimated KL divergence (nats) this layer's approximation adds
    params: int = 0
    weight_bytes: int = 0
    macs: int = 0
    latency_ms: float = 0.0
    ram_bytes: int = 0  # activation memory in use while this layer runs
    note: str = ""
    bits: int = 32  # weight bit-width: 32 (float), 8 or 4
    weight_scales: str = "channel"  # below 32 bits: one scale per output "channel", per "tensor", or "group32"


@dataclass
class Plan:
    """One choice per compressible layer, with estimated costs before and after."""

    target: str
    weight_bits: int
    activation_bits: int
    data_aware: bool
    latency_source: str  # "onnxruntime (measured)" or "model (cycles per MAC)"
    limits: dict[str, float]  # absolute limits the plan was solved for
    before: dict[str, float]
    after: dict[str, float]
    est_loss: float
    feasible: bool
    layers: list[LayerPlan]
    messages: list[str] = field(default_factory=list)
    reduce_range: bool = False  # int8 weights on 7 bits (the target's onnxruntime needs it)
    runtime: str = "onnxruntime"  # what runs the result: "onnxruntime" or "c"
    # Calibration samples (the last ones) the plan was made without, for the self-check: applying
    # it holds back as many, so plan -> apply gives the same weights through the CLI and the API.
    # None: a plan file from before this was recorded.
    held_back: int | None = None
    # Wide output layers held as ExactRows (rankfold.exact_rows): the rows kept as a layer of their
    # own, by layer name; applying the plan splits them the same way first.
    exact_rows: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, **asdict(self)}

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_dict())

    def layer_bits(self) -> dict[str, int]:
        return {layer.name: layer.bits for layer in self.layers}

    def per_tensor_layers(self) -> list[str]:
        """The quantized layers whose weights have one scale per tensor (factors: one each)."""
        return [layer.name for layer in self.layers if layer.bits < 32 and layer.weight_scales == "tensor"]

    def grouped_layers(self) -> dict[str, int]:
        """The quantized layers whose weights have one scale per group, with the group's size."""
        return {layer.name: scale_group(layer.weight_scales) for layer in self.layers
                if layer.bits < 32 and scale_group(layer.weight_scales)}

    @property
    def quantized(self) -> bool:
        return any(layer.bits < 32 for layer in self.layers)

    def layer_configs(self) -> dict[str, MethodConfig]:
        configs: dict[str, MethodConfig] = {}
        for layer in self.layers:
            if layer.method == "none":
                configs[layer.name] = SkipConfig(layer.note or "left alone by the plan")
            else:
                configs[layer.name] = method_named(layer.method).config(layer.ranks)
        return configs


def load_plan(path: str | os.PathLike) -> Plan:
    """Read a plan file written by rankfold (and perhaps edited by hand), checking every field."""
    path = os.fspath(path)
    try:
        with open(path) as handle:
            raw = json.load(handle)
    except OSError as exc:
        raise RankfoldError(f"{path}: cannot read the plan: {exc.strerror}") from None
    except ValueError as exc:
        raise RankfoldError(f"{path}: not a JSON plan: {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") != PLAN_FORMAT:
        raise RankfoldError(f"{path}: not a rankfold plan (expected \"format\": \"{PLAN_FORMAT}\")")
    try:
        if not isinstance(raw["layers"], list) or not all(isinstance(e, dict) for e in raw["layers"]):
            raise TypeError("layers must be a list of objects")
        layers = [LayerPlan(**entry) for entry in raw["layers"]]
        fields = {k: raw[k] for k in Plan.__dataclass_fields__ if k != "layers" and k in raw}
        plan = Plan(**fields, layers=layers)
    except (KeyError, TypeError) as exc:
        raise RankfoldError(f"{path}: malformed plan: {exc}") from None
    problem = plan_problem(plan)
    if problem:
        raise RankfoldError(f"{path}: {problem}")
    return plan


def scales_name(per_tensor: bool, group_size: int | None) -> str:
    """A layer's weight_scales value: "tensor", "group<N>" or "channel"."""
    return "tensor" if per_tensor else f"group{group_size}" if group_size else "channel"


def scale_group(weight_scales: str) -> int | None:
    """The group size a weight_scales value names ("group32" -> 32); None for channel and tensor."""
    match = re.fullmatch(r"group([1-9][0-9]*)", weight_scales)
    return int(match.group(1)) if match else None


# The type each field of a plan file must have (JSON numbers: int, or int and float).
_NUMBER = (int, float)
_PLAN_TYPES = {"target": str, "weight_bits": int, "activation_bits": int, "data_aware": bool,
               "latency_source": str, "limits": dict, "before": dict, "after": dict, "est_loss": _NUMBER,
               "feasible": bool, "messages": list, "reduce_range": bool, "runtime": str,
               "exact_rows": dict}
_LAYER_TYPES = {"name": str, "layer": str, "method": str, "ranks": list, "est_loss": _NUMBER, "params": int,
                "weight_bytes": int, "macs": int, "latency_ms": _NUMBER, "ram_bytes": int, "note": str, "bits": int,
                "weight_scales": str}


_TYPE_WORDS = {str: "a string", int: "an integer", bool: "true or false", dict: "an object", list: "a list",
               _NUMBER: "a number"}


def _type_problem(where: str, obj, types: Mapping[str, type | tuple]) -> str | None:
    for name, expected in types.items():
        value = getattr(obj, name)
        # JSON true/false are Python bools, which are ints too: a count or a number is never a bool.
        wrong = not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool)
        if wrong:
            return f"{where}{name} must be {_TYPE_WORDS[expected]}, got {value!r}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"{where}{name} must be finite, got {value!r}"
    return None


def plan_problem(plan: Plan) -> str | None:
    """What is wrong with a plan's fields (a hand-edited file), in one line; None when nothing is."""
    problem = _type_problem("", plan, _PLAN_TYPES)
    if problem:
        return problem
    if plan.runtime not in RUNTIMES:
        return f"runtime must be one of {', '.join(RUNTIMES)}, got {plan.runtime!r}"
    for name, rows in plan.exact_rows.items():
        if not isinstance(rows, list) or not rows or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0
                                                             for r in rows):
            return f"exact_rows of {name!r} must be a list of row indices (integers >= 0), got {rows!r}"
    if plan.held_back is not None and (isinstance(plan.held_back, bool) or not isinstance(plan.held_back, int)
                                       or plan.held_back < 0):
        return f"held_back must be a count of samples (an integer >= 0), got {plan.held_back!r}"
    for key, value in plan.limits.items():
        if isinstance(value, bool) or not isinstance(value, _NUMBER) or not math.isfinite(value) or value <= 0:
            return f"limit {key!r} must be a positive number, got {value!r}"
    seen: set[str] = set()
    for layer in plan.layers:
        where = f"layer {getattr(layer, 'name', '?')!r}: "
        problem = _type_problem(where, layer, _LAYER_TYPES)
        if problem:
            return problem
        if layer.name in seen:
            return f"{where}listed twice (each layer once)"
        seen.add(layer.name)
        if layer.bits not in (32, 8, 4):
            return f"{where}bits must be 32, 8 or 4, got {layer.bits!r}"
        if layer.weight_scales not in WEIGHT_SCALES[:2] and scale_group(layer.weight_scales) is None:
            return f"{where}weight_scales must be one of {', '.join(WEIGHT_SCALES)}, got {layer.weight_scales!r}"
        if scale_group(layer.weight_scales) and layer.bits != 4:
            return f"{where}weight_scales {layer.weight_scales} (groups) needs bits 4, got {layer.bits!r}"
        if layer.method == "none":
            if layer.ranks:
                return f"{where}method none takes no ranks, got {layer.ranks!r}"
            continue
        if layer.method not in method_names():
            return f"{where}unknown method {layer.method!r} (choose from none, {', '.join(method_names())})"
        count = method_named(layer.method).rank_count
        if len(layer.ranks) != count or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1
                                                for r in layer.ranks):
            return (f"{where}{layer.method} takes {count} positive integer rank{'s' if count > 1 else ''}, "
                    f"got {layer.ranks!r}")
    return None


def escape_pattern(name: str) -> str:
    """An fnmatch pattern that matches exactly `name`."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def check_plan_matches(plan: Plan, model: nn.Module) -> None:
    """Every planned layer must exist in `model` with the shape the plan was made for."""
    modules = dict(model.named_modules())
    for layer in plan.layers:
        module = modules.get(layer.name)
        if module is None or not isinstance(module, COMPRESSIBLE + TABLES):
            raise RankfoldError(f"the plan does not match the model: no layer {layer.name!r} to compress")
        found = layer_spec(module).describe()
        if found != layer.layer:
            raise RankfoldError(f"the plan does not match the model: layer {layer.name!r} is {found}, "
                                f"the plan was made for {layer.layer}")


def apply_plan(model: nn.Module, plan: Plan, *, calib: Tensor | None = None, progress: Progress | None = None):
    """The compressed copy of `model` that `plan` describes, and its CompressionReport.
    Deterministic: the same model, plan and calibration data give the same weights."""
    if plan.exact_rows:
        model = with_exact_rows(model, plan.exact_rows)
    check_plan_matches(plan, model)
    if plan.data_aware and calib is None:
        raise RankfoldError("this plan was made with calibration data: give the same calibration data to apply it")
    layers = {escape_pattern(n): cfg for n, cfg in plan.layer_configs().items()}
    layers["*"] = SkipConfig("not in the plan")
    return compress_with_report(model, calib=fitting_samples(plan, calib), layers=layers, min_rank=1,
                                progress=progress)


def fitting_samples(plan: Plan, calib: Tensor | None) -> Tensor | None:
    """The calibration samples a plan is applied with: all but the `held_back` last ones, which
    its planning never saw (checked: the same data must hold back as many)."""
    if calib is None or not plan.held_back:
        return calib
    _fit, held = split_holdout(calib)
    if held is None or len(held) != plan.held_back:
        raise RankfoldError(f"this plan was made holding back the last {plan.held_back} calibration samples for "
                            f"its self-check; {len(calib)} samples here would hold back "
                            f"{0 if held is None else len(held)}: give the calibration data it was made with")
    return calib[: len(calib) - plan.held_back]
