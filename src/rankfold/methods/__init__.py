"""The one registry of factorization methods, one file per method.

A method is a handler (see base.Method): its name, its config type, how a config is built from
ranks, its planner loss estimate (or none: then the planner prices it by factorizing), whether
`auto` may pick it, and the factorization itself. Everything that names methods (the CLI,
target files, uniform and `auto` compression, the planner, plan files) asks this registry, so
adding a method is one new file that calls register(), and nothing else.
"""

from __future__ import annotations

from rankfold.config import AutoConfig, SkipConfig
from rankfold.errors import RankfoldError
from rankfold.methods.base import (  # noqa: F401 (the package's interface)
    Factorized,
    LossFn,
    Method,
    Rank,
    rank_for_keep,
    weighted_relative_error,
)
from rankfold.methods.cp import CPMethod
from rankfold.methods.spatial_svd import SpatialSVDMethod
from rankfold.methods.svd import SVDMethod
from rankfold.methods.tucker2 import Tucker2Method

# Not factorization methods, but names a layer config may take: "auto" picks the best registered
# method per layer, "none" leaves the layer alone.
SPECIAL_NAMES = ("auto", "none")
FALLBACK = "svd"  # a method that does not fit a layer's shape falls back to this one

_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method; its name must be new. Returns it (usable as a class decorator's result)."""
    if method.name in _REGISTRY or method.name in SPECIAL_NAMES:
        raise ValueError(f"a method named {method.name!r} is already registered")
    if any(m.config_type is method.config_type for m in _REGISTRY.values()):
        raise ValueError(f"{method.config_type.__name__} already belongs to another method")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def registered() -> tuple[Method, ...]:
    """Every method, in the order `auto` tries them."""
    return tuple(_REGISTRY.values())


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def method_named(name: str) -> Method:
    if name not in _REGISTRY:
        raise RankfoldError(f"unknown method {name!r}; choose one of: {', '.join([*_REGISTRY, *SPECIAL_NAMES])}")
    return _REGISTRY[name]


def method_for_config(config: object) -> Method | None:
    """The method a config belongs to (None for AutoConfig, SkipConfig or anything else)."""
    return next((m for m in _REGISTRY.values() if isinstance(config, m.config_type)), None)


def config_types() -> tuple[type, ...]:
    return tuple(m.config_type for m in _REGISTRY.values())


def config_for_method(name: str):
    """The default config of a method named as on the command line ("auto" and "none" too)."""
    if name == "auto":
        return AutoConfig()
    if name == "none":
        return SkipConfig()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join([*_REGISTRY, *SPECIAL_NAMES])}")
    return _REGISTRY[name].config_type()


for _builtin in (SVDMethod(), Tucker2Method(), SpatialSVDMethod(), CPMethod()):
    register(_builtin)
