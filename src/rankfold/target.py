"""Hardware target profiles (TOML files) and budget values such as "10%", "2MB", "1.5ms"."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources

from rankfold.errors import RankfoldError

LATENCY_MODES = ("measured", "model")
RUNTIMES = ("onnxruntime", "c")  # what runs the result: the QDQ file itself, or the C export
SUB_LAYER_KINDS = ("conv", "pointwise", "depthwise", "linear")


@dataclass(frozen=True)
class Target:
    """What a target offers and costs. See src/rankfold/targets/*.toml for the file format."""

    name: str
    description: str = ""
    flash_bytes: int | None = None  # weights must fit (None: unlimited)
    ram_bytes: int | None = None  # peak live activations must fit
    clock_hz: float | None = None
    weight_bits: tuple[int, ...] = (32,)
    activation_bits: int = 32
    rank_multiple: int = 1
    methods: tuple[str, ...] = ("svd", "tucker2", "spatial-svd")
    latency: str = "measured"
    layer_overhead_cycles: float = 0.0
    cycles_per_element: float = 0.0
    cycles_per_output: float = 0.0  # per output value of a layer: its requantization and store
    cycles_per_mac: dict[str, float] = field(default_factory=dict)
    runtime: str = "onnxruntime"
    reduce_range: bool = False  # int8 weights on 7 bits (TOML: true, false or "auto": what this CPU needs)
    # int4 weights may also take one scale per this many consecutive input elements of each output
    # channel (DequantizeLinear's block_size; onnxruntime targets): None offers per-channel int4 only.
    weight_group_size: int | None = None
    int8_note: str = ""  # what "auto" found (not a TOML field)

    @property
    def default_weight_bits(self) -> int:
        return self.weight_bits[0]

    @property
    def activation_bytes(self) -> float:
        return self.activation_bits / 8


def builtin_targets() -> list[str]:
    """Names of the profiles shipped with rankfold."""
    folder = resources.files("rankfold") / "targets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_target(name_or_path: str) -> Target:
    """A built-in profile by name (e.g. "cortex-m7"), or a profile file path."""
    if os.path.sep in name_or_path or name_or_path.endswith(".toml"):
        if not os.path.isfile(name_or_path):
            raise RankfoldError(f"{name_or_path}: no such target file")
        with open(name_or_path, "rb") as handle:
            text, origin = handle.read().decode("utf-8", errors="replace"), name_or_path
    elif name_or_path in builtin_targets():
        text = (resources.files("rankfold") / "targets" / f"{name_or_path}.toml").read_text()
        origin = name_or_path
    else:
        raise RankfoldError(f"unknown target {name_or_path!r}; built-in: {', '.join(builtin_targets())}, "
                            "or give a .toml file")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RankfoldError(f"{origin}: not valid TOML: {exc}") from None
    return target_from_dict(raw, origin)


def offers_groups(runtime: str, weight_bits) -> bool:
    """Whether int4 groups can run: DequantizeLinear's blocks in onnxruntime, on int4 weights."""
    return runtime == "onnxruntime" and 4 in weight_bits


def with_group_size(target: Target, size: int | None, origin: str = "--group-size") -> Target:
    """`target` offering int4 weights with one scale per `size` input elements (None: unchanged)."""
    if size is None:
        return target
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise RankfoldError(f"{origin} must be a positive integer (input elements per int4 scale), got {size!r}")
    if not offers_groups(target.runtime, target.weight_bits):
        raise RankfoldError(f"{origin}: target {target.name} has no grouped int4 (it needs int4 weights and runtime "
                            f"onnxruntime; it has weight bits {list(target.weight_bits)}, runtime {target.runtime})")
    return dataclasses.replace(target, weight_group_size=size)


def target_from_dict(raw: dict, origin: str = "target") -> Target:
    """Validate a parsed profile; every problem is reported with the field's name."""
    from rankfold.methods import method_names  # lazily: `rankfold targets` needs no torch

    known = set(Target.__dataclass_fields__) - {"int8_note"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise RankfoldError(f"{origin}: unknown field(s) {', '.join(unknown)}")
    if not isinstance(raw.get("name"), str) or not raw["name"]:
        raise RankfoldError(f"{origin}: 'name' (a string) is required")

    def positive(key: str, *, integer: bool = False) -> None:
        value = raw.get(key)
        if value is None:
            return
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or value <= 0:
            raise RankfoldError(f"{origin}: {key} must be a positive {'integer' if integer else 'number'}, "
                                f"got {value!r}")

    for key in ("flash_bytes", "ram_bytes", "rank_multiple", "activation_bits", "weight_group_size"):
        positive(key, integer=True)
    positive("clock_hz")
    bits = raw.get("weight_bits", [32])
    if not isinstance(bits, list) or not bits or any(isinstance(b, bool) or b not in (4, 8, 32) for b in bits):
        raise RankfoldError(f"{origin}: weight_bits must be a non-empty list of 4, 8 and 32 (float); got {bits!r}")
    methods = raw.get("methods", list(Target.methods))
    if not isinstance(methods, list) or not methods:
        raise RankfoldError(f"{origin}: methods must be a non-empty list such as [\"svd\", \"tucker2\"]; "
                            f"got {methods!r}")
    bad = [m for m in methods if not isinstance(m, str) or m not in method_names()]
    if bad:
        raise RankfoldError(f"{origin}: methods must list factorization methods ({', '.join(method_names())}); "
                            f"bad: {bad or methods!r}")
    latency = raw.get("latency", "measured")
    if latency not in LATENCY_MODES:
        raise RankfoldError(f"{origin}: latency must be one of {LATENCY_MODES}, got {latency!r}")
    cpm = raw.get("cycles_per_mac", {})
    if not isinstance(cpm, dict):
        raise RankfoldError(f"{origin}: cycles_per_mac must be a table ([cycles_per_mac] with "
                            f"{', '.join(SUB_LAYER_KINDS)}), got {cpm!r}")
    if latency == "model":
        if not raw.get("clock_hz"):
            raise RankfoldError(f"{origin}: latency = \"model\" needs clock_hz")
        missing = [k for k in SUB_LAYER_KINDS if isinstance(cpm.get(k), bool)
                   or not isinstance(cpm.get(k), (int, float)) or not math.isfinite(cpm[k]) or cpm[k] <= 0]
        if missing:
            raise RankfoldError(f"{origin}: [cycles_per_mac] needs positive values for {', '.join(missing)}")
    for key in ("layer_overhead_cycles", "cycles_per_element", "cycles_per_output"):
        value = raw.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise RankfoldError(f"{origin}: {key} must be a number >= 0, got {value!r}")
    runtime = raw.get("runtime", "onnxruntime")
    if runtime not in RUNTIMES:
        raise RankfoldError(f"{origin}: runtime must be one of {RUNTIMES}, got {runtime!r}")
    if raw.get("weight_group_size") is not None and not offers_groups(runtime, bits):
        raise RankfoldError(f"{origin}: weight_group_size needs int4 weights (weight_bits with 4) and runtime "
                            f"\"onnxruntime\" (DequantizeLinear's blocks); got weight_bits {raw.get('weight_bits')!r}, "
                            f"runtime {runtime!r}")
    reduce_range, note = raw.get("reduce_range", False), ""
    if reduce_range == "auto":
        from rankfold.runtime import int8_kernels

        kernels = int8_kernels()
        reduce_range, note = kernels.reduce_range, kernels.describe()
    elif not isinstance(reduce_range, bool):
        raise RankfoldError(f"{origin}: reduce_range must be true, false or \"auto\", got {reduce_range!r}")
    return Target(**{**raw, "weight_bits": tuple(bits), "methods": tuple(methods), "cycles_per_mac": dict(cpm),
                     "runtime": runtime, "reduce_range": reduce_range, "int8_note": note})


# -- budget values -------------------------------------------------------------------------
BUDGET_UNITS: dict[str, dict[str, float]] = {
    "count": {"": 1, "k": 1e3, "m": 1e6, "g": 1e9},
    "bytes": {"": 1, "b": 1, "kb": 1024, "kib": 1024, "mb": 1024**2, "mib": 1024**2, "gb": 1024**3, "gib": 1024**3},
    "ms": {"": 1, "ms": 1, "us": 1e-3, "s": 1e3},
}
BUDGET_KINDS = {"params": "count", "macs": "count", "weight_bytes": "bytes", "ram_bytes": "bytes",
                "latency_ms": "ms"}


@dataclass(frozen=True)
class Budget:
    """An upper bound on one quantity: absolute, or a fraction of the original network's value."""

    quantity: str  # a key of BUDGET_KINDS
    value: float
    relative: bool = False

    def limit(self, original: float) -> float:
        return self.value * original if self.relative else self.value

    def describe(self) -> str:
        return f"{self.value:.4g} of the original" if self.relative else f"{self.value:,.6g}"


def parse_budget(quantity: str, text: str | float) -> Budget:
    """"15%" -> 0.15 of the original; "300k", "2MB", "512KB", "1.5ms" -> absolute (KB = 1024 B)."""
    if quantity not in BUDGET_KINDS:
        raise RankfoldError(f"unknown budget {quantity!r}; choose from {', '.join(BUDGET_KINDS)}")
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str):
        raise RankfoldError(f"max_{quantity}: expected a number or a string such as '10%', got {text!r}")
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z%]*)\s*", text)
    units = BUDGET_UNITS[BUDGET_KINDS[quantity]]
    if not match:
        raise RankfoldError(f"max_{quantity}: cannot read {text!r} (examples: 10%, 300k, 2MB, 1.5ms)")
    number, unit = float(match.group(1)), match.group(2).lower()
    if number <= 0 or not math.isfinite(number):  # 1e309 reads as infinity: no budget at all
        raise RankfoldError(f"max_{quantity}: must be a positive finite number, got {text!r}")
    if unit == "%":
        return Budget(quantity, number / 100, relative=True)
    if unit not in units:
        raise RankfoldError(f"max_{quantity}: unknown unit {match.group(2)!r} in {text!r}; "
                            f"use % or one of {', '.join(u for u in units if u)}")
    return Budget(quantity, number * units[unit])
