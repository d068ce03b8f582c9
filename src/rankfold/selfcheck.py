"""After compressing: does the result still agree with the original on data it never saw?"""

from __future__ import annotations

import math
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from rankfold.analyze import as_input, ctc_blank, logit_outputs, model_outputs, output_kind, sample_axis
from rankfold.check_rules import DEFAULT_IOU_AT, HIGHER_IS_BETTER, CheckRule
from rankfold.errors import RankfoldError
from rankfold.settings import (
    DEFAULT_MAX_OUTPUT_ERROR,
    DEFAULT_MAX_PERPLEXITY_RATIO,
    DEFAULT_MIN_COSINE,
    calibration_batch,
)

# labels: integer or boolean outputs; selected: rows a graph selects, as many as the data asks for
CLASS_KINDS = ("classes", "sequence", "distribution", "labels", "selected")


def default_rules(kind: str, min_agreement: float, max_output_error: float) -> list[CheckRule]:
    """The documented defaults per output kind: top-1 agreement for class scores, whole sequences
    read alike (every position's argmax) for sequences, argmax agreement per position for other
    distributions (class maps), mean cosine similarity for embeddings (a kind the model declares),
    the perplexity ratio to the original's for next-token logits (a kind the model declares),
    relative error for everything else; a map with score channels (values in [0, 1]: a detector's
    scores, a text or face probability map) must also keep their IoU at DEFAULT_IOU_AT, and its
    relative error is the worse of its score channels' and its other channels', because one pooled
    over both is dominated by box coordinates in pixels (YOLOv8n at a tenth of its bytes passed it
    with every score lost)."""
    if kind == "sequence":
        return [CheckRule("sequence", min_agreement)]
    if kind == "embedding":  # declared by the model (output_kinds): sentence encoders
        return [CheckRule("cosine", DEFAULT_MIN_COSINE)]
    if kind == "next_token":  # declared by causal language models: perplexity on held-back windows
        return [CheckRule("perplexity", DEFAULT_MAX_PERPLEXITY_RATIO)]
    if kind == "cache":  # a decoder's present keys and values (declared): its next-token logits judge it
        return []
    if kind in CLASS_KINDS:
        return [CheckRule("top1", min_agreement)]
    relerr = CheckRule("relerr", max_output_error)
    return [relerr, CheckRule("iou", min_agreement, at=DEFAULT_IOU_AT)] if kind == "scores" else [relerr]


def channel_axis(shape: tuple[int, ...]) -> int | None:
    """The axis of an output's channels: 1 for maps (N, C, ...); for (N, A, B) the shorter of A and
    B (a detector writes (N, 4 + classes, anchors) or (N, anchors, 5 + classes)); None for (N,)."""
    if len(shape) < 2:
        return None
    return 2 if len(shape) == 3 and shape[2] < shape[1] else 1


def _relative(error_sq: Tensor, norm_sq: Tensor) -> float:
    """||y~ - y|| / ||y|| from per-channel sums of squares."""
    return float(error_sq.sum()) ** 0.5 / max(float(norm_sq.sum()) ** 0.5, 1e-30)


def _finite_where_alike(y: Tensor, y_hat: Tensor) -> tuple[bool, Tensor, Tensor]:
    """(whether every value the compressed output does not have finite is the original's same
    infinity or NaN, both with those values set to 0). An output that holds -inf by design (a mask
    of scores, a log-probability of nothing) agrees there and is judged on the rest; it was refused
    as "not finite" at any size. A NaN or infinity the original does not have is a disagreement."""
    finite, finite_hat = torch.isfinite(y), torch.isfinite(y_hat)
    if bool(finite_hat.all()) and bool(finite.all()):
        return True, y, y_hat
    alike = (y == y_hat) | (torch.isnan(y) & torch.isnan(y_hat))
    matched = bool((alike | (finite & finite_hat)).all())
    both = finite & finite_hat
    return matched, torch.where(both, y, 0.0), torch.where(both, y_hat, 0.0)


def _channel_rows(values: Tensor, axis: int | None) -> Tensor:
    """`values` as (channels, everything else); one channel where there is no channel axis."""
    return values.reshape(1, -1) if axis is None else values.movedim(axis, 0).reshape(values.shape[axis], -1)


def _per_channel(values: Tensor, axis: int | None) -> Tensor:
    """Sum (of a mask) per channel, float64 (C,)."""
    return _channel_rows(values, axis).sum(1).to(torch.float64)


@dataclass
class OutputAgreement:
    index: int
    top1_agreement: float | None  # None when the output holds no class scores
    rel_output_error: float  # ||y~ - y|| / ||y||
    kind: str = "dense"
    name: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # every metric, by CheckRule.key


@dataclass
class Agreement:
    """The compressed network against the original on every output; the summary fields are the
    worst output's (least top-1 agreement, largest relative error)."""

    samples: int
    top1_agreement: float | None  # None when no output holds class scores
    rel_output_error: float
    outputs: list[OutputAgreement] = field(default_factory=list)
    where: str = "held-back samples"
    # What the --check rules a user gave measured, as said (refuse_if_poor fills it): the figures
    # judged, where they are not the defaults describe() shows anyway
    judged: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def interval(self, fraction: float) -> str:
        """' (95 % interval 63%-93%)': how far a fraction of so few samples may be from the data's."""
        low, high = proportion_interval(fraction, self.samples)
        return f" (95 % interval {low:.0%}-{high:.0%})"

    def describe(self) -> str:
        # an interval for top-1 where it is one figure per sample (classifiers), not per position
        per_sample = all(o.kind == "classes" for o in self.outputs if o.kind in CLASS_KINDS)
        top1 = "" if self.top1_agreement is None else \
            f"top-1 agreement {self.top1_agreement:.1%}{self.interval(self.top1_agreement) if per_sample else ''}, "
        embeddings = [o.metrics.get("cosine", 0.0) for o in self.outputs if o.kind == "embedding"]
        if embeddings:
            top1 += f"embedding cosine {min(embeddings):.4f}, "
        for o in self.outputs:
            if o.kind == "sequence":  # what its default rule judges; top-1 above is per position
                top1 += f"sequences read alike {o.metrics['sequence']:.1%}{self.interval(o.metrics['sequence'])}, "
            if o.kind == "scores":
                top1 += f"score IoU@{DEFAULT_IOU_AT:g} {o.metrics[f'iou@{DEFAULT_IOU_AT:g}']:.1%}, "
            if o.kind == "selected":  # top-1 above counts it too: the rows both select over either's
                top1 += f"rows selected alike {o.metrics['top1']:.1%}, "
            if o.kind == "next_token":
                top1 += (f"perplexity {o.metrics['perplexity_candidate']:.3f} against the original's "
                         f"{o.metrics['perplexity_original']:.3f} (x{o.metrics['perplexity']:.3f}), "
                         f"KL {o.metrics['kl']:.4f} per token, ")
        caches = sum(o.kind == "cache" for o in self.outputs)
        heads = f" ({len(self.outputs) - caches} outputs, worst shown)" if len(self.outputs) - caches > 1 else ""
        if caches:
            heads += f"; {caches} key / value cache outputs judged by the next-token logits"
        judged = f"; --check: {', '.join(self.judged)}" if self.judged else ""
        return f"{top1}relative output error {self.rel_output_error:.3f} on {self.samples} {self.where}{heads}{judged}"


def _collapsed(row: list[int], blank: int = 0) -> tuple[int, ...]:
    """Greedy CTC reading of one sequence's argmaxes: repeats merged, the blank dropped."""
    return tuple(c for i, c in enumerate(row) if c != blank and (i == 0 or c != row[i - 1]))


def _sequences_alike(y: Tensor, y_hat: Tensor, blank: int = 0) -> int:
    """How many (T, classes) sequences read alike: equal after greedy CTC decoding (frames that
    differ only in where a blank or a repeat falls give the same text; a token sequence without
    blanks or repeats must match at every position)."""
    a, b = y.argmax(-1).tolist(), y_hat.argmax(-1).tolist()
    return sum(_collapsed(p, blank) == _collapsed(q, blank) for p, q in zip(a, b))


@dataclass
class _Tally:
    """One output's running sums over batches: agreement streams, so memory never grows with N."""

    iou_levels: tuple[float, ...] = (DEFAULT_IOU_AT,)
    error_sq: float = 0.0
    norm_sq: float = 0.0
    top1_hits: int = 0
    positions: int = 0
    sequence_hits: int = 0
    cosine_sum: float = 0.0
    samples: int = 0
    both: dict[float, Tensor] = field(default_factory=dict)  # per channel, cells on in both maps
    either: dict[float, Tensor] = field(default_factory=dict)  # per channel, cells on in one or both
    channel_error_sq: Tensor | float = 0.0  # per channel, sum of squared differences and of squares
    channel_norm_sq: Tensor | float = 0.0
    low: Tensor | None = None  # per channel, the original's least and largest value
    high: Tensor | None = None
    kind: str | None = None
    logits: bool = False  # a Linear layer's output as it is (logit_outputs): its kind may be "sequence"
    sample_axis: int | None = None  # decided on the first batch (sample_axis)
    blank: int | None = None  # a sequence's CTC blank (ctc_blank), decided on the first batch
    finite: bool = True
    nll: float = 0.0  # next-token outputs: the original's and the candidate's summed -log p(next id)
    nll_hat: float = 0.0
    kl_sum: float = 0.0  # and KL(original || candidate) summed over positions
    predicted: int = 0  # positions with a next id to predict

    def add(self, y: Tensor, y_hat: Tensor, ids: Tensor | None = None, batch: int | None = None) -> None:
        if self.kind == "next_token":
            self._add_next_token(y, y_hat, ids)
            return
        if self.kind == "selected" or _selected_rows(y, y_hat):
            self._add_selected(y, y_hat)
            return
        if y.ndim == 0:  # one value over the whole batch (a confidence reduced over every axis)
            y, y_hat = y.reshape(1, 1), y_hat.reshape(1, 1)
        if self.sample_axis is None:
            self.sample_axis = sample_axis(tuple(y.shape), batch or y.shape[0])
        y, y_hat = y.movedim(self.sample_axis, 0), y_hat.movedim(self.sample_axis, 0)
        if not y.dtype.is_floating_point:  # labels, indices, masks: judged by how many are equal
            self.kind = "labels"
            same = (y == y_hat).reshape(y.shape[0], -1)
            self.top1_hits += int(same.sum())
            self.positions += same.numel()
            self.sequence_hits += int(same.all(1).sum())
            self.samples += y.shape[0]
            return
        self.kind = self.kind or output_kind(y, self.logits)
        y, y_hat = y.to(torch.float64), y_hat.to(torch.float64)
        matched, y, y_hat = _finite_where_alike(y, y_hat)
        self.finite = self.finite and matched
        axis = channel_axis(tuple(y.shape))
        self.channel_error_sq = self.channel_error_sq + _per_channel((y_hat - y) ** 2, axis)
        self.channel_norm_sq = self.channel_norm_sq + _per_channel(y * y, axis)
        n = y.shape[0]
        flat, flat_hat = y.reshape(n, -1), y_hat.reshape(n, -1)
        self.cosine_sum += float(torch.nn.functional.cosine_similarity(flat, flat_hat, dim=1, eps=1e-30).sum())
        self.samples += n
        if y.ndim >= 2 and y.shape[-1] > 1:  # argmax over the last axis, at every position
            same = (y.argmax(-1) == y_hat.argmax(-1)).reshape(n, -1)
            self.top1_hits += int(same.sum())
            self.positions += same.numel()
            if y.ndim == 3 and self.blank is None:  # decided on the original's first batch
                self.blank = ctc_blank(y) or 0
            self.sequence_hits += _sequences_alike(y, y_hat, self.blank) if y.ndim == 3 else int(same.all(1).sum())
        rows = _channel_rows(y, axis)
        low, high = rows.amin(1), rows.amax(1)
        self.low = low if self.low is None else torch.minimum(self.low, low)
        self.high = high if self.high is None else torch.maximum(self.high, high)
        for level in self.iou_levels:
            on, on_hat = y > level, y_hat > level
            self.both[level] = self.both.get(level, 0) + _per_channel(on & on_hat, axis)
            self.either[level] = self.either.get(level, 0) + _per_channel(on | on_hat, axis)

    def _add_selected(self, y: Tensor, y_hat: Tensor) -> None:
        """Rows a graph selects, as many as the data asks for (NonMaxSuppression's (sample, class,
        box) triples, NonZero's indices): the rows both select (as a multiset) over the rows either
        does, a batch's selection alike or not."""
        self.kind = "selected"
        wanted, got = (Counter(map(tuple, t.reshape(t.shape[0], -1).tolist())) for t in (y, y_hat))
        both = sum((wanted & got).values())
        self.top1_hits += both
        self.positions += sum(wanted.values()) + sum(got.values()) - both
        self.sequence_hits += int(wanted == got)
        self.samples += 1

    def _add_next_token(self, y: Tensor, y_hat: Tensor, ids: Tensor | None) -> None:
        """Logits (N, T, vocabulary) of a causal language model on full windows of `ids`: position t
        predicts id t+1. Streams per sample in float32 (a batch's float64 logits would take GBs)."""
        if ids is None:
            raise RankfoldError("self-check: next-token logits need the token ids they predict")
        for logits, logits_hat, row in zip(y, y_hat, ids.long()):
            log_p, log_q = logits[:-1].float().log_softmax(-1), logits_hat[:-1].float().log_softmax(-1)
            labels = row[1:].unsqueeze(-1)
            self.nll -= float(log_p.gather(-1, labels).sum())
            self.nll_hat -= float(log_q.gather(-1, labels).sum())
            self.kl_sum += float((log_p.exp() * (log_p - log_q)).sum())
            self.finite = self.finite and bool(torch.isfinite(logits_hat).all())
            self.error_sq += float(((logits_hat - logits).double() ** 2).sum())
            self.norm_sq += float((logits.double() ** 2).sum())
            same = logits.argmax(-1) == logits_hat.argmax(-1)
            self.top1_hits += int(same.sum())
            self.positions += same.numel()
            self.sequence_hits += int(same.all())
            self.samples += 1
            self.predicted += labels.shape[0]

    def result(self, index: int, name: str | None) -> OutputAgreement:
        if self.kind == "next_token":
            return self._next_token_result(index, name)
        if self.kind in ("labels", "selected"):  # its relative error: the share of values that differ
            alike = self.top1_hits / max(self.positions, 1)
            metrics = {"top1": alike, "relerr": 1.0 - alike, "sequence": self.sequence_hits / max(self.samples, 1)}
            return OutputAgreement(index, alike, 1.0 - alike, self.kind, name, metrics)
        # Score channels: the original's values all in [0, 1]. Box coordinates in pixels are above
        # any level everywhere and outweigh the scores in any error pooled over both, so IoU is
        # taken over the score channels alone, and relative error over each group apart (the worse).
        scores = (self.low >= 0) & (self.high <= 1)
        if self.kind not in (None, "dense"):  # class scores, sequences, class maps: judged as one
            scores = torch.zeros_like(scores)
        pooled = scores if bool(scores.any()) else torch.ones_like(scores)
        groups = [g for g in (scores, ~scores) if bool(g.any())]
        rel = max(_relative(self.channel_error_sq[g], self.channel_norm_sq[g]) for g in groups) \
            if self.finite else float("inf")
        metrics = {"relerr": rel, "cosine": self.cosine_sum / max(self.samples, 1) if self.finite else 0.0}
        if self.positions:
            metrics["top1"] = self.top1_hits / self.positions
            metrics["sequence"] = self.sequence_hits / self.samples
        for level in self.iou_levels:  # two empty maps agree
            both, either = float(self.both[level][pooled].sum()), float(self.either[level][pooled].sum())
            metrics[f"iou@{level:g}"] = both / either if either else 1.0
        kind = self.kind or "dense"
        kind = "scores" if kind == "dense" and bool(scores.any()) else kind
        if kind == "scores":  # the original's highest score: below the IoU's level, no decision is seen
            metrics["score_peak"] = float(self.high[scores].max())
        classes = kind in CLASS_KINDS
        return OutputAgreement(index, metrics["top1"] if classes else None, rel, kind, name, metrics)

    def _next_token_result(self, index: int, name: str | None) -> OutputAgreement:
        """Perplexity ratio (the candidate's over the original's), KL per token, and top-1 per position."""
        count = max(self.predicted, 1)
        rel = (self.error_sq ** 0.5) / max(self.norm_sq ** 0.5, 1e-30) if self.finite else float("inf")
        ratio = math.exp(min((self.nll_hat - self.nll) / count, 700.0)) if self.finite else float("inf")
        metrics = {"relerr": rel, "perplexity": ratio, "kl": self.kl_sum / count if self.finite else float("inf"),
                   "top1": self.top1_hits / max(self.positions, 1),
                   "sequence": self.sequence_hits / max(self.samples, 1),
                   "perplexity_original": math.exp(min(self.nll / count, 700.0)),
                   "perplexity_candidate": ratio * math.exp(min(self.nll / count, 700.0))}
        return OutputAgreement(index, None, rel, "next_token", name, metrics)


def _selected_rows(y: Tensor, y_hat: Tensor) -> bool:
    """Whether an integer output is a list of selected rows whose count the data decides
    (NonMaxSuppression, NonZero): rows of one width, as many as neither file can promise, so the
    two counts differ (where they are equal, the rows are compared in order)."""
    if y.dtype.is_floating_point or y_hat.dtype.is_floating_point or y.ndim != 2 or y_hat.ndim != 2:
        return False
    return y.shape[1] == y_hat.shape[1] and y.shape[0] != y_hat.shape[0]


# The original's outputs on the inputs it was last checked on, per original module. A result is
# checked in up to three forms on the same held-back samples (float; int8 activations; weight-only),
# and distillation checks its student on them every few steps: the original's pass (in torch, most
# of each check's time where the result runs in onnxruntime: PP-OCRv4 rec) then runs once.
_REMEMBERED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
REMEMBERED_BYTES = 256 * 2**20  # larger outputs are computed again each time


def _version(tensors) -> tuple | None:
    """Changes whenever one of `tensors` is written in place or replaced (None: cannot tell)."""
    try:
        return tuple((t.data_ptr(), t.dtype, t._version) for t in tensors)
    except RuntimeError:  # inference tensors keep no version
        return None


def _weights_version(module: nn.Module) -> tuple | None:
    return _version((*module.parameters(), *module.buffers()))


def _remembered_outputs(original: nn.Module, inputs: Tensor, batch_size: int) -> list[list[Tensor]] | None:
    """The original's outputs per batch, where they were computed on equal inputs with the same
    batches and weights. The inputs kept are the caller's tensor, not a copy (its version tells a
    write into it); equal inputs in another tensor (each caller slices its held-back samples anew)
    are compared by value."""
    kept = _REMEMBERED.get(original)
    if kept is None:
        return None
    kept_inputs, inputs_version, kept_batch, weights, outputs = kept
    same = (kept_batch == batch_size and weights is not None and weights == _weights_version(original)
            and inputs_version == _version([kept_inputs]) and kept_inputs.shape == inputs.shape
            and kept_inputs.dtype == inputs.dtype and (kept_inputs is inputs or torch.equal(kept_inputs, inputs)))
    return outputs if same else None


def _size(outputs: list[Tensor]) -> int:
    return sum(y.numel() * y.element_size() for y in outputs if isinstance(y, Tensor))


def _remember_outputs(original: nn.Module, inputs: Tensor, batch_size: int,
                      outputs: list[list[Tensor]] | None) -> None:
    """Keeps `outputs` (None: too large to keep) in place of what was kept for `original`."""
    weights, inputs_version = _weights_version(original), _version([inputs])
    if outputs is not None and None not in (weights, inputs_version):
        _REMEMBERED[original] = (inputs, inputs_version, batch_size, weights, outputs)
    else:
        _REMEMBERED.pop(original, None)


def agreement(original: nn.Module, compressed: nn.Module, inputs: Tensor, *, batch_size: int | None = None,
              where: str = "held-back samples", rules: tuple[CheckRule, ...] = ()) -> Agreement:
    """Every metric on every output of `compressed` against `original`, batch by batch (the
    original's outputs remembered for the next check on the same inputs)."""
    levels = tuple(sorted({DEFAULT_IOU_AT} | {r.at for r in rules if r.metric == "iou"}))
    names = list(getattr(original, "output_names", []) or [])
    declared = tuple(getattr(original, "output_kinds", ()) or ())  # kinds the data cannot tell (embeddings)
    tallies: list[_Tally] = []
    batch_size = batch_size or calibration_batch()
    remembered = _remembered_outputs(original, inputs, batch_size)
    computed: list[list[Tensor]] | None = [] if remembered is None else None
    computed_bytes = 0
    with torch.no_grad():
        for batch_index, start in enumerate(range(0, inputs.shape[0], batch_size)):
            batch = as_input(inputs[start : start + batch_size])
            ys = remembered[batch_index] if remembered is not None else model_outputs(original.eval()(batch))
            if computed is not None:
                computed.append(ys)
                computed_bytes += _size(ys)
                if computed_bytes > REMEMBERED_BYTES:  # not kept: held until the end, they would cost memory
                    computed = None
            ys_hat = model_outputs(compressed.eval()(batch))
            if len(ys) != len(ys_hat):
                raise RankfoldError(f"self-check: the compressed network has {len(ys_hat)} outputs, the original "
                                    f"{len(ys)}")
            if not tallies:
                # found on one sample: every Linear's output is held for the comparison
                undeclared = len(declared) < len(ys) or None in declared
                logits = logit_outputs(original, batch[:1]) if undeclared else set()
                tallies = [_Tally(levels, kind=declared[i] if i < len(declared) else None, logits=i in logits)
                           for i in range(len(ys))]
            for index, (y, y_hat, tally) in enumerate(zip(ys, ys_hat, tallies)):
                if y.ndim == 0 and y_hat.numel() == 1:  # a 0-d value, as onnxruntime's batched runs stack it
                    y_hat = y_hat.reshape(())
                if y.shape != y_hat.shape and not _selected_rows(y, y_hat):
                    raise RankfoldError(f"self-check: output {index} has shape {tuple(y_hat.shape)}, the original's "
                                        f"is {tuple(y.shape)}")
                tally.add(y, y_hat, batch, int(batch.shape[0]))
    if remembered is None:
        _remember_outputs(original, inputs, batch_size, computed)
    samples = int(inputs.shape[0])
    names = names if len(names) == len(tallies) else [None] * len(tallies)
    per_output = [tally.result(index, name) for index, (tally, name) in enumerate(zip(tallies, names))]
    tops = [o.top1_agreement for o in per_output if o.top1_agreement is not None]
    judged = [o for o in per_output if o.kind != "cache"] or per_output
    return Agreement(samples, min(tops) if tops else None,
                     max(o.rel_output_error for o in judged), per_output, where)


def rules_for(out: OutputAgreement, rules: tuple[CheckRule, ...], min_agreement: float,
              max_output_error: float) -> list[CheckRule]:
    """The rules that judge `out`: those naming it, else those for every output, else its kind's default."""
    named = [r for r in rules if r.output is not None and r.output in (out.name, str(out.index))]
    general = [r for r in rules if r.output is None]
    return named or general or default_rules(out.kind, min_agreement, max_output_error)


def declare_embeddings(model: nn.Module, outputs: Sequence[str | int]) -> None:
    """Read these outputs of `model` (by name, or index) as embeddings, which the data cannot tell
    from class scores (a face network's unnormalized vector): the self-check compares them by
    cosine (CheckRule("cosine", ...) to change the threshold), and the planner, the distillation and
    the Gauss-Newton metric treat them as vectors, not as class scores. The CLI's --embedding; it
    sets `model.output_kinds`, which the other outputs leave as found from the data."""
    if not outputs:
        return
    names = [str(n) for n in getattr(model, "output_names", None) or []]
    count = len(names) or 1 + max((o for o in outputs if isinstance(o, int)), default=0)
    kinds = list(getattr(model, "output_kinds", ()) or ()) + [None] * count
    for output in outputs:
        text = str(output)
        index = names.index(text) if text in names else int(text) if text.isdigit() else -1
        if not 0 <= index < count:
            known = f"{', '.join(names)}, or their indexes 0 to {count - 1}" if names else "an index"
            raise RankfoldError(f"--embedding {output!r}: the model has no such output (its outputs: {known})")
        kinds[index] = "embedding"
    model.output_kinds = tuple(kinds[: max(count, len(getattr(model, "output_kinds", ()) or ()))])


def check_rules_problem(rules: tuple[CheckRule, ...], output_names: list[str]) -> str | None:
    """A rule naming an output the model does not have, said before any work."""
    known = set(output_names) | {str(i) for i in range(len(output_names))}
    for rule in rules:
        if rule.output is not None and rule.output not in known:
            return (f"--check {rule.output}=...: the model has no output {rule.output!r} (outputs: "
                    f"{', '.join(output_names)}, or their indexes 0 to {len(output_names) - 1})")
    return None


def proportion_interval(fraction: float, samples: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's 95 % interval for a fraction of `samples` independent samples: where the figure a
    much larger held-back set would give likely lies (32 samples at 34 %: 20 % to 52 %)."""
    if samples <= 0:
        return 0.0, 1.0
    centre = (fraction + z * z / (2 * samples)) / (1 + z * z / samples)
    half = z / (1 + z * z / samples) * math.sqrt(fraction * (1 - fraction) / samples + z * z / (4 * samples**2))
    return max(0.0, centre - half), min(1.0, centre + half)


def _unfired(out: OutputAgreement) -> str:
    """Where the original's scores never reach the IoU's level on the checked samples (a wake-word
    detector on audio without its word): the relative error is then of small scores, and no
    decision the scores make is seen. Said, with what judges the decisions."""
    peak = out.metrics.get("score_peak")
    if peak is None or peak >= DEFAULT_IOU_AT:
        return ""
    return (f"; the original's scores there never exceed {peak:.2g}, so no decision at {DEFAULT_IOU_AT:g} is seen: "
            "calibrate on samples where it fires, or judge its decisions at a level its scores reach with "
            "--check iou@LEVEL:THRESHOLD")


def _apart(value: float, limit: float) -> str:
    """`value` with the digits that tell it from `limit` (0.2004 against 0.2 is not "0.2")."""
    for digits in range(3, 8):
        text = f"{value:.{digits}g}"
        if float(text) != limit:
            return text
    return repr(value)


def _of_samples(value: float, check: Agreement) -> str:
    """'34.4% of 32 held-back samples (95 % interval 20%-52%)': a figure per sample with how sure it is."""
    return f"{value:.1%} of {check.samples} {check.where}{check.interval(value)}"


def refuse_if_poor(check: Agreement, min_agreement: float,
                   max_output_error: float = DEFAULT_MAX_OUTPUT_ERROR, rules: tuple[CheckRule, ...] = ()) -> None:
    """A result that disagrees badly with the original, on any output, is an error, never a silent output."""
    outputs = check.outputs or [OutputAgreement(0, check.top1_agreement, check.rel_output_error,
                                                "classes" if check.top1_agreement is not None else "dense",
                                                metrics={"top1": check.top1_agreement or 0.0,
                                                         "relerr": check.rel_output_error})]
    for out in outputs:
        name = (f"output {out.name or out.index}" if len(outputs) > 1 else "the compressed network")
        for rule in rules_for(out, rules, min_agreement, max_output_error):
            value = out.metrics.get(rule.key)
            if value is None:
                raise RankfoldError(f"self-check: {rule.key} cannot be measured on {name} ({out.kind}, no class "
                                    "axis); choose another --check metric for it")
            higher = HIGHER_IS_BETTER[rule.metric]
            default = rule not in rules  # its kind's default: say which option moves it
            if (value >= rule.threshold) if higher else (value <= rule.threshold):
                if not default:
                    said = f"{rule.key} {value:.4g} {'>=' if higher else '<='} {rule.threshold:g}" + (
                        f" ({out.name or out.index})" if len(outputs) > 1 else "")
                    if said not in check.judged:
                        check.judged.append(said)
                continue
            if rule.metric == "top1" and default:
                what = "agrees with the original's top-1 on only " + (
                    _of_samples(value, check) if out.kind == "classes" else
                    f"{value:.1%} of its positions over {check.samples} {check.where}")
                if out.kind == "selected":
                    what = (f"selects {value:.1%} of the rows it or the original selects alike (a set of rows, as "
                            f"NonMaxSuppression or NonZero select them) on {check.samples} {check.where}")
                raise RankfoldError(
                    f"self-check failed: {name} {what} (minimum {min_agreement:.0%}); nothing was written. Loosen "
                    "the budgets, or lower --min-agreement to accept it")
            if rule.metric == "sequence" and default:
                raise RankfoldError(
                    f"self-check failed: {name} reads only {_of_samples(value, check)} as the "
                    f"original does (greedy CTC reading of the argmaxes; minimum {min_agreement:.0%}); nothing was "
                    "written. Loosen the budgets, or lower --min-agreement to accept it")
            if rule.metric == "iou" and default:
                raise RankfoldError(
                    f"self-check failed: {name}'s score channels (values in [0, 1]) thresholded at {rule.at:g} "
                    f"overlap the original's at IoU {value:.1%} on {check.samples} {check.where} (minimum "
                    f"{min_agreement:.0%}); nothing was written. Loosen the budgets, lower --min-agreement, or set "
                    "--check iou@LEVEL:THRESHOLD (or relerr:THRESHOLD) for it to accept it")
            if rule.metric == "relerr" and default:
                raise RankfoldError(
                    f"self-check failed: {name} is {_apart(value, max_output_error)} away from the original's "
                    "(relative error"
                    f"{' of its score channels or of the others, the worse,' if out.kind == 'scores' else ''} on "
                    f"{check.samples} {check.where}; at most {max_output_error:g} allowed){_unfired(out)}; nothing "
                    "was written. Loosen the budgets, or raise --max-output-error to accept it")
            raise RankfoldError(
                f"self-check failed: {name} has {rule.key} {value:.4g} on {check.samples} {check.where} (required: "
                f"{rule.describe()}); nothing was written. Loosen the budgets, or relax --check to accept it")


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


def onnx_agreement(original: nn.Module, onnx_path: str, inputs: Tensor, *, optimized: bool = True,
                   rules: tuple[CheckRule, ...] = (), takes_inputs_of: nn.Module | None = None) -> Agreement:
    """agreement() with the candidate run from its ONNX file in onnxruntime (e.g. a QDQ model):
    in its default session as users run it, or (`optimized=False`) in its reference arithmetic,
    each node as written, which is what the C back-end computes. `takes_inputs_of`: the file
    takes every input of that module's original file (written into its graph, rankfold.export.graft)."""
    from rankfold.runtime import session as ort_session

    runner = ort_session(onnx_path, optimized=optimized)
    return agreement(original, SessionModule(runner, takes_inputs_of), inputs, rules=rules)


class SessionModule(nn.Module):
    """An onnxruntime session as a module of its first input (the per-sample one), for agreement();
    or, given `takes_inputs_of`, of that module's per-sample input, fed its inputs given once too."""

    def __init__(self, runner, takes_inputs_of: nn.Module | None = None) -> None:
        super().__init__()
        self.runner = runner
        self.output_names = [o.name for o in runner.get_outputs()]
        self.takes_inputs_of = takes_inputs_of

    def forward(self, x: Tensor):
        from rankfold.runtime import run_batched

        if self.takes_inputs_of is not None:
            from rankfold.export.graft import given_feeds_run

            values = given_feeds_run(self.runner, self.takes_inputs_of, x)
        else:
            values = run_batched(self.runner, None, self.runner.get_inputs()[0].name, x.numpy())
        outs = [torch.from_numpy(v) for v in values]
        return tuple(outs) if len(outs) > 1 else outs[0]
