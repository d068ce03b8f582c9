"""Measured losses of single factorizations, to catch where the planner's second-order estimate
breaks down."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from rankfold.analyze import as_input, model_outputs, run_checked
from rankfold.layers import layer_spec
from rankfold.methods import method_named
from rankfold.output_metric import factorize_weighted
from rankfold.planner.candidates import input_weighting
from rankfold.settings import calibration_batch

PROBE_SAMPLES = 128  # calibration samples the measured losses are taken on
OUTLIER = 25.0  # measured/estimated ratio, over the network's median, that replaces the estimate (set on bench/)


class LossProbe:
    """Measured losses of single factorizations: the layer's weight replaced by its data-aware
    approximation, everything else original, KL of the predictions to the original's on a probe
    batch. Measured this way (no compensation by later layers), losses run a fairly even multiple
    of the estimates; a rank where the measured/estimated ratio is OUTLIER times the network's
    median is one where the second-order estimate broke down, and its loss is raised."""

    def __init__(self, model: nn.Module, probe: Tensor, stats: Mapping) -> None:
        self.model, self.probe, self.stats = model, as_input(probe), stats
        self.modules = dict(model.named_modules())
        self.reference = self._log_probs()
        self.values: dict[str, dict[tuple[str, tuple[int, ...]], tuple[float, float]]] = {}
        self.typical: float | None = None  # median measured/estimated ratio so far

    @staticmethod
    def applies(model: nn.Module, example: Tensor) -> bool:
        """Measured as KL between class predictions: for classifiers (every output 2-D logits) only."""
        with torch.no_grad():
            return all(out.ndim == 2 for out in model_outputs(run_checked(model, example)))

    def _log_probs(self) -> list[Tensor]:
        was_training = self.model.training
        try:
            step = calibration_batch()
            with torch.no_grad():
                batches = [model_outputs(run_checked(self.model.eval(), self.probe[start : start + step]))
                           for start in range(0, self.probe.shape[0], step)]
        finally:
            self.model.train(was_training)
        return [torch.log_softmax(torch.cat(heads).double(), 1) for heads in zip(*batches)]

    def measured(self, name: str, key) -> bool:
        return key in self.values.get(name, {})

    def measure(self, name: str, key: tuple[str, tuple[int, ...]], estimate: float) -> float:
        method_name, ranks = key
        layer = self.modules[name]
        method = method_named(method_name)
        weighting = input_weighting(self.stats[name].input_moment, layer_spec(layer).in_ch)
        approx = factorize_weighted(method, layer, ranks, weighting, method.config(list(ranks)),
                                    getattr(self.stats[name], "output_metric", None)).approx_weight
        original = layer.weight.detach().clone()
        try:
            with torch.no_grad():
                layer.weight.copy_(approx.reshape(original.shape).to(original.dtype))
            log_q = self._log_probs()
        finally:
            with torch.no_grad():
                layer.weight.copy_(original)
        kl = sum(float((p.exp() * (p - q)).sum(1).mean().clamp_min(0)) for p, q in zip(self.reference, log_q))
        self.record(name, key, kl, estimate)
        return kl

    def record(self, name: str, key: tuple[str, tuple[int, ...]], kl: float, estimate: float) -> None:
        """Keep a measurement and the network's median measured/estimated ratio."""
        self.values.setdefault(name, {})[key] = (kl, estimate)
        ratios = [k / e for layer in self.values.values() for k, e in layer.values() if e > 0]
        self.typical = float(np.median(ratios)) if ratios else None

    def structural_loss(self, name: str, key, estimate: float) -> float:
        """The estimate, or, where this rank or a higher one of the same method measured as an
        outlier, the measurement brought to the estimates' scale (never lowered)."""
        typical = self.typical
        if typical is None:
            return estimate
        method, ranks = key
        bounds = [kl / typical for (m, r), (kl, est) in self.values.get(name, {}).items()
                  if m == method and all(a <= b for a, b in zip(ranks, r)) and kl > OUTLIER * typical * est]
        return max([estimate] + bounds)
