"""Measured losses of single factorizations, to catch where the planner's second-order estimate
breaks down."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from rankfold.analyze import (
    GraphCursor,
    as_input,
    in_eval_mode,
    is_ctc_logits,
    is_probability,
    layers_called_by_ops,
    model_outputs,
    run_checked,
)
from rankfold.layers import layer_spec
from rankfold.methods import method_named
from rankfold.output_metric import factorize_weighted
from rankfold.planner.candidates import input_weighting
from rankfold.settings import calibration_batch

PROBE_SAMPLES = 128  # a classifier's calibration samples the measured losses are taken on
SEQUENCE_PROBE_SAMPLES = 32  # a recogniser's: each of its lines holds 40 or more decisions
# Measured/estimated ratio, over the network's median, that replaces the estimate (set on bench/).
# A classifier's estimate and measure are both KL: only a breakdown of the second-order estimate
# stands out (MobileNetV2's projections, up to 100x). A class-score sequence's estimate is in a
# Gaussian's units (gauss_newton.likelihood_loss) and its measure in KL, so the ratio varies more
# from layer to layer and what it catches is the estimate's units misjudging a layer: PP-OCRv4's
# recogniser at half its parameters read 0.617 of fresh lines alike unprobed; probed at 1.0 / 1.5 /
# 3.0, 0.766 / 0.812 / 0.781 (the neck's last convolution: 13x its estimate, median 3.6x).
OUTLIER = 25.0
SEQUENCE_OUTLIER = 1.5


def is_class_sequence(y: Tensor) -> bool:
    """A sequence of class scores, (..., T, classes): a softmax's probabilities or CTC logits."""
    return y.ndim >= 3 and y.is_floating_point() and (is_probability(y) or is_ctc_logits(y))


def divergence(reference: Tensor, got: Tensor, kind: str | None = None) -> float:
    """Summed over a batch, in the units of the planner's likelihood (gauss_newton.likelihood_loss):
    KL(reference || got) of the class distribution of a classifier's (N, classes) output, read as
    logits, and of every position of a class-score sequence; half the squared error of the other
    outputs, a declared embedding (`kind`, output_kinds) and a recogniser's side outputs (Gaussians)."""
    if not reference.is_floating_point():
        return 0.0
    reference, got = reference.to(torch.float64), got.to(torch.float64)
    if kind == "embedding" or (reference.ndim != 2 and not is_class_sequence(reference)):
        return 0.5 * float((got - reference).pow(2).sum())
    if reference.ndim == 2 or not is_probability(reference):
        log_p, log_q = torch.log_softmax(reference, -1), torch.log_softmax(got, -1)
    else:
        log_p, log_q = reference.clamp_min(1e-30).log(), got.clamp_min(1e-30).log()
    return float((log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0).sum())


class LossProbe:
    """Measured losses of single factorizations: the layer's weight replaced by its data-aware
    approximation, everything else original, KL of the predictions to the original's on a probe
    batch (per sample). Measured this way (no compensation by later layers), losses run a fairly
    even multiple of the estimates; a rank whose measured/estimated ratio is `outlier` times the
    network's median is one the estimate misjudged, and its loss is raised.

    On an ONNX graph a GraphCursor runs the steps before each measured layer once for all the
    layers a round measures (in graph order), and each measurement runs only the steps from its
    layer on."""

    def __init__(self, model: nn.Module, probe: Tensor, stats: Mapping, outlier: float = OUTLIER,
                 carries_up: bool = False) -> None:
        self.model, self.probe, self.stats, self.outlier = model, as_input(probe), stats, outlier
        # A classifier's outlier is a rank too small for its layer: the estimate holds again above it.
        # A recogniser's is a layer its estimate's units misjudge, at every rank: the multiple carries up.
        self.carries_up = carries_up
        self.modules = dict(model.named_modules())
        self.whole_passes = layers_called_by_ops(model) if hasattr(model, "advance") else set()
        self.reference = self._whole_pass()
        self.values: dict[str, dict[tuple[str, tuple[int, ...]], tuple[float, float]]] = {}
        self.typical: float | None = None  # median measured/estimated ratio so far

    @classmethod
    def for_model(cls, model: nn.Module, calib: Tensor, stats: Mapping) -> LossProbe | None:
        """A probe for a classifier (every output (N, classes) logits) or for a model with a
        class-score sequence among its outputs (a text recogniser); None for any other model."""
        with torch.no_grad():
            outputs = model_outputs(run_checked(model, as_input(calib[:1])))
        if all(out.ndim == 2 for out in outputs):
            return cls(model, calib[:PROBE_SAMPLES], stats)
        if any(is_class_sequence(out) for out in outputs) and hasattr(model, "advance"):
            return cls(model, calib[:SEQUENCE_PROBE_SAMPLES], stats, SEQUENCE_OUTLIER, carries_up=True)
        return None

    def _batches(self) -> list[Tensor]:
        step = calibration_batch()
        return [self.probe[start : start + step] for start in range(0, self.probe.shape[0], step)]

    def _whole_pass(self) -> list[list[Tensor]]:
        with in_eval_mode(self.model), torch.no_grad():
            return [model_outputs(run_checked(self.model, batch)) for batch in self._batches()]

    def _divergence(self, outputs: list[list[Tensor]]) -> float:
        kinds = tuple(getattr(self.model, "output_kinds", ()) or ())
        total = sum(divergence(r, o, kinds[i] if i < len(kinds) else None)
                    for ref, got in zip(self.reference, outputs) for i, (r, o) in enumerate(zip(ref, got)))
        return total / self.probe.shape[0]

    def measured(self, name: str, key) -> bool:
        return key in self.values.get(name, {})

    def _approximation(self, name: str, key: tuple[str, tuple[int, ...]]) -> Tensor:
        method_name, ranks = key
        layer = self.modules[name]
        method = method_named(method_name)
        weighting = input_weighting(self.stats[name].input_moment, layer_spec(layer).in_ch)
        approx = factorize_weighted(method, layer, ranks, weighting, method.config(list(ranks)),
                                    getattr(self.stats[name], "output_metric", None)).approx_weight
        return approx.reshape(layer.weight.shape).to(layer.weight.dtype)

    def _measure_with(self, name: str, key, run) -> float:
        """The divergence of `run()`'s outputs with layer `name` approximated (restored after)."""
        layer = self.modules[name]
        original = layer.weight.detach().clone()
        try:
            with torch.no_grad():
                layer.weight.copy_(self._approximation(name, key))
            with in_eval_mode(self.model):
                return self._divergence(run())
        finally:
            with torch.no_grad():
                layer.weight.copy_(original)

    def measure(self, name: str, key: tuple[str, tuple[int, ...]], estimate: float) -> float:
        kl = self._measure_with(name, key, self._whole_pass)
        self.record(name, key, kl, estimate)
        return kl

    def measure_all(self, wanted: Iterable[tuple[str, tuple[str, tuple[int, ...]], float]]) -> None:
        """Measure each (layer, option key, estimate); on an ONNX graph in the graph's order from
        one cursor, each from its layer's step on."""
        wanted = list(wanted)
        if not hasattr(self.model, "advance"):
            for name, key, estimate in wanted:
                self.measure(name, key, estimate)
            return
        cursor = GraphCursor(self.model, self.probe, calibration_batch())
        steps = {name: None if name in self.whole_passes else cursor.step_of(name) for name, _, _ in wanted}
        ahead = sorted((item for item in wanted if steps[item[0]] is not None), key=lambda item: steps[item[0]])
        for name, key, estimate in ahead:
            cursor.advance_to(steps[name])
            self.record(name, key, self._measure_with(name, key, cursor.outputs_from_here), estimate)
        for name, key, estimate in wanted:
            if steps[name] is None:
                self.measure(name, key, estimate)

    def record(self, name: str, key: tuple[str, tuple[int, ...]], kl: float, estimate: float) -> None:
        """Keep a measurement and the network's median measured/estimated ratio."""
        self.values.setdefault(name, {})[key] = (kl, estimate)
        ratios = [k / e for layer in self.values.values() for k, e in layer.values() if e > 0]
        self.typical = float(np.median(ratios)) if ratios else None

    def structural_loss(self, name: str, key, estimate: float) -> float:
        """The estimate, or, where this rank or a higher one of the same method measured as an
        outlier, the measurement brought to the estimates' scale (never lowered). With
        `carries_up`, a rank above an outlier has its estimate raised by the outlier's multiple over
        the typical one, whatever ranks between measured: a misjudged layer stays priced as one
        (measured better than letting the nearest measurement below decide: PP-OCRv6's tiny
        recogniser at half its parameters read 0.836 of fresh lines alike against 0.688)."""
        typical = self.typical
        if typical is None:
            return estimate
        method, ranks = key
        outliers = [(r, kl, est) for (m, r), (kl, est) in self.values.get(name, {}).items()
                    if m == method and kl > self.outlier * typical * est]
        bounds = [kl / typical for r, kl, est in outliers if all(a <= b for a, b in zip(ranks, r))]
        if self.carries_up:
            bounds += [estimate * kl / (typical * est) for r, kl, est in outliers
                       if all(a >= b for a, b in zip(ranks, r))]
        return max([estimate] + bounds)
