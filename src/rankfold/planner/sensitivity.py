"""What the planner measures on calibration data: each layer's input second moment and how
sensitive the network's output is to each of the layer's output channels.

Sensitivity is the diagonal of the Fisher information of the network's predictive distribution
(over every output) with respect to the layer's output, G_c = sum over positions of E[g_c^2], with g the gradient of
the log-likelihood of a label drawn from the network's own prediction. A change dy in the layer's
output then raises the expected KL divergence between original and compressed predictions by
about 1/2 sum_c G_c E[dy_c^2]: a per-layer loss that adds up across layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rankfold.analyze import (
    TABLES,
    PerInput,
    as_input,
    channels_last_rows,
    kept_positions,
    model_outputs,
    per_sample_shapes,
    rows_of_each_sample,
    run_checked,
)
from rankfold.gauss_newton import activation_gradients, per_sample_likelihood_loss
from rankfold.output_metric import ClassTally, HeadMetrics, OutputMetric
from rankfold.settings import calibration_batch


@dataclass
class LayerStats:
    name: str
    input_moment: Tensor  # (I, I) float64: E[x x^T] over input channel rows; a table: (rows,) frequencies
    sensitivity: Tensor  # (O,) float64: G_c, Fisher diagonal summed over output positions
    input_shape: tuple[int, ...]  # one sample's input, as the layer sees it
    output_shape: tuple[int, ...]
    # Set where the layer's softmax is an output: the apply and the loss probe factorize under it
    # (the estimates price the plain factorization, which loses more: a conservative price).
    output_metric: OutputMetric | None = None
    # A k x k convolution's taps: (k*k, k*k) correlation of its input between the kernel's
    # positions, over channels and pixels (the im2col moment ~ input_moment (x) this).
    tap_correlation: Tensor | None = None
    # Set where the layer's softmax is an output: what the calibration data reads (rankfold.exact_rows).
    class_tally: ClassTally | None = None


def _spread_taps(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.kernel_size != (1, 1)


def tap_products(module: nn.Conv2d, x: Tensor) -> Tensor:
    """Mean of x[c, p] * x[c, p + delta] over channels and pixels, for every difference delta
    between two of the kernel's positions: (2 kh - 1, 2 kw - 1), in float64."""
    (kh, kw), (dh, dw) = module.kernel_size, module.dilation
    x = x.detach().float()
    height, width = x.shape[-2:]
    products = torch.zeros(2 * kh - 1, 2 * kw - 1, dtype=torch.float64)
    for i in range(kh):  # delta_y >= 0; the other half by symmetry
        for j in range(-(kw - 1), kw):
            dy, dx = i * dh, j * dw
            if dy >= height or abs(dx) >= width:
                continue
            a = x[..., : height - dy, max(0, -dx) : width - max(0, dx)]
            b = x[..., dy:, max(0, dx) : width - max(0, -dx)]
            products[kh - 1 + i, kw - 1 + j] = products[kh - 1 - i, kw - 1 - j] = float((a * b).mean())
    return products


def tap_correlation(products: Tensor, kernel: tuple[int, int]) -> Tensor:
    """The (kh*kw, kh*kw) correlation between the kernel's positions (the weight's tap order)."""
    kh, kw = kernel
    taps = [(i, j) for i in range(kh) for j in range(kw)]
    zero = float(products[kh - 1, kw - 1])
    if not zero > 0 or not torch.isfinite(products).all():  # a dark (or overflowing) input: no correlation known
        return torch.eye(kh * kw, dtype=torch.float64)
    correlation = torch.tensor([[float(products[kh - 1 + b[0] - a[0], kw - 1 + b[1] - a[1]]) / zero for b in taps]
                                for a in taps], dtype=torch.float64)
    # Products over different crops of a small map need not make a positive semi-definite matrix
    # (a shifted crop can average more than the whole map): keep its nearest one.
    values, vectors = torch.linalg.eigh((correlation + correlation.T) / 2)
    return (vectors * values.clamp(min=0)) @ vectors.T


def _per_forward(module: nn.Module, shapes: tuple[tuple[int, ...], tuple[int, ...]],
                 calls: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A Linear layer called `calls` times per forward pass on one vector per sample (a recurrence's
    R, at every time step) costs what one call on `calls` rows costs: its shapes say so, so its MACs
    and latency are priced for the whole sequence, not for one step (RAM is then priced for the
    whole sequence too, an overestimate: the recurrence holds one step at a time)."""
    (inputs, outputs) = shapes
    if calls > 1 and isinstance(module, nn.Linear) and len(inputs) == 1:
        return (calls, *inputs), (calls, *outputs)
    return shapes


def layer_statistics(
    model: nn.Module,
    names: Iterable[str],
    calib: Tensor,
    *,
    batch_size: int | None = None,
    max_rows_per_sample: int = 256,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, LayerStats]:
    """LayerStats for every named layer the forward pass reaches (one forward+backward per batch).
    Independent of the batch size (which the memory plan chooses): labels and noise are drawn per
    sample (gauss_newton.per_sample_likelihood_loss) and input rows sampled per sample."""
    modules = dict(model.named_modules())
    names = list(names)
    moments: dict[str, Tensor] = {}
    rows_seen: dict[str, int] = {}
    grad_sq: dict[str, Tensor] = {}
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    calls: dict[str, int] = {}  # per layer, how often one forward pass calls it (a recurrence's R: every step)
    taps: dict[str, Tensor] = {}  # k x k convolutions: tap_products summed over batches
    first_batch = True
    samples, first = 1, 0  # the batch now running: its size and its first sample's index
    kept = None  # the batch's positions that its attention mask keeps (analyze.kept_positions)

    shared = PerInput()  # this batch's moment of each input tensor

    def pre_hook(module, inputs, name):
        x = inputs[0].detach()
        if isinstance(module, TABLES):  # how often each row is read
            counts = torch.bincount(x.reshape(-1), minlength=module.num_embeddings).to(torch.float64)
            moments[name] = moments.get(name, 0) + counts
            rows_seen[name] = rows_seen.get(name, 0) + x.numel()
            return
        # Layers that read one tensor (a transformer's q, k and v; gate and up) share its moment.
        def product():
            rows = rows_of_each_sample(channels_last_rows(module, x, kept), samples, first, max_rows_per_sample, seed)
            # The product in float32 (half the time of float64), summed over batches in float64.
            return (rows.T @ rows).to(torch.float64), rows.shape[0]

        moment, count = shared.get(inputs[0], type(module) is nn.Linear, product)
        moments[name] = moments.get(name, 0) + moment
        rows_seen[name] = rows_seen.get(name, 0) + count
        if _spread_taps(module):  # weighted by the batch's samples, so independent of the batching
            taps[name] = taps.get(name, 0) + tap_products(module, x) * x.shape[0]

    def post_hook(module, inputs, output, name):
        if name not in shapes:
            shapes[name] = per_sample_shapes(inputs[0].shape, output.shape, samples)
        if first_batch:
            calls[name] = calls.get(name, 0) + 1
        if output.requires_grad:
            channel_axis = -1 if isinstance(module, (nn.Linear, *TABLES)) else 1

            def on_grad(grad, name=name, axis=channel_axis):
                g = grad.detach().movedim(axis, -1)
                per_channel = (g * g).reshape(-1, g.shape[-1]).sum(0).to(torch.float64)
                grad_sq[name] = grad_sq.get(name, 0) + per_channel

            output.register_hook(on_grad)

    total = calib.shape[0]
    batch_size = batch_size or calibration_batch()
    with activation_gradients(model):
        heads = HeadMetrics(model, names, calib[:1])  # before the hooks: its probe pass adds no statistics
        kinds = tuple(getattr(model, "output_kinds", ()) or ())  # what the data cannot tell (embeddings)
        handles = []
        for name in names:
            handles.append(modules[name].register_forward_pre_hook(lambda m, i, n=name: pre_hook(m, i, n)))
            handles.append(modules[name].register_forward_hook(lambda m, i, o, n=name: post_hook(m, i, o, n)))
        try:
            for start in range(0, total, batch_size):
                if progress:
                    progress(f"sensitivity: samples {start + 1}-{min(start + batch_size, total)} of {total}")
                batch = as_input(calib[start : start + batch_size])
                samples, first = batch.shape[0], start
                kept = kept_positions(model, batch)
                shared.clear()
                if batch.is_floating_point():
                    batch.requires_grad_(True)
                with torch.enable_grad():
                    # Heads are independent given the input: the joint Fisher is the sum of theirs.
                    outs = model_outputs(run_checked(model, batch))
                    heads.add([out.detach() for out in outs])
                    loss = sum(per_sample_likelihood_loss(out, kinds[i] if i < len(kinds) else None, seed, i,
                                                          start, samples)
                               for i, out in enumerate(outs))
                    if loss.requires_grad:  # else no layer reaches an output in float (integer ops after them)
                        loss.backward()
                first_batch = False
        finally:
            for h in handles:
                h.remove()
            shared.clear()
            model.zero_grad(set_to_none=True)
    stats = {}
    metrics, tallies = heads.result(), heads.class_tallies()
    for name in names:
        if name not in moments:
            continue
        shapes[name] = _per_forward(modules[name], shapes[name], calls.get(name, 1))
        sens = grad_sq.get(name)
        out_ch = shapes[name][1][-1 if isinstance(modules[name], (nn.Linear, *TABLES)) else 0]
        sens = torch.zeros(out_ch, dtype=torch.float64) if sens is None else sens / total
        correlation = tap_correlation(taps[name], modules[name].kernel_size) if name in taps else None
        stats[name] = LayerStats(name, moments[name] / rows_seen[name], sens, *shapes[name], metrics.get(name),
                                 correlation, tallies.get(name))
    return stats
