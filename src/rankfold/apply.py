"""The apply stage: every compressible layer -> its factorized replacement, data-aware and with
error compensation when calibration inputs are given, with a per-layer record. Keyed by layer
names (fnmatch patterns, first match wins); the planner's plans and uniform compression both
come through here."""

from __future__ import annotations

import copy
import fnmatch
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from rankfold.analyze import (
    COMPRESSIBLE,
    GraphCursor,
    InputMoments,
    as_input,
    kept_positions,
    layers_called_by_ops,
    moments_of,
    peak_state_bytes,
    reach_order,
    set_submodule,
    streamed_input_moments,
    untouchable_layers,
)
from rankfold.block_inputs import BlockInputs
from rankfold.config import VBMF, AutoConfig, MethodConfig, SkipConfig, check_keep
from rankfold.decompose import max_tucker2_ranks, sqrt_psd
from rankfold.errors import RankfoldError
from rankfold.gauss_newton import output_metrics
from rankfold.head_bias import HeadShift, refit_head_biases
from rankfold.host_memory import available_bytes, format_bytes
from rankfold.layers import LayerSpec, layer_spec
from rankfold.methods import (
    FALLBACK,
    Factorized,
    Method,
    config_for_method,
    config_types,
    method_for_config,
    method_named,
    rank_for_keep,
    registered,
    weighted_relative_error,
)
from rankfold.metric_judge import NetworkJudge, judge_samples
from rankfold.output_metric import OutputMetric, factorize_weighted
from rankfold.settings import DEFAULT_MIN_RANK, calibration_batch, memory_headroom
from rankfold.stats import model_cost

Progress = Callable[[str], None]


@dataclass
class LayerRecord:
    """What happened to one compressible layer."""

    name: str
    layer: str  # e.g. "Conv 3x3 64->128"
    method: str  # "none" when left alone
    ranks: tuple[int, ...] = ()
    params_before: int = 0
    params_after: int = 0
    rel_error: float | None = None  # data-weighted relative weight error of the approximation
    note: str = ""  # why a layer was left alone, or why another method was used

    def to_dict(self) -> dict:
        return dict(self.__dict__, ranks=list(self.ranks))


@dataclass
class CompressionReport:
    layers: list[LayerRecord] = field(default_factory=list)
    data_aware: bool = False

    @property
    def left_alone(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.method == "none"]

    def to_dict(self) -> dict:
        return {"data_aware": self.data_aware, "layers": [r.to_dict() for r in self.layers]}


def compress_with_report(
    model: nn.Module,
    *,
    method: str = "tucker2",
    keep: float = 0.5,
    calib: Tensor | None = None,
    layers: Mapping[str, MethodConfig] | None = None,
    min_rank: int = DEFAULT_MIN_RANK,
    progress: Progress | None = None,
) -> tuple[nn.Module, CompressionReport]:
    """compress(), returning the CompressionReport beside the module."""
    if not isinstance(model, nn.Module):
        raise RankfoldError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    try:
        check_keep(keep)
        default = config_for_method(method)
    except ValueError as exc:
        raise RankfoldError(str(exc)) from None
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 1:
        raise RankfoldError(f"min_rank must be a positive int, got {min_rank!r}")
    if calib is not None and not isinstance(calib, Tensor):
        raise RankfoldError(f"calib must be a torch.Tensor of example inputs, got {type(calib).__name__}")
    say = progress or (lambda _msg: None)
    result = copy.deepcopy(model)
    was_training = result.training
    result.eval()
    targets = [(name, m) for name, m in result.named_modules() if isinstance(m, COMPRESSIBLE)]
    untouchable = untouchable_layers(result)
    plans, vbmf_notes = [], {}
    for name, m in targets:
        if name in untouchable:
            plans.append((name, m, SkipConfig(untouchable[name])))
            continue
        cfg, vbmf_notes[name] = _resolve_vbmf(m, _config_for(name, layers, default))
        plans.append((name, m, cfg))

    report = CompressionReport(data_aware=calib is not None)
    configs = {name: cfg for name, _m, cfg in plans}

    metrics: Mapping[str, OutputMetric] = {}
    judge: NetworkJudge | None = None  # where the Gauss-Newton metrics are checked in the network
    judged: set[str] = set()

    def factorize(name: str, module: nn.Module, input_sqrt: Tensor | None, note: str = "") -> nn.Module | None:
        say(f"[{len(report.layers) + 1}/{len(plans)}] {name}")
        metric = metrics.get(name) if input_sqrt is not None else None
        record, replacement = _compress_layer(name, module, configs[name], keep, input_sqrt, min_rank, metric,
                                              _metric_note(metric, name in judged))
        if judge is not None and name in judged and replacement is not None:
            plain_record, plain = _compress_layer(name, module, configs[name], keep, input_sqrt, min_rank, None)
            if plain is not None and judge.error_with(result, name, plain.module) < \
                    judge.error_with(result, name, replacement.module):
                record, replacement = plain_record, plain
                record.note = joined_notes(record.note, PLAIN_NOTE)
        note = joined_notes(vbmf_notes.get(name, ""), note)
        if note:
            record.note = joined_notes(record.note, note)
        report.layers.append(record)
        return None if replacement is None else replacement.module

    if calib is None:
        for name, module, _cfg in plans:
            new = factorize(name, module, None)
            if new is not None:
                set_submodule(result, name, new)
    else:
        calib = as_input(calib)
        names = [name for name, _m, _c in plans]
        # The original, for the inputs each layer saw before compression: the caller's module where it
        # is already in eval mode (never changed here; a language model's copy is half a GB).
        reference = model if not model.training else copy.deepcopy(result)
        reached = reach_order(result, names, calib[:1])
        changed = False  # until a layer is replaced, every layer sees its original input
        # Only for layers that will be factorized: the metrics cost a forward and backward pass over
        # calib, run before the layer inputs below are held (its graph and theirs never coexist).
        metrics = output_metrics(reference, [n for n in names if not isinstance(configs[n], SkipConfig)], calib,
                                 progress=say)
        judged = {n for n in metrics if n not in getattr(metrics, "heads", {})}
        samples = judge_samples(len(judged), model_cost(reference, calib[:1]).macs) if judged else 0
        if samples:
            judge = NetworkJudge(reference, calib[:samples], result)
        elif judged:
            say(f"{len(judged)} layers are factorized under their Gauss-Newton metric unchecked: the network is "
                "too costly to run twice for each")
        cursors = _LayerInputs.for_graph(result, reference, calib, say) or \
            BlockInputs.for_model(result, reference, calib, say)
        pace = _Pace(say, len(reached))
        called_by_ops = layers_called_by_ops(result)
        for name in reached:  # in the order the network calls them: each knows the layers before it
            pace.reached(name)
            module = result.get_submodule(name)
            kept = isinstance(configs[name], SkipConfig)
            # A layer left as it is still sees the earlier layers' error: it is refit to its new
            # inputs (same shape, no parameter added) once anything before it has changed.
            wanted = changed and name not in untouchable if kept else layer_spec(module).groups == 1
            moments = None
            if wanted:
                if cursors is not None and name in called_by_ops:  # every call's input
                    moments = streamed_input_moments(reference if changed else None, result, name, calib,
                                                     every_call=True)
                elif cursors is not None:
                    moments = cursors.moments(name, module, changed)
                else:
                    moments = streamed_input_moments(reference if changed else None, result, name, calib)
            if kept:
                if moments is not None and not _enough_rows_to_refit(module, moments):
                    moments = None
                if moments is not None:
                    module = _refit_layer(module, moments)
                    set_submodule(result, name, module)
                factorize(name, module, None, "" if moments is None else REFIT_NOTE)
                continue
            if moments is None:
                new = factorize(name, module, None)
            else:
                layer, input_sqrt = _compensated_layer(module, moments)
                new = factorize(name, layer, input_sqrt)
            if new is not None:
                set_submodule(result, name, new)
                changed = True
        for name, module, _cfg in plans:  # layers the calibration pass never reached
            if name not in reached:
                new = factorize(name, module, None, "not reached by the calibration data: data-free")
                if new is not None:
                    set_submodule(result, name, new)
        if changed:
            head_inputs = cursors.head_inputs if isinstance(cursors, _LayerInputs) else None
            _note_shifts(report, refit_head_biases(reference, result, calib, say, head_inputs))
    report.layers.extend(_unhandled_layers(result))
    result.train(was_training)
    return result, report


class _Pace:
    """A progress line for the layer-by-layer apply at most every PACE_SECONDS (a language model's
    211 layers take many minutes with nothing else said)."""

    def __init__(self, say: Callable[[str], None], total: int) -> None:
        self.say, self.total, self.done, self.last = say, total, 0, time.monotonic()

    def reached(self, name: str) -> None:
        self.done += 1
        if time.monotonic() - self.last >= PACE_SECONDS:
            self.say(f"applying: layer {self.done} of {self.total} ({name})")
            self.last = time.monotonic()


PACE_SECONDS = 10.0

# Fewer samples than this held in cursors would make the layers' input moments noisy: prefix
# passes over every sample instead.
MIN_CURSOR_SAMPLES = 32


class _LayerInputs:
    """The layers' inputs of an ONNX graph, original and partly compressed, from two GraphCursors
    moving forward layer by layer: one forward pass in all, where prefix passes cost one pass up to
    every layer. Used when the graph state of every calibration sample fits the memory headroom."""

    def __init__(self, current: GraphCursor, reference_model, calib: Tensor, batch: int) -> None:
        self.current, self.reference_model, self.calib, self.batch = current, reference_model, calib, batch
        self.reference: GraphCursor | None = None  # made at the first change: till then x = x^
        # each batch's positions that a padding mask keeps (analyze.kept_positions), read once
        self.positions = [kept_positions(current.model, calib[i : i + batch]) for i in range(0, calib.shape[0], batch)]

    @classmethod
    def for_graph(cls, model, reference_model, calib: Tensor, say) -> _LayerInputs | None:
        """Cursors over as many calibration samples as the headroom holds the graph state of (all
        of them when it can; at least MIN_CURSOR_SAMPLES), else None: prefix passes."""
        if not hasattr(model, "advance"):
            return None
        headroom = memory_headroom()
        headroom = available_bytes() // 4 if headroom is None else headroom
        per_sample = 2 * peak_state_bytes(model, calib[:1])  # the original's and the compressed one's
        fits = int(headroom // max(per_sample, 1))
        if fits < min(MIN_CURSOR_SAMPLES, calib.shape[0]):
            say(f"layer inputs by prefix passes: the graph state of {MIN_CURSOR_SAMPLES} samples would take "
                f"{format_bytes(per_sample * MIN_CURSOR_SAMPLES)} (headroom {format_bytes(headroom)})")
            return None
        if fits < calib.shape[0]:
            say(f"layer inputs from {fits} of the {calib.shape[0]} calibration samples: the graph state of more "
                f"would exceed {format_bytes(headroom)}")
            calib = calib[:fits]
        batch = calibration_batch()
        return cls(GraphCursor(model, calib, batch), reference_model, calib, batch)

    def moments(self, name: str, module: nn.Module, changed: bool) -> InputMoments | None:
        x_hat = self.current.inputs_of(name)
        if x_hat is None:
            return None
        if changed and self.reference is None:
            self.reference = GraphCursor(self.reference_model, self.calib, self.batch)
        x = self.reference.inputs_of(name) if changed else x_hat
        if x is None:
            return None
        return moments_of(module, zip(x, x_hat), self.calib.shape[0], same=not changed, positions=self.positions)

    def head_inputs(self, name: str) -> tuple[list[Tensor], list[Tensor]] | None:
        """Layer `name`'s input in the original network and in the compressed one, batch by batch,
        where both cursors are not yet past its step (the last layer's, once apply is done); None
        where they are, where nothing changed (the reference cursor was never made), or where several
        steps call the layer (a cursor gives the first call's input only)."""
        if self.reference is None or name in layers_called_by_ops(self.current.model):
            return None
        x_hat = self.current.inputs_of(name)
        x = None if x_hat is None else self.reference.inputs_of(name)
        return None if x is None else (x, x_hat)


# Layers with weights that rankfold does not factorize but that need no mention: they are small
# (normalization scales and shifts) and travel with the layers around them.
QUIETLY_KEPT = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d)


def _unhandled_layers(model: nn.Module) -> list[LayerRecord]:
    """Every other module with weights of its own (ConvTranspose2d, LSTM, Embedding, ...), listed
    as left alone with the reason, so the report accounts for every weight of the network."""
    records = []
    for name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if own and not isinstance(module, COMPRESSIBLE + QUIETLY_KEPT):
            kind = type(module).__name__
            records.append(LayerRecord(name, kind, "none", (), own, own, None,
                                       f"{kind} is not a layer rankfold factorizes: left as it is"))
    return records


def joined_notes(*notes: str) -> str:
    """A record's notes in one line, the empty ones left out."""
    return "; ".join(filter(None, notes))


def _note_shifts(report: CompressionReport, shifts: list[HeadShift]) -> None:
    """Each head's bias refit, in the record of the layer that holds the bias it moved."""
    for shift in shifts:
        for record in report.layers:
            if record.name in (shift.name, f"{shift.name}.read"):
                record.note = joined_notes(record.note, shift.note)


REFIT_NOTE = "refit to the inputs the compressed layers before it give"
PLAIN_NOTE = ("factorized without its Gauss-Newton output metric: the network's outputs measured closer to the "
              "original's that way")


def _compensated_layer(module: nn.Module, moments: InputMoments) -> tuple[nn.Module, Tensor]:
    """The layer to factorize and its input weighting, compensating earlier layers' errors.

    With x the input rows the original layer saw and x^ those it sees now (earlier layers already
    factorized), ||W x - M x^||^2 = ||(W T - M) C^(1/2)||^2 + const, where C = E[x^ x^^T] and
    T = E[x x^^T] C^-1 regresses x on x^. So factorizing W T under the weighting C^(1/2) targets the
    original layer's output, not just its weights.
    """
    input_sqrt = sqrt_psd(moments.auto)
    transfer = _transfer(moments.cross, moments.auto, input_sqrt)
    return _with_weight(module, _mapped_weight(module.weight, transfer)), input_sqrt


# A refit is a least-squares fit of as many weights per output as the layer has inputs (per group):
# with too few calibration rows per input it fits the calibration set's noise. PP-LCNet's last
# layers see about 2 rows per input at 224 samples, and refitting them cost 5 % of its top-1
# agreement on fresh lines; the refit layers of YOLOv8n and PP-OCRv4 see 18 to 90.
REFIT_ROWS_PER_INPUT = 8


def _enough_rows_to_refit(module: nn.Module, moments: InputMoments) -> bool:
    return moments.rows >= REFIT_ROWS_PER_INPUT * moments.auto.shape[0] // layer_spec(module).groups


def _refit_layer(module: nn.Module, moments: InputMoments) -> nn.Module:
    """A layer that is not factorized, refit to its inputs in the compressed network: W T, the least-
    squares layer of its shape from x^ to the original's output W x (per group of a grouped
    convolution: T is block-diagonal, one block per group's input channels)."""
    groups = layer_spec(module).groups
    width = moments.auto.shape[0] // groups
    weight = module.weight.detach().to(torch.float64)
    per_group = weight.shape[0] // groups
    blocks = []
    for g in range(groups):
        span = slice(g * width, (g + 1) * width)
        auto, cross = moments.auto[span, span], moments.cross[span, span]
        transfer = _transfer(cross, auto, sqrt_psd(auto))
        blocks.append(_mapped_weight(weight[g * per_group:(g + 1) * per_group], transfer))
    return _with_weight(module, torch.cat(blocks))


def _transfer(cross: Tensor, auto: Tensor, input_sqrt: Tensor) -> Tensor:
    """T = I + E[(x - x^) x^^T] C^-1: only the earlier layers' error is regressed, so that directions
    the calibration rows never visit (more inputs than rows) keep T = I instead of T = 0."""
    regularized = input_sqrt @ input_sqrt
    correction = torch.linalg.solve(regularized, (cross - auto).T).T
    return torch.eye(auto.shape[0], dtype=auto.dtype) + correction


def _mapped_weight(weight: Tensor, transfer: Tensor) -> Tensor:
    """W T along the weight's input-channel axis (1)."""
    w = weight.detach().to(torch.float64)
    return torch.movedim(torch.movedim(w, 1, -1) @ transfer, -1, 1)


def _with_weight(module: nn.Module, weight: Tensor) -> nn.Module:
    layer = copy.deepcopy(module)
    with torch.no_grad():
        layer.weight.copy_(weight.to(module.weight.dtype))
    return layer


def _config_for(name: str, layers: Mapping[str, MethodConfig] | None, default: MethodConfig) -> MethodConfig:
    for pattern, cfg in (layers or {}).items():
        if fnmatch.fnmatchcase(name, pattern):
            if not isinstance(cfg, (*config_types(), AutoConfig, SkipConfig)):
                raise RankfoldError(f"layers[{pattern!r}] must be a method config, got {type(cfg).__name__}")
            return cfg
    return default


def _compress_layer(
    name: str, module: nn.Module, cfg: MethodConfig, keep: float, input_sqrt: Tensor | None, min_rank: int,
    metric: OutputMetric | None = None, metric_note: str = "",
) -> tuple[LayerRecord, Factorized | None]:
    """The layer's best candidate factorization and its record; with a metric (its softmax is an
    output of the network) factorized and judged under it."""
    spec = layer_spec(module)
    record = LayerRecord(name, spec.describe(), "none", params_before=spec.params, params_after=spec.params)
    if isinstance(cfg, SkipConfig):
        record.note = cfg.reason
        return record, None
    if spec.groups > 1:
        record.note = f"grouped convolution (groups={spec.groups}): not factorized"
        return record, None
    layer_keep = cfg.keep if cfg.keep is not None else keep
    candidates = _candidate_configs(spec, cfg, module)
    best: tuple[float, Method, Factorized, str] | None = None
    reasons = []
    for cand_cfg, note in candidates:
        method = method_for_config(cand_cfg)
        rank = method.config_rank(cand_cfg)
        if rank is None:
            rank = rank_for_keep(method, spec, layer_keep)
            if rank is None:
                reasons.append(f"{method.name}: no rank at keep={layer_keep:g} is smaller than the layer")
                continue
            floor = _rank_floor(method, spec, min_rank)
            if any(r < f for r, f in zip(rank, floor)):
                reasons.append(f"{method.name}: rank {rank} at keep={layer_keep:g} is below min_rank={min_rank}")
                continue
        try:
            built = factorize_weighted(method, module, rank, input_sqrt, cand_cfg, metric)
        except ValueError as exc:
            raise RankfoldError(f"layer {name!r}: {exc}") from None
        if metric is None:
            err = weighted_relative_error(module.weight, built.approx_weight, input_sqrt)
        else:
            err = weighted_relative_error(metric.weigh(module.weight), metric.weigh(built.approx_weight), input_sqrt)
        if best is None or err < best[0]:
            best = (err, method, built, note)
    if best is None:
        record.note = "; ".join(reasons)
        return record, None
    err, method, built, note = best
    record.method, record.ranks, record.rel_error, record.note = method.name, tuple(built.module.ranks), err, note
    record.params_after = sum(p.numel() for p in built.module.parameters())
    if metric is not None:
        record.note = joined_notes(note, metric_note)
    return record, built


def _metric_note(metric: OutputMetric | None, gauss_newton: bool) -> str:
    if metric is None:
        return ""
    if gauss_newton:
        return f"weighted by the Gauss-Newton metric of its {len(metric.active)} output channels"
    return f"weighted by its softmax output ({len(metric.active)} classes active in the calibration data)"


def _rank_floor(method: Method, spec: LayerSpec, min_rank: int) -> tuple[int, ...]:
    """Per rank component, the smaller of `min_rank` and the component's largest value."""
    top = method.rank_ladder(spec)[-1]
    return tuple(min(min_rank, t) for t in top)


def _candidate_configs(spec: LayerSpec, cfg: MethodConfig, module: nn.Module) -> list[tuple[MethodConfig, str]]:
    """The concrete method configs to try for one layer, each with a note for the report."""
    if isinstance(cfg, AutoConfig):
        return [(m.config_type(), "auto") for m in registered()
                if m.unsupported(spec, module) is None and _auto_may_try(m, spec)]
    method = method_for_config(cfg)
    reason = method.unsupported(spec, module)
    if reason is None:
        return [(cfg, "")]
    fallback = method_named(FALLBACK)
    return [(fallback.config_type(keep=getattr(cfg, "keep", None)), f"{reason}: used {fallback.name}")]


def _auto_may_try(method: Method, spec: LayerSpec) -> bool:
    """`auto` skips a slow method on a layer where weight params x its largest rank is too much work."""
    if method.auto_max_work is None:
        return True
    return spec.weight_params * max(method.rank_ladder(spec)[-1]) < method.auto_max_work


def _resolve_vbmf(module: nn.Module, cfg: MethodConfig) -> tuple[MethodConfig, str]:
    """A config with ranks="vbmf" -> the same method (or its fallback) at the EVBMF ranks of the
    layer's own weight (before any error compensation), kept within what the method can build."""
    method = method_for_config(cfg)
    if method is None or not hasattr(method, "vbmf_rank") or method.config_rank(cfg) != VBMF:
        return cfg, ""
    spec = layer_spec(module)
    if spec.groups > 1:
        return cfg, ""
    if method.unsupported(spec, module) is not None:
        method = method_named(FALLBACK)
    rank = list(method.vbmf_rank(module))
    top = method.rank_ladder(spec)[-1] if method.rank_count == 1 else max_tucker2_ranks(
        (spec.out_ch, spec.in_ch, *spec.kernel))
    rank = [max(1, min(r, t)) for r, t in zip(rank, top)]
    if method.rank_count == 2:  # Tucker-2's core must be able to carry the ranks: r_out <= r_in * taps
        rank[1] = min(rank[1], rank[0] * spec.spatial)
        rank[0] = min(rank[0], rank[1] * spec.spatial)
    return method.config(tuple(rank)), f"vbmf ranks {tuple(rank)}"
