"""Calibration statistics: layer inputs of the original and the partly compressed network."""

from __future__ import annotations

import collections
import contextlib
import functools
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rankfold.errors import RankfoldError, first_line
from rankfold.layers import ColumnBlocks, ExactRows
from rankfold.settings import calibration_batch

COMPRESSIBLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
# Tables the planner may quantize (never factorize): their rows are read by index, not multiplied.
TABLES = (nn.Embedding,)
def takes_weight_groups(module: nn.Module) -> bool:
    """Whether int4 groups along the input (DequantizeLinear's blocks on axis 1) fit the layer's
    weight: a Linear, a table, or a pointwise (1x1) convolution, which is a Linear on every
    position. A kxk convolution's input axis is not contiguous in its taps, and a grouped
    (depthwise) one has a handful of inputs per channel."""
    if isinstance(module, (nn.Linear, *TABLES)):
        return True
    return isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1 and \
        all(k == 1 for k in module.kernel_size)


# Modules that read a child layer's weight directly instead of calling it: replacing that child
# would break them (nn.MultiheadAttention hands out_proj.weight to F.multi_head_attention_forward).
WEIGHT_READERS = (nn.MultiheadAttention,)


@contextlib.contextmanager
def in_eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode (dropout off, batch norms on their running statistics) for the block,
    its training mode as it was after it, however the block ends."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def untouchable_layers(model: nn.Module) -> dict[str, str]:
    """Compressible layers that must stay as they are, by name, with the reason: those a parent
    reads the weight of directly, and those whose weight is tied to another module's (a language
    model's head and its token embedding): replacing one would untie them and store the matrix twice."""
    found = {}
    for name, first in tied_names(model).items():
        if not (name.endswith(".weight") and first.endswith(".weight")):
            continue
        for layer, other in ((name[: -len(".weight")], first), (first[: -len(".weight")], name)):
            if isinstance(model.get_submodule(layer), COMPRESSIBLE):
                found[layer] = (f"its weight is tied to {other[: -len('.weight')]}'s: kept, so that the tie (one "
                                "stored matrix) holds")
    for parent_name, parent in model.named_modules():
        if isinstance(parent, WEIGHT_READERS):
            for child_name, child in parent.named_children():
                if isinstance(child, COMPRESSIBLE):
                    name = f"{parent_name}.{child_name}" if parent_name else child_name
                    found[name] = f"its {type(parent).__name__} reads .weight directly: not replaceable"
    return found

class PerInput:
    """Values computed once per input tensor during one batch (a transformer's q, k and v read one
    tensor and share its moment). Keyed by the tensor object, checked through a weak reference:
    its address alone would not do, as a freed input's memory may hold the next layer's input."""

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[weakref.ref, object]] = {}

    def get(self, tensor: Tensor, kind: object, compute: Callable[[], object]) -> object:
        key = (id(tensor), kind)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is tensor:
            return entry[1]
        value = compute()
        self._entries[key] = (weakref.ref(tensor), value)
        return value

    def clear(self) -> None:
        self._entries.clear()


def tied_names(module: nn.Module) -> dict[str, str]:
    """State-dict names whose tensor is another, earlier name's (a language model's head tied to its
    token embedding), each mapped to that first name."""
    first: dict[int, str] = {}
    tied = {}
    for name, value in module.state_dict(keep_vars=True).items():
        if id(value) in first:
            tied[name] = first[id(value)]
        else:
            first[id(value)] = name
    return tied


# Channel rows kept per layer for the moments: beyond this the estimates do not change, but the
# cost (and memory) of the moment products would keep growing with the data.
MAX_ROWS = 131072


def channels_last_rows(module: nn.Module, x: Tensor, positions: Tensor | None = None) -> Tensor:
    """The layer input as rows of channel vectors: (N * positions, C_in). With `positions` ((N, T)
    bool: the tokens each sample's attention mask keeps), a Linear's rows of (N, T, C) keep only
    those: padded positions are computed but read by nothing (attention masks them, pooling skips
    them), and in batches padded to one length they are most of the rows."""
    if isinstance(module, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
        if positions is not None and rows.shape[0] == positions.numel():
            return rows[positions.reshape(-1)]
        return rows
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def kept_positions(model: nn.Module, batch: Tensor) -> Tensor | None:
    """The positions of `batch` that its attention mask keeps, where the model reads token ids and
    a mask packed as one input (rankfold.frontends.packing); None otherwise: every row counts."""
    packing = getattr(model, "packing", None)
    return None if packing is None else packing.kept_positions(batch)


def model_outputs(out) -> list[Tensor]:
    """Every output of a forward pass as a list (a model may return one tensor or a tuple)."""
    return list(out) if isinstance(out, (tuple, list)) else [out]


def is_probability(y: Tensor) -> bool:
    """Whether `y` holds probabilities over its last axis (a softmax's output)."""
    if y.ndim < 2 or y.shape[-1] < 2 or not y.numel() or not bool(((y >= 0) & (y <= 1)).all()):
        return False
    return bool(((y.sum(-1) - 1).abs() < 1e-3).all())


def as_input(x: Tensor) -> Tensor:
    """Calibration data as a model takes it: float32 for real-valued inputs; integer inputs (token
    ids) keep their dtype."""
    return x.to(torch.float32) if x.is_floating_point() else x


# Logits read as class decisions only where the original decides: the mean largest softmax
# probability over positions is at least this (CTC frames: mostly a confident blank; a spectrum or
# a feature projection spreads its softmax thin).
DECISIVE_PROBABILITY = 0.5


def ctc_blank(frames: Tensor) -> int | None:
    """The blank class of (..., T, classes) CTC frames: the class most positions pick, where that is
    the first (PyTorch's and Paddle's convention) or the last (TensorFlow's; captcha-whisperer's
    CRNN); None where it is neither."""
    flat = frames.detach().reshape(-1, frames.shape[-1])
    if flat.shape[0] == 0 or flat.shape[1] < 2:
        return None
    most = int(torch.bincount(flat.argmax(-1), minlength=flat.shape[1]).argmax())
    # Of two classes the last is no blank: a tagger's (begin, inside) emissions are read position by position.
    return most if most == 0 or most == flat.shape[1] - 1 > 1 else None


def is_ctc_logits(logits: Tensor) -> bool:
    """Whether `logits` (..., T, classes) read like a CTC recogniser's frames: the original decides
    (its softmax puts on average at least DECISIVE_PROBABILITY on the largest class) and the blank,
    the first or the last class, is the class most positions pick (ctc_blank). A language model's
    token logits and projections that decide nothing are not."""
    flat = logits.detach().to(torch.float64).reshape(-1, logits.shape[-1])
    if flat.shape[0] == 0 or flat.shape[1] < 2:
        return False
    if float(torch.softmax(flat, -1).amax(-1).mean()) < DECISIVE_PROBABILITY:
        return False
    return ctc_blank(flat) is not None


def sample_axis(shape: tuple[int, ...], batch: int) -> int:
    """The axis of an output that runs over the samples of a batch of `batch`: the first, unless it
    differs from `batch` and exactly one other axis has that size (a sequence-first (T, N, classes)
    recogniser, a batch-1 graph's (T, 1, classes))."""
    axis = clear_sample_axis(shape, batch)
    return 0 if axis is None else axis


def clear_sample_axis(shape: tuple[int, ...], batch: int) -> int | None:
    """sample_axis where the shape tells it: the first axis when it is the batch's, else the one
    axis of the batch's size; None when no axis or several have it. Never the last axis of a
    layer's tensor of two or more axes: that holds a Linear's features, a convolution's width
    (silero VAD's LSTM state, (1, 64), read as 64 samples of 1 feature in batches of 64)."""
    if shape and shape[0] == batch:
        return 0
    hits = [axis for axis, size in enumerate(shape[:-1] if len(shape) > 1 else shape) if size == batch]
    return hits[0] if len(hits) == 1 else None


def _one_sample(shape: tuple[int, ...], axis: int | None, batch: int) -> tuple[int, ...]:
    if axis is not None:
        return shape[:axis] + shape[axis + 1 :]
    if shape and shape[0] % batch == 0:  # samples merged with another axis, (N*T, C), or squeezed away
        return (shape[0] // batch, *shape[1:])
    return shape[1:]


def per_sample_shapes(input_shape: tuple[int, ...], output_shape: tuple[int, ...],
                      batch: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A layer's input and output shapes for one sample of a batch of `batch`, without the sample
    axis wherever it is: a sequence-first (T, N, C) tensor keeps T (ddddocr's head and LSTM input
    projection were priced for one step of 32 when the first axis was dropped); a first axis that
    merges the samples with another, (N*T, C), gives (T, C), and so does a batch-1 graph's (T, C)
    that squeezed its batch away. A Linear or a convolution keeps the sample axis where it was, so
    where the input's channels equal the batch, the output's axis decides."""
    inputs, outputs = tuple(input_shape), tuple(output_shape)
    axis_in, axis_out = clear_sample_axis(inputs, batch), clear_sample_axis(outputs, batch)
    if len(inputs) == len(outputs):
        axis_in = axis_out = axis_out if axis_out is not None else axis_in
    return _one_sample(inputs, axis_in, batch), _one_sample(outputs, axis_out, batch)


def output_kind(y: Tensor, logits: bool = False) -> str:
    """'classes' for (N, classes) scores; for a softmax over the last axis of a longer output,
    'sequence' when it is (N, T, classes) (tokens, CTC frames) and 'distribution' otherwise (a
    per-pixel class map); 'dense' for everything else (feature maps, regressions, detector heads,
    probability maps). `logits`: `y` is a Linear layer's output (logit_outputs), and an (N, T,
    classes) one is a sequence where it reads like CTC frames (is_ctc_logits: a recogniser that
    exports no softmax)."""
    if y.ndim == 2 and y.shape[1] > 1:
        return "classes"
    if y.ndim >= 3 and is_probability(y):
        return "sequence" if y.ndim == 3 else "distribution"
    if logits and y.ndim == 3 and is_ctc_logits(y):
        return "sequence"
    return "dense"


def linear_and_model_outputs(model: nn.Module, probe: Tensor,
                             names: Iterable[str] | None = None) -> tuple[dict[str, Tensor], list[Tensor]]:
    """One pass on `probe`: the output of every nn.Linear (those named, or all), and the model's."""
    modules = dict(model.named_modules())
    chosen = [n for n, m in modules.items() if isinstance(m, nn.Linear)] if names is None else \
        [n for n in names if isinstance(modules.get(n), nn.Linear)]
    seen: dict[str, Tensor] = {}
    outputs: list[Tensor] = []
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: seen.setdefault(n, o.detach())) for n in chosen]
    if handles:
        handles.append(model.register_forward_hook(lambda m, i, o: outputs.extend(model_outputs(o))))
        run_hooked(model, probe, handles)
    return seen, outputs


def _affine_per_class(y: Tensor, z: Tensor) -> bool:
    """Whether y = a_c z + b_c along the last axis (one scale and shift per class, fitted over the
    positions): a Linear's output as it is, or scaled and shifted as an int8 graph's dequantizing
    Mul and Add do (ddddocr's int8 recogniser)."""
    if y.ndim == 0 or z.ndim == 0 or y.numel() != z.numel() or y.shape[-1] != z.shape[-1]:
        return False  # a 0-d score (PLCMOS's one value at one sample) is no class axis
    ys, zs = (t.detach().to(torch.float64).reshape(-1, y.shape[-1]) for t in (y, z))
    if ys.shape[0] < 3:
        return bool(torch.allclose(zs, ys, rtol=1e-5, atol=1e-6))
    yc, zc = ys - ys.mean(0), zs - zs.mean(0)
    scale = (yc * zc).sum(0) / (zc * zc).sum(0).clamp_min(1e-30)
    return float((yc - scale * zc).norm()) <= 1e-5 * max(float(yc.norm()), 1e-30)


def logit_outputs(model: nn.Module, probe: Tensor) -> set[int]:
    """The outputs of `model` (by index) that are some Linear layer's output, as it is or scaled and
    shifted per class (_affine_per_class), over the same last axis: logits, where a network exports
    no softmax."""
    seen, outputs = linear_and_model_outputs(model, as_input(probe))
    return {index for index, y in enumerate(outputs) if any(_affine_per_class(y, z) for z in seen.values())}


def run_checked(model: nn.Module, x: Tensor) -> Tensor:
    """Run `model` on `x`, turning a shape mismatch into a RankfoldError that says so."""
    try:
        return model(x)
    except RuntimeError as exc:
        raise RankfoldError(
            f"calibration/example data of shape {tuple(x.shape)} does not fit the model: {first_line(exc)}"
        ) from None


def run_hooked(model: nn.Module, x: Tensor, handles: list) -> None:
    """One forward pass without gradients for the hooks in `handles`, which are removed afterwards."""
    try:
        with torch.no_grad():
            run_checked(model, x)
    finally:
        for h in handles:
            h.remove()


def sampled_rows(rows: int, limit: int, seed: int = 1) -> Tensor | None:
    """A fixed random subset of row indices (None: keep all), so two passes pick the same rows."""
    if rows <= limit:
        return None
    return torch.randperm(rows, generator=torch.Generator().manual_seed(seed))[:limit]


@functools.lru_cache(maxsize=16)
def _position_order(positions: int, seed: int) -> Tensor:
    """The fixed permutation rows_of_each_sample walks: made once per map size, not per sample and
    layer (a 640x640 page's is 409,600 long). Read only."""
    return torch.randperm(positions, generator=torch.Generator().manual_seed(seed))


def positions_of_sample(per_sample: int, index: int, limit: int, seed: int = 1) -> Tensor | None:
    """The positions (of `per_sample`) whose rows rows_of_each_sample keeps of the sample at
    `index` of the calibration data; None: all of them."""
    if per_sample <= limit:
        return None
    return _position_order(per_sample, seed)[(index * limit + torch.arange(limit)) % per_sample]


def rows_of_each_sample(rows: Tensor, samples: int, first: int, limit: int, seed: int = 1) -> Tensor:
    """At most `limit` of each sample's rows, from rows that list a batch's samples one after the
    other (channel rows: a Linear's (N, ..., C), a convolution's (N, H, W, C)). Which rows a sample
    gives is fixed by its index in the calibration data (`first`: the batch's first), so sums over a
    pass do not depend on how the pass was batched (the memory plan chooses that): one fixed
    permutation of the positions, each sample taking the next `limit` of it."""
    per_sample = rows.shape[0] // max(samples, 1)
    if per_sample <= limit:
        return rows
    if per_sample * samples != rows.shape[0]:  # not one block per sample: a fixed subset of the batch's
        index = sampled_rows(rows.shape[0], limit * samples, seed)
        return rows if index is None else rows[index]
    kept = torch.stack([positions_of_sample(per_sample, first + i, limit, seed) for i in range(samples)])
    return rows[(kept + torch.arange(samples)[:, None] * per_sample).reshape(-1)]


class _Reached(Exception):
    """Raised by a pre-hook to end a forward pass as soon as the layer of interest has its input."""


def reach_order(model: nn.Module, names: Iterable[str], example: Tensor) -> list[str]:
    """The named layers in the order a forward pass on `example` first calls them (layers it never
    calls are absent)."""
    modules = dict(model.named_modules())
    reached: list[str] = []

    def hook(name: str) -> None:
        if name not in reached:
            reached.append(name)

    run_hooked(model, example, [modules[n].register_forward_pre_hook(lambda m, i, n=n: hook(n)) for n in names])
    return reached


def layer_input(model: nn.Module, name: str, batch: Tensor) -> Tensor | None:
    """The input the layer `name` first sees on `batch`, the forward pass stopped there (None: the
    pass never calls it). Nothing after the layer runs, so nothing after it is held in memory."""
    return first_input(model.get_submodule(name), lambda: run_checked(model, batch))


def every_input(model: nn.Module, name: str, batch: Tensor) -> Tensor | None:
    """The inputs of every call of layer `name` in one pass on `batch`, on the first axis sample
    by sample (each sample's calls together, as rows_of_each_sample reads them; None: never called)."""
    seen: list[Tensor] = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].detach()))
    try:
        with torch.no_grad():
            run_checked(model, batch)
    finally:
        handle.remove()
    if not seen:
        return None
    if all(x.shape == seen[0].shape for x in seen) and seen[0].ndim >= 1:
        return torch.stack(seen, 1).flatten(0, 1)
    return torch.cat(seen)


def first_input(layer: nn.Module, run: Callable[[], object]) -> Tensor | None:
    """The input `layer` first sees while `run()` runs (without gradients), stopped there."""
    seen: list[Tensor] = []

    def hook(_module, inputs):
        seen.append(inputs[0].detach())
        raise _Reached

    handle = layer.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            run()
    except _Reached:
        pass
    finally:
        handle.remove()
    return seen[0] if seen else None


@dataclass
class InputMoments:
    """A layer's input moments over the calibration set, the original network against the partly
    compressed one (x: the rows the original layer saw, x^: those it sees now)."""

    cross: Tensor  # E[x x^^T], float64
    auto: Tensor  # E[x^ x^^T], float64
    rows: int


def streamed_input_moments(
    original: nn.Module | None, current: nn.Module, name: str, calib: Tensor, *,
    batch_size: int | None = None, max_rows: int = MAX_ROWS, every_call: bool = False,
) -> InputMoments | None:
    """InputMoments of layer `name` over `calib`, one batch at a time: memory is that of one batch
    up to the layer, whatever the number of samples. About `max_rows` channel rows in all, a fixed
    subset of each sample's (the same rows of x and x^: rows_of_each_sample). None when a pass
    never reaches the layer.
    `original` None: nothing has changed yet, x = x^ (one pass instead of two). `every_call`: the
    inputs of all the layer's calls in a pass, whole passes (a recurrence's R, called per step)."""
    batch_size = batch_size or calibration_batch()
    read = every_input if every_call else layer_input
    starts = range(0, calib.shape[0], batch_size)

    def pairs():
        for start in starts:
            batch = calib[start : start + batch_size]
            x_hat = read(current, name, batch)
            yield (x_hat if original is None else read(original, name, batch)), x_hat

    positions = [kept_positions(current, calib[start : start + batch_size]) for start in starts]
    return moments_of(current.get_submodule(name), pairs(), calib.shape[0], same=original is None,
                      max_rows=max_rows, positions=positions)


def moments_of(module: nn.Module, pairs: Iterable[tuple[Tensor | None, Tensor | None]], total: int, *,
               same: bool, max_rows: int = MAX_ROWS, positions: list[Tensor | None] | None = None,
               ) -> InputMoments | None:
    """InputMoments from (x, x^) per batch (`same`: x is x^, so the cross moment is the auto one;
    `positions`: each batch's tokens that count, channels_last_rows)."""
    cross = auto = None
    rows_used = start = 0
    limit = max(1, max_rows // total)  # rows a sample gives: the same subset of x and x^
    for index, (x, x_hat) in enumerate(pairs):
        if x is None or x_hat is None:
            return None
        samples = x_hat.shape[0]
        kept = positions[index] if positions else None
        r = rows_of_each_sample(channels_last_rows(module, x, kept), samples, start, limit)
        r_hat = rows_of_each_sample(channels_last_rows(module, x_hat, kept), samples, start, limit)
        start += samples
        # Each batch's product in float32 (a fraction of float64's time on rows of thousands of
        # channels), summed over batches in float64.
        part = (r_hat.T @ r_hat).to(torch.float64)
        auto = part if auto is None else auto + part
        if not same:
            part = (r.T @ r_hat).to(torch.float64)
            cross = part if cross is None else cross + part
        rows_used += r_hat.shape[0]
    if auto is None:
        return None
    cross = auto if cross is None else cross
    return InputMoments(cross / rows_used, auto / rows_used, rows_used)


class GraphCursor:
    """An ONNX graph's values part-way through its steps, for every batch of the calibration data:
    the layers' inputs in the order the graph calls them cost one forward pass in all, instead of
    one pass up to each layer. Holds only the values still to be read."""

    def __init__(self, model, calib: Tensor, batch_size: int) -> None:
        self.model = model
        self.envs = [model.start(calib[i : i + batch_size]) for i in range(0, calib.shape[0], batch_size)]
        self.at = 0
        self.last_reads = model.last_reads()

    def step_of(self, name: str) -> int | None:
        """The step that calls layer `name`, or the ColumnBlocks or ExactRows of which it is a part
        (it reads that step's input)."""
        parent, _, _ = name.rpartition(".blocks.")
        if parent and not isinstance(self.model.get_submodule(parent), ColumnBlocks):
            parent = ""
        owner, _, _ = name.rpartition(".")
        if not parent and owner and isinstance(self.model.get_submodule(owner), ExactRows):
            parent = owner
        called = parent or name
        return next((i for i, s in enumerate(self.model.steps) if s.module == called and i >= self.at), None)

    def inputs_of(self, name: str) -> list[Tensor] | None:
        """Advance to layer `name`'s step and give its input in every batch (None: not ahead)."""
        index = self.step_of(name)
        if index is None:
            return None
        self.advance_to(index)
        return [self.model.layer_argument(env, index).detach() for env in self.envs]

    def advance_to(self, index: int) -> None:
        """Run the steps before step `index` (the layers as they are now) in every batch."""
        with torch.no_grad():
            for env in self.envs:
                self.model.advance(env, self.at, index)
        self.at = index

    def outputs_from_here(self) -> list[list[Tensor]]:
        """The graph's outputs in every batch, running the rest of the steps on a copy of the held
        values (the cursor stays where it is; the steps read their inputs and never change them)."""
        outputs = []
        with torch.no_grad():
            for env in self.envs:
                rest = dict(env)
                self.model.advance(rest, self.at, len(self.model.steps))
                outputs.append(self.model.outputs_in(rest))
        return outputs


def layers_called_by_ops(model: nn.Module) -> set[str]:
    """Layers an ONNX graph's ops call themselves (a recurrence's R, at every step): no graph step
    carries their input, so GraphCursors cannot give it; and layers several steps call (nodes
    sharing their weights), whose moments are of every call's input, where a cursor gives the first."""
    steps = getattr(model, "steps", ())
    calls = collections.Counter(step.module for step in steps if step.module is not None)
    return ({name for step in steps for name in step.attrs.get("_layers", ())}
            | {name for name, count in calls.items() if count > 1})


def peak_state_bytes(model, example: Tensor) -> int:
    """The most bytes of graph values alive at once between two steps, for the samples of `example`
    (what a GraphCursor holds per batch of that size), buffers excluded."""
    env = model.start(example)
    constants = {id(getattr(model, b)) for b in model.buffer_of.values()}
    peak = 0

    def measure(_index, _step, outs) -> None:
        nonlocal peak
        live = sum(v.numel() * v.element_size() for v in [*env.values(), *outs]
                   if isinstance(v, Tensor) and id(v) not in constants)
        peak = max(peak, live)

    with torch.no_grad():
        for index in range(len(model.steps)):
            model.advance(env, index, index + 1, observe=measure)
    return peak


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
