"""Several graph inputs that differ per sample (token ids with a padding mask), carried as one.

rankfold calibrates, plans and checks through one per-sample tensor. A graph whose inputs differ
per sample is read through a packed copy (packed_model): with one per-sample shape (ids,
attention mask and token types of one padded length), one float32 input (N, k, ...) whose k
slices, cast back to each input's type, are the original inputs (their open sizes stay open);
with different shapes (audio features and a rater's embedding), one (N, D) input of each
sample's values flattened one after the other (the result takes those sizes only). The integers
such inputs hold (ids below a vocabulary size, 0/1 masks) are exact in float32 up to 2**24; larger
ones are refused. The file a result writes takes the original inputs again (unpacked_model), by
name and type, as the user's file does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from rankfold.errors import RankfoldError

PACKED = "rankfold_packed"  # the packed input's name, inside rankfold only
EXACT_IN_FLOAT32 = 2**24  # every integer of smaller magnitude is exact in float32
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)


@dataclass(frozen=True, eq=False)
class Packing:
    """The inputs packed, in slot order, as the graph declares them (name, type, dims), and the
    packed input's name (one the graph does not use: a result of rankfold packed again)."""

    inputs: tuple[onnx.ValueInfoProto, ...]
    name: str = PACKED
    # Each input's per-sample shape where they differ (flattened one after another), None where
    # they share one (stacked on axis 1)
    shapes: tuple[tuple[int, ...], ...] | None = None

    def spans(self) -> list[tuple[int, int]]:
        """Each flattened input's [start, stop) in a packed sample."""
        sizes = [int(np.prod(shape)) for shape in self.shapes or ()]
        starts = np.cumsum([0, *sizes]).tolist()
        return list(zip(starts[:-1], starts[1:]))

    @property
    def names(self) -> list[str]:
        return [value.name for value in self.inputs]

    @property
    def integer(self) -> bool:
        """Whether an input packed is integer or bool (token ids, a mask), not float."""
        return any(value.type.tensor_type.elem_type not in FLOAT_TYPES for value in self.inputs)

    def describe(self) -> str:
        return (f"inputs {', '.join(self.names)} differ per sample: calibrated together as one packed tensor; "
                "the result takes them as the file does")

    def mask_slot(self) -> int | None:
        """The slot of an attention mask that marks real tokens with 1 (an integer or bool input
        named like a mask, as exporters name it: attention_mask, input_mask; not a padding mask,
        which marks the padding), in the stacked layout only; None when there is none."""
        if self.shapes is not None:
            return None
        for slot, value in enumerate(self.inputs):
            name = value.name.lower()
            if "mask" in name and "padding" not in name and value.type.tensor_type.elem_type not in FLOAT_TYPES:
                return slot
        return None

    def kept_positions(self, batch: torch.Tensor) -> torch.Tensor | None:
        """(N, T) bool: the positions each sample's attention mask keeps, for a packed batch (N, k, T);
        None without such a mask, or where it is not 0/1 or keeps no position of some sample."""
        slot = self.mask_slot()
        if slot is None or batch.ndim != 3:
            return None
        mask = batch[:, slot]
        if not bool(((mask == 0) | (mask == 1)).all()):
            return None
        kept = mask > 0.5
        return kept if bool(kept.any(1).all()) else None


def packing_for(model: onnx.ModelProto, names: list[str], shapes=None) -> Packing:
    """The Packing of the graph inputs `names` of `model` (`shapes`: as Dataset.packed_shapes)."""
    declared = {value.name: value for value in model.graph.input}
    used = {*declared, *(out for node in model.graph.node for out in node.output),
            *(init.name for init in model.graph.initializer)}
    name, suffix = PACKED, 1
    while name in used:
        name, suffix = f"{PACKED}_{suffix}", suffix + 1
    return Packing(tuple(declared[n] for n in names), name, tuple(map(tuple, shapes)) if shapes else None)


def pack_arrays(path: str, names: list[str], arrays: dict[str, np.ndarray]
                ) -> tuple[np.ndarray, tuple[tuple[int, ...], ...] | None]:
    """The arrays `names` as float32: stacked on axis 1 (N, k, ...) where their shapes agree, else
    each sample's values flattened one after the other (N, D), with the per-sample shapes (the
    layout's Packing.shapes); refused by name where an integer would not come back exactly."""
    for name in names:
        value = arrays[name]
        if value.dtype.kind in "iu" and value.size and np.abs(value.astype(np.int64)).max() >= EXACT_IN_FLOAT32:
            raise RankfoldError(f"{path}: '{name}' holds integers up to {int(np.abs(value).max()):,}: inputs that "
                                f"differ per sample beside another are carried in float32, exact below "
                                f"{EXACT_IN_FLOAT32:,}")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise RankfoldError(f"{path}: '{name}' has NaN or infinite values")
        if value.dtype.kind not in "biuf":
            raise RankfoldError(f"{path}: '{name}' must be numbers, got {value.dtype}")
    if len({arrays[name].shape for name in names}) == 1:
        return np.stack([arrays[name].astype(np.float32) for name in names], axis=1), None
    rows = len(arrays[names[0]])
    return (np.concatenate([arrays[name].reshape(rows, -1).astype(np.float32) for name in names], axis=1),
            tuple(arrays[name].shape[1:] for name in names))


def unpack_arrays(packing: Packing, x: np.ndarray) -> dict[str, np.ndarray]:
    """The original inputs of the packed samples `x`, by name, in their declared types."""
    def typed(value, array):
        return array.astype(helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))

    if packing.shapes is None:
        return {value.name: typed(value, x[:, slot]) for slot, value in enumerate(packing.inputs)}
    return {value.name: typed(value, x[:, start:stop].reshape(len(x), *shape))
            for value, (start, stop), shape in zip(packing.inputs, packing.spans(), packing.shapes)}


def packed_model(model: onnx.ModelProto, packing: Packing) -> onnx.ModelProto:
    """A copy of `model` that takes the packed input instead of the packed ones: a Gather of slot
    i on axis 1, cast to input i's type, makes each of them under its own name."""
    packed = onnx.ModelProto()
    packed.CopyFrom(model)
    graph = packed.graph
    names = set(packing.names)
    kept = [value for value in graph.input if value.name not in names]
    first = packing.inputs[0].type.tensor_type.shape.dim
    dims = [_dim(first[0]), len(packing.inputs), *(_dim(d) for d in first[1:])] if packing.shapes is None else \
        [_dim(first[0]), packing.spans()[-1][1]]
    del graph.input[:]
    graph.input.extend([helper.make_tensor_value_info(packing.name, TensorProto.FLOAT, dims), *kept])
    nodes = []
    for slot, value in enumerate(packing.inputs):
        index = f"{packing.name}_slot{slot}"
        if packing.shapes is None:
            graph.initializer.append(numpy_helper.from_array(np.array(slot, np.int64), index))
            nodes.append(helper.make_node("Gather", [packing.name, index], [f"{index}_float"], axis=1))
        else:  # its span of each sample's flat values, in its own shape
            (start, stop), shape = packing.spans()[slot], packing.shapes[slot]
            for suffix, values in (("start", [start]), ("stop", [stop]), ("axis", [1]), ("shape", [-1, *shape])):
                graph.initializer.append(numpy_helper.from_array(np.array(values, np.int64), f"{index}_{suffix}"))
            nodes += [helper.make_node("Slice", [packing.name, f"{index}_start", f"{index}_stop", f"{index}_axis"],
                                       [f"{index}_flat"]),
                      helper.make_node("Reshape", [f"{index}_flat", f"{index}_shape"], [f"{index}_float"])]
        nodes.append(helper.make_node("Cast", [f"{index}_float"], [value.name], to=value.type.tensor_type.elem_type))
    for node in reversed(nodes):
        graph.node.insert(0, node)
    return packed


def unpacked_model(model: onnx.ModelProto, packing: Packing) -> onnx.ModelProto:
    """A copy of `model` (an export of a module read through packed_model) that takes the original
    inputs again: each cast to float32 and stacked on axis 1 (or flattened, one after another)
    makes the packed input."""
    unpacked = onnx.ModelProto()
    unpacked.CopyFrom(model)
    graph = unpacked.graph
    packed = next((value for value in graph.input if value.name == packing.name), None)
    if packed is None:
        raise RankfoldError(f"the exported graph has no input {packing.name!r} to unpack")
    # Each input as the export declares the packed one (its slot axis dropped): a size the result
    # fixed (a graph that computes from its input's size) is declared fixed
    batch, _slots, *rest = (_dim(d) for d in packed.type.tensor_type.shape.dim)
    shapes = packing.shapes or [rest] * len(packing.inputs)
    kept = [value for value in graph.input if value.name != packing.name]
    del graph.input[:]
    graph.input.extend([*(helper.make_tensor_value_info(value.name, value.type.tensor_type.elem_type, [batch, *shape])
                          for value, shape in zip(packing.inputs, shapes)), *kept])
    axes_attribute = _opset(unpacked) < 13  # Unsqueeze took its axes as an attribute before opset 13
    nodes, stacked = [], []
    for slot, value in enumerate(packing.inputs):
        stem = f"{packing.name}_from_{slot}"
        nodes.append(helper.make_node("Cast", [value.name], [f"{stem}_float"], to=TensorProto.FLOAT))
        if packing.shapes is not None:  # flattened, one input after another
            graph.initializer.append(numpy_helper.from_array(np.array([0, -1], np.int64), f"{stem}_rows"))
            nodes.append(helper.make_node("Reshape", [f"{stem}_float", f"{stem}_rows"], [stem]))
        elif axes_attribute:
            nodes.append(helper.make_node("Unsqueeze", [f"{stem}_float"], [stem], axes=[1]))
        else:
            graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), f"{stem}_axes"))
            nodes.append(helper.make_node("Unsqueeze", [f"{stem}_float", f"{stem}_axes"], [stem]))
        stacked.append(stem)
    nodes.append(helper.make_node("Concat", stacked, [packing.name], axis=1))
    for node in reversed(nodes):
        graph.node.insert(0, node)
    return unpacked


def _dim(dim: onnx.TensorShapeProto.Dimension) -> int | str | None:
    if dim.HasField("dim_value"):
        return dim.dim_value
    return dim.dim_param or None


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


# Ops that carry the packed integers unchanged on their way to the Cast that restores their type
_CARRIERS = ("Gather", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Slice", "Split")


def packed_values(model: onnx.ModelProto, packing: Packing) -> set[str]:
    """The packed input and the float values that carry its slots until they are cast back: none
    of them is an activation to quantize (rounding would change token ids)."""
    found, grew = {packing.name}, True
    while grew:
        grew = False
        for node in model.graph.node:
            if node.op_type in _CARRIERS and node.input and node.input[0] in found:
                new = set(node.output) - found
                found |= new
                grew = grew or bool(new)
    return found


def unpacked_bytes(packed_path: str, packing: Packing, example: np.ndarray) -> bytes:
    """The file at `packed_path` (an export that takes the packed input) as it takes the original
    inputs, checked: onnxruntime runs both on `example` (packed samples) and they must agree."""
    from rankfold.runtime import session

    model = unpacked_model(onnx.load(packed_path), packing)
    wanted = session(packed_path).run(None, {packing.name: example.astype(np.float32)})
    got = session(model).run(None, unpack_arrays(packing, example))
    for name, a, b in zip((o.name for o in model.graph.output), wanted, got):
        if a.shape != b.shape or not np.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True):
            raise RankfoldError(f"the result taking {', '.join(packing.names)} again computes another {name!r} than "
                                "its packed export: nothing was written (please report it with the file)")
    return model.SerializeToString()
