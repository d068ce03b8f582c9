"""After compressing: does the result still agree with the original on data it never saw?"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from rankfold.errors import RankfoldError

DEFAULT_MIN_AGREEMENT = 0.8


@dataclass
class Agreement:
    samples: int
    top1_agreement: float | None  # None when the output is not (N, classes)
    rel_output_error: float  # ||y~ - y|| / ||y||

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        top1 = "" if self.top1_agreement is None else f"top-1 agreement {self.top1_agreement:.1%}, "
        return f"{top1}relative output error {self.rel_output_error:.3f} on {self.samples} held-back samples"


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def agreement(original: nn.Module, compressed: nn.Module, inputs: Tensor, *, batch_size: int = 128) -> Agreement:
    ys, ys_hat = [], []
    with torch.no_grad():
        for start in range(0, inputs.shape[0], batch_size):
            batch = inputs[start : start + batch_size].to(torch.float32)
            ys.append(_first(original.eval()(batch)))
            ys_hat.append(_first(compressed.eval()(batch)))
    y, y_hat = torch.cat(ys), torch.cat(ys_hat)
    top1 = float((y.argmax(1) == y_hat.argmax(1)).float().mean()) if y.ndim == 2 else None
    rel = float((y_hat - y).norm() / y.norm().clamp_min(1e-30))
    return Agreement(int(inputs.shape[0]), top1, rel)


def refuse_if_poor(check: Agreement, min_agreement: float) -> None:
    """A result that disagrees badly with the original is an error, never a silent output."""
    if check.top1_agreement is not None and check.top1_agreement < min_agreement:
        raise RankfoldError(
            f"self-check failed: the compressed network agrees with the original on only "
            f"{check.top1_agreement:.1%} of {check.samples} held-back samples (minimum {min_agreement:.0%}); "
            "nothing was written. Loosen the budgets, or lower --min-agreement to accept it")


KERNEL_CHECK_SAMPLES = 16


def refuse_if_kernels_disagree(onnx_path: str, inputs: Tensor, say) -> None:
    """A QDQ file that onnxruntime's optimized kernels compute differently from its own reference
    arithmetic on this CPU (int8 weights too wide for its u8s8 kernels) is an error."""
    from rankfold.runtime import int8_kernel_check

    kernels = int8_kernel_check(onnx_path, inputs[:KERNEL_CHECK_SAMPLES].numpy())
    say("self-check (int8 kernels): " + kernels.describe())
    if not kernels.ok:
        raise RankfoldError(
            f"self-check failed: on this CPU onnxruntime's optimized int8 kernels compute layer {kernels.worst_layer} "
            f"{kernels.worst_units} units away from the reference arithmetic (at most "
            f"{kernels.TOLERANCE_UNITS} expected; {kernels.cpu}); nothing was written. This CPU needs int8 weights "
            "on 7 bits: plan with --target host (which detects it) or --target x86-avx2")


def split_holdout(calib: Tensor) -> tuple[Tensor, Tensor | None]:
    """(samples to plan and factorize with, samples held back for the self-check): one eighth,
    16 to 128 of them, held back when there are at least 64."""
    n = calib.shape[0]
    if n < 64:
        return calib, None
    held = min(128, max(16, n // 8))
    return calib[: n - held], calib[n - held :]


def onnx_agreement(original: nn.Module, onnx_path: str, inputs: Tensor, *, optimized: bool = True) -> Agreement:
    """agreement() with the candidate run from its ONNX file in onnxruntime (e.g. a QDQ model):
    in its default session as users run it, or (`optimized=False`) in its reference arithmetic,
    each node as written, which is what the C back-end computes."""
    from rankfold.runtime import session as ort_session

    session = ort_session(onnx_path, optimized=optimized)
    name = session.get_inputs()[0].name

    class _Session(nn.Module):
        def forward(self, x):
            return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

    return agreement(original, _Session(), inputs)
