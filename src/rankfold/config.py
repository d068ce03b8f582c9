"""Per-layer method configs: frozen dataclasses, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass


def check_keep(keep: float | None, name: str = "keep") -> None:
    """`keep` is a fraction of a layer's parameters in (0, 1], or None (use the global one)."""
    if keep is None:
        return
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < float(keep) <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1], got {keep!r}")


VBMF = "vbmf"  # in place of a rank: estimate it from the weight alone (decompose/vbmf.py)


def _check_positive_int(value: int | None, name: str, *, vbmf: bool = False) -> None:
    if value is None or (vbmf and value == VBMF):
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class SVDConfig:
    """Truncated SVD: a narrow layer (keeps the kernel) then a 1x1 / Linear.

    Give `rank` (or "vbmf"), or `keep` (fraction of the layer's parameters), or neither (compress's keep).
    """

    rank: int | str | None = None
    keep: float | None = None

    def __post_init__(self) -> None:
        _check_positive_int(self.rank, "SVDConfig.rank", vbmf=True)
        check_keep(self.keep, "SVDConfig.keep")


@dataclass(frozen=True)
class Tucker2Config:
    """Tucker-2: 1x1 (I -> r_in), KxK core (r_in -> r_out), 1x1 (r_out -> O).

    `ranks` is (r_in, r_out) or "vbmf" (each estimated from the weight's unfolding); `als_iters`
    HOOI sweeps refine the HOSVD start.
    """

    ranks: tuple[int, int] | str | None = None
    keep: float | None = None
    als_iters: int = 2

    def __post_init__(self) -> None:
        if self.ranks is not None and self.ranks != VBMF:
            if not (isinstance(self.ranks, (tuple, list)) and len(self.ranks) == 2):
                raise ValueError(f"Tucker2Config.ranks must be a pair (r_in, r_out), got {self.ranks!r}")
            for r in self.ranks:
                _check_positive_int(r, "Tucker2Config.ranks[i]")
            object.__setattr__(self, "ranks", tuple(self.ranks))
        check_keep(self.keep, "Tucker2Config.keep")
        if isinstance(self.als_iters, bool) or not isinstance(self.als_iters, int) or self.als_iters < 0:
            raise ValueError(f"Tucker2Config.als_iters must be an int >= 0, got {self.als_iters!r}")


@dataclass(frozen=True)
class CPConfig:
    """CP: 1x1 (I -> R), depthwise Kx1, depthwise 1xK, 1x1 (R -> O); ALS bounded by `max_iters`."""

    rank: int | None = None
    keep: float | None = None
    max_iters: int = 30

    def __post_init__(self) -> None:
        _check_positive_int(self.rank, "CPConfig.rank")
        check_keep(self.keep, "CPConfig.keep")
        _check_positive_int(self.max_iters, "CPConfig.max_iters")


@dataclass(frozen=True)
class SpatialSVDConfig:
    """Spatial SVD: Kx1 convolution (I -> r) then 1xK (r -> O); `rank` may be "vbmf"."""

    rank: int | str | None = None
    keep: float | None = None

    def __post_init__(self) -> None:
        _check_positive_int(self.rank, "SpatialSVDConfig.rank", vbmf=True)
        check_keep(self.keep, "SpatialSVDConfig.keep")


@dataclass(frozen=True)
class AutoConfig:
    """Try every method that fits the layer's shape at `keep`; keep the lowest (weighted) error."""

    keep: float | None = None

    def __post_init__(self) -> None:
        check_keep(self.keep, "AutoConfig.keep")


@dataclass(frozen=True)
class SkipConfig:
    """Leave the layer as it is; `reason` goes into the report."""

    reason: str = "left alone by the user's layer config"


MethodConfig = SVDConfig | Tucker2Config | CPConfig | SpatialSVDConfig | AutoConfig | SkipConfig
