"""Export a torch module to ONNX with a dynamic batch dimension (and the sizes after it that the
user's file leaves open, where the written file computes them), checked in onnxruntime."""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings

import numpy as np
import torch
from torch import Tensor, nn

from rankfold.errors import RankfoldError, first_line
from rankfold.io import replace_atomically

OPSET = 17
RTOL = 1e-4
# An output whose root-mean-square is below this is compared on this scale instead of its own, so
# that float noise (~1e-7, from intermediates of unit size) is not read as a relative error: a
# detector's sigmoid map on random input is ~1e-6 everywhere and differed between PyTorch and
# onnxruntime by 1e-7, which the relative error alone read as 19 % (PP-OCRv4's text detector at
# 128 x 128). The tolerance there is RTOL * NOISE_RMS = 1e-6 in root-mean-square.
NOISE_RMS = 1e-2


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    example_input: Tensor,
    verify: bool = True,
    opset: int = OPSET,
) -> None:
    """Write `model` to `path` as ONNX (batch dimension dynamic; a model loaded from ONNX keeps
    the input sizes its file leaves open, `dynamic_axes`, along each axis where the written file
    computes what the model computes at other sizes, _axes_fixed_in_the_file, and fixes the others).

    The file is written to a temporary name and renamed, so a failed export leaves nothing. With
    `verify`, onnxruntime runs the file on `example_input` and the export is refused when its
    output differs from PyTorch's by more than 1e-4 relative (Frobenius) error.
    """
    path = os.fspath(path)
    was_training = model.training
    model.eval()
    try:
        _export_checked(model, path, example_input, verify=verify, opset=opset)
    finally:
        model.train(was_training)


def _export_checked(model: nn.Module, path: str, example_input: Tensor, *, verify: bool, opset: int) -> None:
    input_names = list(getattr(model, "input_names", ["input"]))[:1]
    output_names = list(getattr(model, "output_names", ["output"]))
    with torch.no_grad():
        expected = model(example_input)
    if isinstance(expected, tuple):
        output_names = output_names[: len(expected)] if len(output_names) >= len(expected) else [
            f"output_{i}" for i in range(len(expected))]
    else:
        output_names = output_names[:1]
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise RankfoldError(f"{path}: the directory {directory} does not exist")
    # Exported and verified in the system's temporary directory; only the checked bytes are written
    # beside `path` (unique name, then an atomic rename), so a kill leaves nothing of it there.
    with tempfile.TemporaryDirectory(prefix="rankfold-") as scratch:
        tmp = os.path.join(scratch, "model.onnx")
        names = (input_names, output_names)
        while True:
            open_axes = {n: dict(a) for n, a in getattr(model, "dynamic_axes", {}).items() if a}
            try:
                _export_traced(model, tmp, example_input, expected, names, open_axes, verify=verify, opset=opset)
            except RankfoldError:
                if open_axes:
                    model.dynamic_axes = {}  # the sizes after the batch do not trace as symbols: fixed
                    continue
                # A batch read from another axis than the first (a sequence-first attention's
                # (T, N, E) reshapes) traces as a constant: traced again with every size a symbol
                _export_traced(model, tmp, example_input, expected, names, open_axes, verify=verify, opset=opset,
                               trace_sizes=True)
            except Exception:
                if not open_axes:
                    raise
                model.dynamic_axes = {}
                continue
            fixed = _axes_fixed_in_the_file(model, tmp, example_input, open_axes.get(input_names[0], {})) \
                if verify else {}
            if not fixed:
                break
            model.dynamic_axes = _without_axes(open_axes, input_names[0], fixed)
        computed = [tuple(y.shape) for y in (expected if isinstance(expected, tuple) else (expected,))]
        _store_transposed_copies_once(tmp)
        _declare_output_sizes(tmp, getattr(model, "declared_outputs", {}), computed)
        with open(tmp, "rb") as handle:
            replace_atomically(path, handle.read())


def _store_transposed_copies_once(path: str) -> None:
    """One matrix stored once: torch's exporter folds the transpose of a weight that a Gather reads
    too (a language model's token table tied to its head) into a second initializer; that copy is
    made a Transpose node of the first again (the same values, so what the file computes is unchanged)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    graph = model.graph
    # Candidates first by what a transpose keeps exactly (sorted shape, largest and least value),
    # decoded again only where two share it: comparing every square matrix with every other (a
    # decoder's 30 o_proj) would decode and compare them again and again
    inits = {init.name: init for init in graph.initializer
             if len(init.dims) == 2 and init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    groups: dict[tuple, list[str]] = {}
    for name, init in inits.items():
        value = numpy_helper.to_array(init)
        if value.size:
            groups.setdefault((tuple(sorted(init.dims)), float(value.max()), float(value.min())), []).append(name)
    copies: dict[str, str] = {}  # the transposed copy -> the matrix it is the transpose of
    for members in (m for m in groups.values() if len(m) > 1):
        values = {name: numpy_helper.to_array(inits[name]) for name in members}
        for index, name in enumerate(members):
            if name in copies:
                continue
            for other in members[index + 1:]:
                if other not in copies and other not in copies.values() and \
                        values[other].shape == values[name].T.shape and np.array_equal(values[other], values[name].T):
                    copies[other] = name
    if not copies:
        return
    kept = [init for init in graph.initializer if init.name not in copies]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for copy, source in copies.items():
        graph.node.insert(0, onnx.helper.make_node("Transpose", [source], [copy], name=f"{copy}:transposed"))
    onnx.save(model, path)


def _declare_output_sizes(path: str, declared: dict[str, list[int | None]], computed: list[tuple]) -> None:
    """Give the written outputs the sizes after the batch that the user's file declares where the
    trace left a symbol (YOLOv8n's 22 channels had become 'Concatoutput0_dim_1') and the model
    computes that size at the example (`computed`: its outputs' shapes, in order): tools that read
    the declared shapes see what the original promised."""
    import onnx

    if not declared:
        return
    model = onnx.load(path)
    changed = False
    for value, shape in zip(model.graph.output, computed):
        sizes = declared.get(value.name)
        dims = value.type.tensor_type.shape.dim
        if sizes is None or not len(sizes) == len(dims) == len(shape):
            continue
        for axis, (dim, size) in enumerate(zip(dims, sizes)):
            if axis > 0 and size == shape[axis] and not dim.HasField("dim_value"):
                dim.dim_value = size
                changed = True
    if changed:
        onnx.save(model, path)


def _export_traced(model: nn.Module, tmp: str, example_input: Tensor, expected, names, open_axes, *,
                   verify: bool, opset: int, trace_sizes: bool = False) -> None:
    """Trace `model` into `tmp` with its batch and `open_axes` open, verified at the example (and
    at other batches where the batch is open); `trace_sizes`: every size read as a symbol, not
    only those of open axes."""
    from rankfold.frontends.onnx_ops import sizes_traced

    input_names, output_names = names
    batch_axis = {} if getattr(model, "fixed_batch", None) is not None else {0: "batch"}
    dynamic = {name: dict(batch_axis) for name in input_names + output_names}
    for name, axes in open_axes.items():  # what the original left open stays open
        if name in dynamic:
            dynamic[name].update(axes)
    # TorchScript refuses some names ONNX allows (an exporter's numbered outputs such as "13"): the
    # graph is exported under stand-ins and given its own names back.
    stand_in = {name: f"rankfold_value_{i}" for i, name in enumerate(input_names + output_names)
                if not _torchscript_name(name)}
    input_names, output_names = ([stand_in.get(n, n) for n in names] for names in (input_names, output_names))
    dynamic = {stand_in.get(n, n): axes for n, axes in dynamic.items()}
    # A graph that computes from its input's shape is traced with the trace's batch in its
    # constants; traced at batch 1 they broadcast to any batch (Magika: traced at 2, its file
    # failed at 16 in onnxruntime). Each trace is verified at 1, 2 and 3 samples where the batch is open.
    traces = [example_input] if not batch_axis or len(example_input) == 1 else [example_input, example_input[:1]]
    for attempt, trace in enumerate(traces):
        with warnings.catch_warnings(), (sizes_traced() if open_axes or trace_sizes else contextlib.nullcontext()):
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(
                    model, (trace,), tmp, dynamo=False, opset_version=opset,
                    input_names=input_names, output_names=output_names,
                    dynamic_axes={n: axes for n, axes in dynamic.items() if axes} or None,
                    do_constant_folding=True,
                )
            except torch.onnx.errors.OnnxExporterError as exc:  # an op torch's exporter does not translate
                raise RankfoldError(f"the network cannot be written as ONNX (opset {opset}): torch.onnx says "
                                    f"{first_line(exc)}") from None
        if stand_in:
            _rename_values(tmp, {new: old for old, new in stand_in.items()})
        if not verify:
            return
        try:
            _verify_batches(model, tmp, example_input, expected, bool(batch_axis))
            return
        except RankfoldError:
            if attempt == len(traces) - 1:
                raise


# Sizes an open axis is tried at beyond the example's: odd and even steps, so that padding that
# follows the size's parity at each stride (auto_pad SAME) and sizes baked into the file both show.
SIZE_STEPS = (1, 2, 4, 8, 16, 32)


def _axes_fixed_in_the_file(model: nn.Module, path: str, example_input: Tensor, axes: dict[int, str]) -> dict[int, str]:
    """The open input axes (after the batch) along which the exported file does not compute as the
    model does: at each size of SIZE_STEPS beyond the example's that the model runs at, the file
    must agree with it; an axis the model runs at no other size along is fixed too."""
    from rankfold.runtime import session as ort_session

    session = ort_session(path)
    rtol = _tolerance(model)
    sample = example_input[:1]
    fixed = {}
    for axis, name in axes.items():
        ran = False
        for step in SIZE_STEPS:
            x = _grown(sample, axis, sample.shape[axis] + step)
            try:
                with torch.no_grad():
                    wanted = model(x)
            except Exception:  # the model itself takes no input of this size (strides, attention length)
                continue
            ran = True
            try:
                _compare(session, x, wanted, rtol)
            except Exception:  # a size baked into the file, or onnxruntime refuses the shapes
                fixed[axis] = name
                break
        if not ran:
            fixed[axis] = name
    return fixed


def _grown(x: Tensor, axis: int, size: int) -> Tensor:
    """`x` at `size` along `axis`: its own values repeated (ids stay ids, pixels stay pixels)."""
    copies = -(-size // x.shape[axis])
    return torch.cat([x] * copies, axis).narrow(axis, 0, size)


def _without_axes(open_axes: dict[str, dict[int, str]], input_name: str, fixed: dict[int, str]) -> dict:
    """The open axes once `fixed` of the input's are fixed: none at all when the input keeps none
    (the outputs' sizes then follow from fixed sizes)."""
    kept = {a: n for a, n in open_axes.get(input_name, {}).items() if a not in fixed}
    if not kept:
        return {}
    return {**open_axes, input_name: kept}


def _torchscript_name(name: str) -> bool:
    """Whether TorchScript takes `name` as a value's debug name (it refuses ones made of digits)."""
    return bool(name) and not name.isdigit()


def _rename_values(path: str, names: dict[str, str]) -> None:
    """Rename graph values (inputs, outputs and every reference to them) in the ONNX file."""
    import onnx

    model = onnx.load(path)
    graph = model.graph
    taken = {n for node in graph.node for n in node.output} | {v.name for v in graph.input}
    clashing = {n: f"{n}_rankfold_inner" for n in names.values() if n in taken}  # the new graph's own "13"
    names = {**clashing, **names}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        value.name = names.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]
    onnx.save(model, path)


# A graph that quantizes its activations at run time (DynamicQuantizeLinear) rounds them to codes:
# onnxruntime's and torch's float32 arithmetic put a few values on the other side of a rounding
# boundary, and the codes that flip move the output by about 1 % (ddddocr's int8 recogniser). The
# self-check that follows still holds the result to the original.
DYNAMIC_QUANTIZATION_RTOL = 5e-2


def _tolerance(model: nn.Module) -> float:
    steps = getattr(model, "steps", ())
    return DYNAMIC_QUANTIZATION_RTOL if any(s.op == "DynamicQuantizeLinear" for s in steps) else RTOL


def relative_error(got: np.ndarray, wanted: np.ndarray) -> float:
    """||got - wanted|| over ||wanted||, or over a unit noise floor where `wanted` is near zero
    (NOISE_RMS): how far two runs of one graph are apart. Values that are not finite (an attention
    mask's -inf) must be the same in both and are left out; one that differs (NaN where the other
    has a number) makes the error infinite. Before, inf - inf made the error NaN, which passed every
    threshold."""
    got, wanted = np.asarray(got), np.asarray(wanted)
    if got.shape == wanted.shape and got.dtype.kind == wanted.dtype.kind == "f":
        finite = np.isfinite(got) & np.isfinite(wanted)
        if not finite.all():
            alike = (got == wanted) | (np.isnan(got) & np.isnan(wanted))
            if not (alike | finite).all():
                return float("inf")
            got, wanted = got[finite], wanted[finite]
    return float(np.linalg.norm(got - wanted) / max(np.linalg.norm(wanted), NOISE_RMS * np.sqrt(max(wanted.size, 1)),
                                                    1e-30))


def _verify_batches(model: nn.Module, path: str, example_input: Tensor, expected, open_batch: bool) -> None:
    """The exported file against the model at the example, and where the batch is open at 1 and 3
    samples too (a batch baked into the file fails one of them)."""
    from rankfold.errors import first_line

    rtol = _tolerance(model)
    batches = [example_input]
    if open_batch:
        batches += [b for b in (example_input[:1], torch.cat([example_input] * 3)[:3]) if len(b) != len(example_input)]
    for batch in batches:
        try:
            with torch.no_grad():
                _verify(path, batch, expected if batch is example_input else model(batch), rtol)
        except RankfoldError:
            raise
        except Exception as exc:  # onnxruntime refuses the shapes: a batch baked into the file
            raise RankfoldError(f"the exported file does not run at a batch of {len(batch)} (a size read from the "
                                f"input's shape is baked into it): {first_line(exc)[:300]}") from None


def _verify(path: str, example_input: Tensor, expected, rtol: float = RTOL) -> None:
    from rankfold.runtime import session as ort_session

    _compare(ort_session(path), example_input, expected, rtol)


def _compare(session, example_input: Tensor, expected, rtol: float) -> None:
    feed = {session.get_inputs()[0].name: example_input.detach().cpu().numpy()}
    got = session.run(None, feed)
    wanted = expected if isinstance(expected, tuple) else (expected,)
    for g, w in zip(got, wanted):
        w = w.detach().cpu().numpy()
        if w.dtype.kind in "biu":  # a mask or indices the graph passes on: exactly
            if g.shape != w.shape or not np.array_equal(g, w):
                raise RankfoldError("exported ONNX disagrees with PyTorch on an integer or boolean output")
            continue
        err = relative_error(g, w)
        if err > rtol:
            raise RankfoldError(f"exported ONNX disagrees with PyTorch: relative error {err:.2e} > {rtol:g}")
