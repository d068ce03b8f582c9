"""Whether a layer's Gauss-Newton output metric helps, measured in the network.

The metric (gauss_newton.py) factorizes G^(1/2) W C^(1/2): it takes the gradient reaching the
layer's output and the layer's input as independent. Where they are not, it can do worse than the
plain data-aware factorization: behind a global max pool the gradient flows only at each channel's
largest position while C weighs every position alike. Magika (Google's file-type detector),
planned at half its parameters: relative output error 0.18 under the metric, 0.058 without.

So where the network is cheap enough to run twice per such layer, both factorizations are tried
in place and the one whose outputs stay closer to the original's on a few calibration samples is
kept. The cost is bounded in multiply-accumulates, not seconds, so a plan applies the same way on
every machine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from rankfold.analyze import GraphCursor, as_input, layers_called_by_ops, model_outputs, run_checked, set_submodule
from rankfold.settings import calibration_batch

JUDGE_SAMPLES = 16  # calibration samples each comparison runs on, at most
MIN_JUDGE_SAMPLES = 8  # fewer than this: the comparison is noise, and the metric is kept unjudged
# All comparisons together: 10 to 40 s on 2 cores (a mobile network's depthwise layers run far
# below the cores' MAC rate: PP-OCRv4's detector took 74 s more at 2e12 and 32 samples).
JUDGE_MACS = 1e12


def judge_samples(layers: int, macs_per_sample: int) -> int:
    """How many calibration samples each of `layers` comparisons (two forward passes each) may run
    on within JUDGE_MACS: at most JUDGE_SAMPLES, 0 below MIN_JUDGE_SAMPLES."""
    if layers == 0:
        return 0
    affordable = int(JUDGE_MACS // max(2 * layers * macs_per_sample, 1))
    samples = min(JUDGE_SAMPLES, affordable)
    return samples if samples >= MIN_JUDGE_SAMPLES else 0


def relative_output_error(outputs: Sequence[Sequence[Tensor]], reference: Sequence[Sequence[Tensor]]) -> float:
    """Sum over the float outputs of |y - y_ref|^2 / |y_ref|^2, each taken over all batches (one
    list of outputs per batch: outputs need not share a sample axis, nor have one)."""
    total = 0.0
    for ys, rs in zip(zip(*outputs), zip(*reference)):
        if not rs[0].is_floating_point():
            continue
        error = sum(float((y.to(torch.float64) - r.to(torch.float64)).pow(2).sum()) for y, r in zip(ys, rs))
        total += error / max(sum(float(r.to(torch.float64).pow(2).sum()) for r in rs), 1e-30)
    return total


class NetworkJudge:
    """The original's outputs on `samples`, and the error of the network with one layer swapped.

    On an ONNX graph (`model`, the network being compressed) a GraphCursor over the samples moves
    forward with the apply, so each comparison runs only the steps from the swapped layer on: the
    steps before it are the same for both candidates (PP-OCRv4's detector: half the passes' cost)."""

    def __init__(self, reference: nn.Module, samples: Tensor, model: nn.Module | None = None) -> None:
        self.samples = as_input(samples)
        self.reference = self._outputs(reference)
        self.cursor = GraphCursor(model, self.samples, self._step()) if hasattr(model, "advance") else None
        self.whole_passes = layers_called_by_ops(model) if self.cursor is not None else set()

    @staticmethod
    def _step() -> int:
        # A quarter of the memory plan's batch: these passes run beside the graph state the apply
        # holds, which the plan sized for its own batches (PP-OCRv4's detector: 9.0 -> 11.3 GB peak
        # with whole batches).
        return max(1, calibration_batch() // 4)

    def _outputs(self, model: nn.Module) -> list[list[Tensor]]:
        step = self._step()
        with torch.no_grad():
            return [model_outputs(run_checked(model, self.samples[start : start + step]))
                    for start in range(0, self.samples.shape[0], step)]

    def _outputs_from(self, model: nn.Module, name: str) -> list[list[Tensor]]:
        """The outputs of `model`, from layer `name`'s step on where the cursor can start there (the
        layer's first call is ahead of it), else from a whole pass."""
        index = None
        if self.cursor is not None and model is self.cursor.model and name not in self.whole_passes:
            index = self.cursor.step_of(name)
        if index is None:
            return self._outputs(model)
        self.cursor.advance_to(index)
        return self.cursor.outputs_from_here()

    def error_with(self, model: nn.Module, name: str, layer: nn.Module) -> float:
        """The output error of `model` with `layer` in place of its layer `name` (restored after)."""
        held = model.get_submodule(name)
        set_submodule(model, name, layer)
        try:
            return relative_output_error(self._outputs_from(model, name), self.reference)
        finally:
            set_submodule(model, name, held)
