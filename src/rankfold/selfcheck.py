"""After compressing: does the result still agree with the original on data it never saw?"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from rankfold.analyze import model_outputs
from rankfold.errors import RankfoldError
from rankfold.settings import DEFAULT_MAX_OUTPUT_ERROR, calibration_batch


@dataclass
class OutputAgreement:
    index: int
    top1_agreement: float | None  # None when the output is not (N, classes)
    rel_output_error: float  # ||y~ - y|| / ||y||


@dataclass
class Agreement:
    """The compressed network against the original on every output; the summary fields are the
    worst output's (least top-1 agreement, largest relative error)."""

    samples: int
    top1_agreement: float | None  # None when no output is (N, classes)
    rel_output_error: float
    outputs: list[OutputAgreement] = field(default_factory=list)
    where: str = "held-back samples"

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        top1 = "" if self.top1_agreement is None else f"top-1 agreement {self.top1_agreement:.1%}, "
        heads = f" ({len(self.outputs)} outputs, worst shown)" if len(self.outputs) > 1 else ""
        return f"{top1}relative output error {self.rel_output_error:.3f} on {self.samples} {self.where}{heads}"


def _is_classes(y: Tensor) -> bool:
    return y.ndim == 2 and y.shape[1] > 1


@dataclass
class _Tally:
    """One output's running sums over batches: agreement streams, so memory never grows with N."""

    error_sq: float = 0.0
    norm_sq: float = 0.0
    top1_hits: int = 0
    classes: bool = False
    finite: bool = True

    def add(self, y: Tensor, y_hat: Tensor) -> None:
        y, y_hat = y.to(torch.float64), y_hat.to(torch.float64)
        self.error_sq += float(((y_hat - y) ** 2).sum())
        self.norm_sq += float((y * y).sum())
        self.finite = self.finite and bool(torch.isfinite(y_hat).all())
        self.classes = _is_classes(y)
        if self.classes:
            self.top1_hits += int((y.argmax(1) == y_hat.argmax(1)).sum())

    def result(self, index: int, samples: int) -> OutputAgreement:
        rel = (self.error_sq ** 0.5) / max(self.norm_sq ** 0.5, 1e-30) if self.finite else float("inf")
        return OutputAgreement(index, self.top1_hits / samples if self.classes else None, rel)


def agreement(original: nn.Module, compressed: nn.Module, inputs: Tensor, *, batch_size: int | None = None,
              where: str = "held-back samples") -> Agreement:
    tallies: list[_Tally] = []
    batch_size = batch_size or calibration_batch()
    with torch.no_grad():
        for start in range(0, inputs.shape[0], batch_size):
            batch = inputs[start : start + batch_size].to(torch.float32)
            ys, ys_hat = model_outputs(original.eval()(batch)), model_outputs(compressed.eval()(batch))
            if len(ys) != len(ys_hat):
                raise RankfoldError(f"self-check: the compressed network has {len(ys_hat)} outputs, the original "
                                    f"{len(ys)}")
            tallies = tallies or [_Tally() for _ in ys]
            for index, (y, y_hat, tally) in enumerate(zip(ys, ys_hat, tallies)):
                if y.shape != y_hat.shape:
                    raise RankfoldError(f"self-check: output {index} has shape {tuple(y_hat.shape)}, the original's "
                                        f"is {tuple(y.shape)}")
                tally.add(y, y_hat)
    samples = int(inputs.shape[0])
    per_output = [tally.result(index, samples) for index, tally in enumerate(tallies)]
    tops = [o.top1_agreement for o in per_output if o.top1_agreement is not None]
    return Agreement(samples, min(tops) if tops else None,
                     max(o.rel_output_error for o in per_output), per_output, where)


def refuse_if_poor(check: Agreement, min_agreement: float,
                   max_output_error: float = DEFAULT_MAX_OUTPUT_ERROR) -> None:
    """A result that disagrees badly with the original, on any output, is an error, never a silent output."""
    for out in check.outputs or [OutputAgreement(0, check.top1_agreement, check.rel_output_error)]:
        name = f"output {out.index}" if len(check.outputs) > 1 else "the compressed network"
        if out.top1_agreement is not None and out.top1_agreement < min_agreement:
            raise RankfoldError(
                f"self-check failed: {name} agrees with the original's top-1 on only {out.top1_agreement:.1%} of "
                f"{check.samples} {check.where} (minimum {min_agreement:.0%}); nothing was written. Loosen the "
                "budgets, or lower --min-agreement to accept it")
        if out.top1_agreement is None and not out.rel_output_error <= max_output_error:
            raise RankfoldError(
                f"self-check failed: {name} is {out.rel_output_error:.3g} away from the original's (relative error "
                f"on {check.samples} {check.where}; at most {max_output_error:g} allowed); nothing was written. "
                "Loosen the budgets, or raise --max-output-error to accept it")


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
            outs = [torch.from_numpy(v) for v in session.run(None, {name: x.numpy()})]
            return tuple(outs) if len(outs) > 1 else outs[0]

    return agreement(original, _Session(), inputs)
