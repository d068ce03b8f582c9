"""What rankfold needs to know about a layer, and how to build the convolutions that replace it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

CONV_CLASSES: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d}


@dataclass(frozen=True)
class LayerSpec:
    """Shape facts of a Linear / Conv1d / Conv2d layer, or of an Embedding table (one "output
    channel" per row: each row has its own weight scale)."""

    kind: str  # "linear", "conv1d", "conv2d" or "embedding"
    out_ch: int
    in_ch: int
    kernel: tuple[int, ...]  # () for Linear
    groups: int = 1
    bias: bool = True

    @property
    def spatial(self) -> int:
        return int(torch.Size(self.kernel).numel())

    @property
    def weight_params(self) -> int:
        return self.out_ch * (self.in_ch // self.groups) * self.spatial

    @property
    def params(self) -> int:
        return self.weight_params + (self.out_ch if self.bias else 0)

    @property
    def has_spatial_kernel(self) -> bool:
        return self.spatial > 1

    def describe(self) -> str:
        if self.kind == "linear":
            return f"Linear {self.in_ch}->{self.out_ch}"
        if self.kind == "embedding":
            return f"Embedding {self.out_ch}x{self.in_ch}"
        kernel = "x".join(map(str, self.kernel))
        groups = f" g{self.groups}" if self.groups > 1 else ""
        return f"Conv {kernel} {self.in_ch}->{self.out_ch}{groups}"


def layer_spec(module: nn.Module) -> LayerSpec:
    """The LayerSpec of a Linear, Conv1d, Conv2d or Embedding module."""
    if isinstance(module, nn.Embedding):
        return LayerSpec("embedding", module.num_embeddings, module.embedding_dim, (), 1, False)
    if isinstance(module, nn.Linear):
        return LayerSpec("linear", module.out_features, module.in_features, (), 1, module.bias is not None)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        kind = "conv1d" if isinstance(module, nn.Conv1d) else "conv2d"
        return LayerSpec(
            kind, module.out_channels, module.in_channels, tuple(module.kernel_size), module.groups,
            module.bias is not None,
        )
    raise TypeError(f"expected nn.Linear, nn.Conv1d or nn.Conv2d, got {type(module).__name__}")


def numeric_padding(conv: nn.Module) -> tuple[int, ...] | None:
    """The convolution's padding as numbers per axis; None when 'same' cannot be split evenly."""
    padding = conv.padding
    if padding == "valid":
        return (0,) * len(conv.kernel_size)
    if padding == "same":
        pads = []
        for k, d in zip(conv.kernel_size, conv.dilation):
            total = d * (k - 1)
            if total % 2:
                return None
            pads.append(total // 2)
        return tuple(pads)
    return tuple(padding)


def pointwise(conv: nn.Module | None, in_ch: int, out_ch: int, *, bias: bool, ndim: int) -> nn.Module:
    """A 1x1 convolution (or Linear when `conv` is None) from in_ch to out_ch."""
    if conv is None:
        return nn.Linear(in_ch, out_ch, bias=bias)
    return CONV_CLASSES[ndim](in_ch, out_ch, kernel_size=1, bias=bias)


def conv_like(
    conv: nn.Module,
    in_ch: int,
    out_ch: int,
    *,
    kernel: tuple[int, ...],
    axes: tuple[int, ...] | None = None,
    groups: int = 1,
    bias: bool = False,
) -> nn.Module:
    """A convolution with `conv`'s stride/padding/dilation/padding mode on `axes` (all by default)
    and the identity geometry (stride 1, no padding) on the other axes."""
    ndim = len(conv.kernel_size)
    axes = tuple(range(ndim)) if axes is None else axes
    pads = numeric_padding(conv)

    def pick(values: tuple[int, ...], neutral: int) -> tuple[int, ...]:
        return tuple(values[a] if a in axes else neutral for a in range(ndim))

    return CONV_CLASSES[ndim](
        in_ch,
        out_ch,
        kernel_size=kernel,
        stride=pick(tuple(conv.stride), 1),
        padding=pick(pads, 0),
        dilation=pick(tuple(conv.dilation), 1),
        groups=groups,
        bias=bias,
        padding_mode=conv.padding_mode,
    )


class LowRank(nn.Sequential):
    """The layers that replace one factorized layer; `method` and `ranks` say how it was made."""

    def __init__(self, *layers: nn.Module, method: str, ranks: tuple[int, ...]) -> None:
        super().__init__(*layers)
        self.method = method
        self.ranks = ranks

    def extra_repr(self) -> str:
        return f"method={self.method}, ranks={self.ranks}"


class ColumnBlocks(nn.Module):
    """One matrix whose output columns its readers take apart (a packed q, k, v projection read as
    q, k and v), held as one layer per block: each is planned, factorized and quantized on its own,
    and their outputs are joined again as the matrix's was. Every block reads the same input."""

    def __init__(self, *blocks: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        return torch.cat([block(x) for block in self.blocks], dim=-1)


class ExactRows(nn.Module):
    """A wide output layer (a recogniser's 6,625 characters) whose `rows`, the classes the data
    reads, come from a layer of their own, `read`, and whose other rows come from `rest` (which
    computes every row, its `rows` zeroed): each is planned, factorized and quantized on its own."""

    def __init__(self, rest: nn.Module, read: nn.Module, rows: torch.Tensor) -> None:
        super().__init__()
        self.rest, self.read = rest, read
        self.register_buffer("rows", rows.to(torch.int64))

    def forward(self, x):
        return self.rest(x).index_copy(-1, self.rows, self.read(x))
