"""ONNX's signal operators (opset 17): STFT, DFT, the Hann, Hamming and Blackman windows and
MelWeightMatrix, as audio models hold them at their front (torch.onnx writes `torch.stft` as one
STFT node; a log-mel front-end adds a MelWeightMatrix MatMul).

The transforms are computed as products with cosine and sine matrices of the transform's length
(real arithmetic, differentiable for the planner's gradients), not with torch.fft, whose complex
tensors the TorchScript exporter cannot write. A written result holds the STFT and DFT nodes
again (an autograd Function's symbolic, used only while the exporter traces): its matrices would
read as weights, and onnxruntime's FFT is faster. Registered into onnx_ops' OPS table."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from rankfold.frontends.onnx_ops import DTYPES, _axis, ints, op


def _constant(v) -> int:
    """An integer input (a length, a step, an axis) as a Python int, also while the exporter traces
    (a traced value there would not be a constant the written node can take)."""
    return int(ints(v)[0])


def _scalar(v) -> float:
    return float(v.reshape(-1)[0]) if isinstance(v, Tensor) else float(ints(v)[0])


def _fourier(length: int, bins: int, inverse: bool, like: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin of 2 pi t k / length for samples t < length and frequencies k < bins, (length, bins)."""
    t = torch.arange(length, dtype=torch.float64).reshape(-1, 1)
    k = torch.arange(bins, dtype=torch.float64).reshape(1, -1)
    angle = 2 * math.pi * torch.remainder(t * k, length) / length  # exact integer products, reduced
    sign = 1.0 if inverse else -1.0
    return torch.cos(angle).to(like.dtype), (sign * torch.sin(angle)).to(like.dtype)


def _transform(x: Tensor, length: int, onesided: bool, inverse: bool) -> Tensor:
    """The DFT of `x` (..., samples, 1 or 2: real, or real and imaginary) over its samples, at
    `length` (zero-padded or cut): (..., bins, 2); the inverse divides by the length."""
    samples = x.shape[-2]
    if samples < length:
        x = F.pad(x, (0, 0, 0, length - samples))
    elif samples > length:
        x = x[..., :length, :]
    bins = length // 2 + 1 if onesided else length
    cos, sin = _fourier(length, bins, inverse, x)
    real = x[..., 0]
    # (a + ib)(cos + i sin) = (a cos - b sin) + i (a sin + b cos), sin carrying the direction's sign
    out_real, out_imag = real @ cos, real @ sin
    if x.shape[-1] == 2:
        imag = x[..., 1]
        out_real, out_imag = out_real - imag @ sin, out_imag + imag @ cos
    out = torch.stack([out_real, out_imag], dim=-1)
    return out / length if inverse else out


class _DftNode(torch.autograd.Function):
    """_transform, written by the exporter as one DFT node (axis -2 of the moved input)."""

    @staticmethod
    def forward(ctx, x: Tensor, length: int, onesided: bool, inverse: bool) -> Tensor:
        return _transform(x, length, onesided, inverse)

    @staticmethod
    def symbolic(g, x, length: int, onesided: bool, inverse: bool):
        size = g.op("Constant", value_t=torch.tensor(length, dtype=torch.int64))
        flags = {"inverse_i": int(inverse), "onesided_i": int(onesided)}
        if g.opset >= 20:
            axis = g.op("Constant", value_t=torch.tensor(-2, dtype=torch.int64))
            return g.op("DFT", x, size, axis, **flags)
        rank = x.type().dim()
        return g.op("DFT", x, size, axis_i=rank - 2, **flags)


class _StftNode(torch.autograd.Function):
    """_frames_transformed, written by the exporter as one STFT node."""

    @staticmethod
    def forward(ctx, x: Tensor, window: Tensor, step: int, length: int, onesided: bool) -> Tensor:
        return _frames_transformed(x, window, step, length, onesided)

    @staticmethod
    def symbolic(g, x, window, step: int, length: int, onesided: bool):
        as_input = lambda v: g.op("Constant", value_t=torch.tensor(v, dtype=torch.int64))  # noqa: E731
        return g.op("STFT", x, as_input(step), window, as_input(length), onesided_i=int(onesided))


@op("DFT")
def _dft(vals, attrs):
    """DFT-17 (axis an attribute, default 1) and DFT-20 (axis an input, default -2); forward or
    inverse, full or onesided (the inverse of a onesided spectrum is refused)."""
    x = vals[0]
    length = _constant(vals[1]) if len(vals) > 1 and vals[1] is not None else None
    if attrs.get("_opset", 20) >= 20:
        axis = _constant(vals[2]) if len(vals) > 2 and vals[2] is not None else -2
    else:
        axis = attrs.get("axis", 1)
    axis = _axis(axis, x.ndim)
    if axis == x.ndim - 1:
        raise ValueError("its axis is the last one (real and imaginary parts), not a signal axis")
    inverse, onesided = bool(attrs.get("inverse", 0)), bool(attrs.get("onesided", 0))
    if inverse and onesided:
        raise ValueError("an inverse of a onesided spectrum (irfft)")
    signal_axis = x.ndim - 2  # where the transform runs; positive, as the exporter's Transpose needs
    moved = x.movedim(axis, signal_axis) if axis != signal_axis else x
    length = int(length or moved.shape[-2])
    out = _DftNode.apply(moved, length, onesided, inverse) if torch.jit.is_tracing() else \
        _transform(moved, length, onesided, inverse)
    return [out.movedim(signal_axis, axis) if axis != signal_axis else out]


def _frames_transformed(x: Tensor, window: Tensor, step: int, length: int, onesided: bool) -> Tensor:
    frames = x.unfold(1, length, step).transpose(-1, -2)  # (batch, frames, length, 1 or 2)
    return _transform(frames * window.to(x.dtype).reshape(-1, 1), length, onesided, inverse=False)


@op("STFT")
def _stft(vals, attrs):
    """Frames of `frame_length` samples every `frame_step` (no padding: 1 + (L - length) // step
    frames), each weighted by the window (or none) and transformed: (batch, frames, bins, 2)."""
    x, step = vals[0], _constant(vals[1])
    window = vals[2] if len(vals) > 2 else None
    length = _constant(vals[3]) if len(vals) > 3 and vals[3] is not None else None
    length = length or (int(window.shape[0]) if window is not None else int(x.shape[-2]))
    window = window if window is not None else torch.ones(length, dtype=x.dtype)
    onesided = bool(attrs.get("onesided", 1))
    if torch.jit.is_tracing():
        return [_StftNode.apply(x, window, step, length, onesided)]
    return [_frames_transformed(x, window, step, length, onesided)]


def _window(terms: tuple[float, ...]):
    """A cosine-sum window sum_j (-1)^j a_j cos(2 pi j n / N), N the size (periodic) or size - 1."""
    def compute(vals, attrs):
        size = _constant(vals[0])
        span = size if attrs.get("periodic", 1) else size - 1
        n = torch.arange(size, dtype=torch.float64)
        out = sum((-1) ** j * a * torch.cos(2 * math.pi * j * n / span) for j, a in enumerate(terms))
        return [out.to(DTYPES[attrs.get("output_datatype", 1)])]
    return compute


op("HannWindow")(_window((0.5, 0.5)))
op("HammingWindow")(_window((25 / 46, 21 / 46)))
op("BlackmanWindow")(_window((0.42, 0.5, 0.08)))


@op("MelWeightMatrix")
def _mel_weight_matrix(vals, attrs):
    """Triangular mel filters (dft_length // 2 + 1, mel bins) between the two edges, on the
    spectrum bins the spec rounds the mel points to."""
    bins, length = _constant(vals[0]), _constant(vals[1])
    rate, low, high = _constant(vals[2]), _scalar(vals[3]), _scalar(vals[4])
    to_mel = lambda hz: 2595 * math.log1p(hz / 700) / math.log(10)  # noqa: E731
    step = (to_mel(high) - to_mel(low)) / (bins + 2)
    points = [int(((length + 1) * (700 * math.expm1((i * step + to_mel(low)) / 2595 * math.log(10)))) // rate)
              for i in range(bins + 2)]
    out = torch.zeros(length // 2 + 1, bins, dtype=torch.float64)
    for i in range(bins):
        left, center, right = points[i : i + 3]
        if center == left:
            out[center, i] = 1.0
        else:
            for j in range(left, center + 1):
                out[j, i] = (j - left) / (center - left)
        for j in range(center, right):
            out[j, i] = (right - j) / (right - center)
    return [out.to(DTYPES[attrs.get("output_datatype", 1)])]
