"""How much each direction of every layer's output matters to the network's outputs: the
Gauss-Newton (Fisher) matrix of the outputs' loss with respect to the layer's output channels,
G = E[g g^T] over output positions, g the gradient of likelihood_loss (a label drawn from the
network's own prediction, a unit Gaussian around an embedding or a map), the loss the planner's
sensitivity takes too. A change dW of the layer then costs about
1/2 E[(dW x)^T G (dW x)] of the outputs' divergence, so the best rank-r weight is the truncated
SVD of G^(1/2) W C^(1/2) (C the input's second moment), unweighted on both sides: the data-aware
factorization weighs the input side only, as if every output direction counted the same.

The planner's sensitivity keeps G's diagonal; the apply factorizes under the whole of it
(output_metric.OutputMetric, as for a softmax head). Measured by bench/gauss_newton.py: MiniLM
planned at half its Linear parameters, embedding cosine 0.867 -> 0.889; ResNet-18 (Fashion-MNIST)
planned at 3 % of its parameters, top-1 0.9245 -> 0.9385.

G is C_out^2 float64 per layer, held until the layer is factorized: metric_layers gives metrics
to the narrowest layers, a whole width at a time, while all of them fit in METRIC_BYTES; wider
ones keep the input-side weighting only (SmolLM2-135M's sixty 1,536-wide feed-forward projections
would hold 1.1 GB more; MiniLM's six take 113 MB). A softmax head has its own metric.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rankfold.analyze import (
    as_input,
    channels_last_rows,
    clear_sample_axis,
    is_probability,
    model_outputs,
    run_checked,
)
from rankfold.output_metric import HeadMetrics, OutputMetric, psd_roots
from rankfold.settings import calibration_batch

METRIC_BYTES = 256 * 2**20
# Added to G's eigenvalues, relative to their mean: directions the calibration never moves
# (G rank-deficient) keep a small weight instead of none. 1e-3 to 1e-1 measured alike on MiniLM.
DAMPING = 1e-2


def likelihood_loss(output: Tensor, generator: torch.Generator, kind: str | None = None) -> Tensor:
    """-log p(y~ | x) summed over the batch, y~ drawn from the model's own prediction: its
    gradient's second moment is the Fisher information. A 2-D output is a categorical: of its
    probabilities where it holds a softmax's output, else read as class logits. Any other output
    is the mean of a unit Gaussian, softmax sequences included: a categorical per CTC frame was
    measured worse for planning (PP-OCRv4 lines read alike 0.586 -> 0.258; with the last Linear
    also priced and factorized under its output metric, 0.695 -> 0.016): its second-order losses
    fall about 20x below the measured ones for that Linear, but not for the layers before it.
    `kind`: what the model declares the output to be (output_kinds): an embedding is a Gaussian;
    next-token logits (N, T, vocabulary) a categorical at every position, so the loss is the KL
    per token between the original's and the compressed model's next-token distributions."""
    if kind == "next_token":
        logits = output.reshape(-1, output.shape[-1])
        # Inverse-CDF sampling in float32: multinomial over a 50k vocabulary is several times slower.
        cdf = F.softmax(logits.detach(), dim=-1).cumsum(-1)
        u = torch.rand(cdf.shape[0], 1, generator=generator) * cdf[:, -1:]
        labels = torch.searchsorted(cdf, u).squeeze(1).clamp_max(cdf.shape[1] - 1)
        return F.cross_entropy(logits, labels, reduction="sum")
    categorical = output.ndim == 2 and kind != "embedding"
    if categorical and is_probability(output.detach()):
        probs = output.detach().to(torch.float64).reshape(-1, output.shape[-1])
        labels = torch.multinomial(probs.clamp_min(0), 1, generator=generator).squeeze(1)
        log_p = torch.log(output.reshape(-1, output.shape[-1]).clamp_min(1e-30))
        return F.nll_loss(log_p, labels, reduction="sum")
    if categorical:
        probs = F.softmax(output.detach().to(torch.float64), dim=1)
        labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return F.cross_entropy(output, labels, reduction="sum")
    noise = torch.randn(output.shape, generator=generator, dtype=output.dtype)
    if output.ndim >= 3 and not is_probability(output.detach()):
        # A map's channels (axis 1) each in their own units: a detector head's box coordinates
        # (pixels) would otherwise outweigh its class scores (0..1) some 10^4 times, and the plan
        # would spend the scores (YOLOv8n at half its parameters: score IoU 0.38).
        spread = channel_spread(output.detach())
        return 0.5 * (((output - (output.detach() + noise * spread)) / spread) ** 2).sum()
    return 0.5 * ((output - (output.detach() + noise)) ** 2).sum()


def channel_spread(output: Tensor) -> Tensor:
    """Per channel (axis 1) of a batch of maps, the standard deviation over samples and positions,
    at least a tenth of the channel's RMS (a near-constant channel is not made decisive) and
    1e-6 of the largest (an all-zero one neither); shaped to broadcast against `output`."""
    rows = output.movedim(1, -1).reshape(-1, output.shape[1]).to(torch.float64)
    spread = torch.maximum(rows.std(0, correction=0), 0.1 * rows.pow(2).mean(0).sqrt())
    spread = spread.clamp_min(1e-6 * float(spread.max()) + 1e-30)
    return spread.to(output.dtype).reshape(1, -1, *([1] * (output.ndim - 2)))


def _start_the_graph(_module: nn.Module, inputs: tuple):
    """A forward pre-hook: a float first input that no gradient reaches becomes a leaf that takes one."""
    x = inputs[0] if inputs else None
    if isinstance(x, Tensor) and x.is_floating_point() and not x.requires_grad and torch.is_grad_enabled():
        return (x.detach().requires_grad_(True), *inputs[1:])
    return None


@contextlib.contextmanager
def activation_gradients(model: nn.Module) -> Iterator[None]:
    """The model in eval mode, its weights frozen, for backward passes that give gradients with
    respect to activations only (the weights' own, half the backward's work and all of it for a
    language model's head, are never read). Token ids take no gradient, so there the embeddings'
    outputs start the graph: their hooks are registered on entry, before any hook the caller adds
    inside (a table's own statistics hook finds its output already in the graph). All restored
    on exit."""
    was_training = model.training
    model.eval()
    handles = [m.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
               for m in model.modules() if isinstance(m, nn.Embedding)]
    # An integer input made float inside the graph (a one-hot, a cast, a constant table read by
    # Gather) reaches a weighted layer with no graph behind it: start the graph there, or every
    # layer's sensitivity reads zero (Magika's bytes did: every plan took the smallest options).
    handles += [m.register_forward_pre_hook(_start_the_graph) for m in model.modules()
                if not isinstance(m, nn.Embedding) and next(m.parameters(recurse=False), None) is not None]
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)


def _output_channels(module: nn.Module) -> int | None:
    """Output channels of a layer whose factorization can end in a pointwise map onto them."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1:
        return module.out_channels
    return None


def metric_layers(modules: Mapping[str, nn.Module], names: Iterable[str], budget: int = METRIC_BYTES) -> list[str]:
    """The named layers that get a Gauss-Newton metric: the narrowest first, each width whole (the
    layers of one width alike, so a model's blocks are treated alike), while their G matrices
    (C_out^2 float64 each) fit in `budget` bytes together."""
    widths: dict[int, list[str]] = {}
    for name in names:
        width = _output_channels(modules[name])
        if width is not None:
            widths.setdefault(width, []).append(name)
    chosen, held = [], 0
    for width in sorted(widths):
        held += len(widths[width]) * width * width * 8
        if held > budget:
            break
        chosen += widths[width]
    chosen_set = set(chosen)
    return [name for name in names if name in chosen_set]


def dense_metric(moment: Tensor, damping: float = DAMPING) -> OutputMetric | None:
    """OutputMetric with M^T M = G + damping * mean eigenvalue; None where G is zero (the
    layer reaches no output through a gradient)."""
    mean = float(torch.diagonal(moment).mean())  # the mean eigenvalue
    if not mean > 0.0:
        return None
    return OutputMetric(torch.arange(moment.shape[0]), *psd_roots(moment, damping * mean), 1.0)


def per_sample_likelihood_loss(output: Tensor, kind: str | None, seed: int, which: int, first: int,
                               samples: int) -> Tensor:
    """likelihood_loss of each sample of a batch on its own, its labels or noise drawn from a
    generator seeded by the sample's index in the calibration data (and the output's): the metric
    then does not depend on how the samples were batched (compress's max_memory chooses that).
    The samples run along the output's first axis, or the one axis of the batch's size (a
    sequence-first (T, N, classes) output); an output with neither is drawn whole."""
    def generator(index: int) -> torch.Generator:
        return torch.Generator().manual_seed(((seed * 1_000_003 + index) * 64 + which) % 2**63)

    # labels, indices, masks: nothing a gradient reaches; a decoder's key / value caches (declared):
    # its logits judge it, and a plan spent on keeping 60 caches near the original's is not spent
    # on its next-token distribution (SmolLM2's ONNX file at a tenth fewer block parameters: x1.84)
    if not output.dtype.is_floating_point or kind == "cache":
        return output.new_zeros((), dtype=torch.float32)
    axis = clear_sample_axis(tuple(output.shape), samples)
    if axis is None:
        return likelihood_loss(output, generator(first), kind)
    return sum(likelihood_loss(output.narrow(axis, i, 1), generator(first + i), kind) for i in range(samples))


class OutputMetrics(Mapping):
    """Layer name -> OutputMetric: the heads' ready, the Gauss-Newton ones made when asked for
    (held as G alone: a metric holds two matrices of G's size)."""

    def __init__(self, heads: dict[str, OutputMetric], moments: dict[str, Tensor]) -> None:
        self.heads, self.moments = heads, moments

    def __getitem__(self, name: str) -> OutputMetric:
        if name in self.heads:
            return self.heads[name]
        metric = dense_metric(self.moments[name]) if name in self.moments else None
        if metric is None:
            raise KeyError(name)
        return metric

    def __iter__(self) -> Iterator[str]:
        yield from self.heads
        yield from (name for name in self.moments if name not in self.heads)

    def __len__(self) -> int:
        return len(set(self.heads) | set(self.moments))


def output_metrics(model: nn.Module, names: Iterable[str], calib: Tensor, *, batch_size: int | None = None,
                   seed: int = 0, progress: Callable[[str], None] | None = None) -> Mapping[str, OutputMetric]:
    """The metric each named layer is factorized under, from one forward and backward pass over
    `calib`: a softmax head's own (output_metric.HeadMetrics), else the Gauss-Newton one where
    metric_layers chooses. Deterministic (seeded labels and noise); layers no gradient reaches get none."""
    names = list(names)
    modules = dict(model.named_modules())
    heads = HeadMetrics(model, names, calib[:1])
    dense = metric_layers(modules, [n for n in names if n not in heads.heads])
    if not heads.heads and not dense:
        return OutputMetrics({}, {})
    moments: dict[str, Tensor] = {}

    def on_output(module, _inputs, output, name):
        if not output.requires_grad:
            return
        def on_grad(grad):
            # Every row (no sample of them: that would depend on the batch), as input channels are.
            rows = channels_last_rows(module, grad.detach()).to(torch.float32)
            moments[name] = moments.get(name, 0) + (rows.T @ rows).to(torch.float64)

        output.register_hook(on_grad)

    kinds = tuple(getattr(model, "output_kinds", ()) or ())
    batch_size = batch_size or calibration_batch()
    with activation_gradients(model), contextlib.ExitStack() as hooks:
        for n in dense:
            hooks.callback(modules[n].register_forward_hook(lambda m, i, o, n=n: on_output(m, i, o, n)).remove)
        for start in range(0, calib.shape[0], batch_size):
            if progress and dense:
                progress(f"output metrics: samples {start + 1}-{min(start + batch_size, calib.shape[0])} "
                         f"of {calib.shape[0]}")
            batch = as_input(calib[start : start + batch_size])
            if batch.is_floating_point():
                batch.requires_grad_(True)
            with torch.enable_grad():
                outs = model_outputs(run_checked(model, batch))
                heads.add([out.detach() for out in outs])
                loss = sum(per_sample_likelihood_loss(out, kinds[k] if k < len(kinds) else None, seed, k, start,
                                                      len(batch))
                           for k, out in enumerate(outs))
                if dense and loss.requires_grad:
                    loss.backward()
    return OutputMetrics(heads.result(), {name: m for name, m in moments.items() if bool(m.abs().max() > 0)})
