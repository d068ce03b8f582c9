"""Layer inputs of a torch model built as a stack of repeated blocks (a transformer's encoder or
decoder layers), original and partly compressed, one block at a time.

The compensated apply needs, for every layer in call order, the rows the original layer saw (x)
and those it sees now (x^). Prefix passes from the model's input cost one pass up to every layer:
O(layers^2) work, an hour for a 30-block language model. Here the hidden states entering the
current block are held for every calibration batch, for both models, so a layer's input costs a
pass through its own block only, and moving on costs one pass through the block just finished.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from rankfold.analyze import (
    COMPRESSIBLE,
    InputMoments,
    _Reached,
    as_input,
    first_input,
    moments_of,
    run_checked,
    streamed_input_moments,
)
from rankfold.host_memory import available_bytes, format_bytes
from rankfold.settings import calibration_batch, memory_headroom


def block_stack(model: nn.Module) -> str | None:
    """The name of the ModuleList of same-type blocks that holds the most compressible layers (at
    least two blocks, each with a compressible layer), or None."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2 or not name:
            continue
        kinds = {type(block) for block in module}
        counts = [sum(isinstance(m, COMPRESSIBLE) for m in block.modules()) for block in module]
        if len(kinds) == 1 and min(counts) > 0 and sum(counts) > best_count:
            best, best_count = name, sum(counts)
    return best


def _first_output(out) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class _Call:
    """One block call as the model made it: hidden states, and every other argument (positions,
    masks) kept to call the blocks after it the same way."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        self.hidden, self.rest, self.kwargs = args[0], args[1:], kwargs

    def run(self, block: nn.Module, hidden: Tensor) -> Tensor:
        with torch.no_grad():
            return _first_output(block(hidden, *self.rest, **self.kwargs))


def _block_calls(model: nn.Module, block: nn.Module, batches: list[Tensor]) -> list[_Call] | None:
    """The first block's call on every batch, the pass stopped there (None: never called)."""
    calls: list[_Call] = []

    def hook(_module, args, kwargs):
        calls.append(_Call(tuple(a.detach() if isinstance(a, Tensor) else a for a in args), dict(kwargs)))
        raise _Reached

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                with torch.no_grad():
                    run_checked(model, batch)
            except _Reached:
                pass
    finally:
        handle.remove()
    return calls if len(calls) == len(batches) else None


def _input_inside(block: nn.Module, layer: nn.Module, call: _Call, hidden: Tensor) -> Tensor | None:
    """The input `layer` first sees when `block` runs on `hidden`, the block stopped there."""
    return first_input(layer, lambda: call.run(block, hidden))


class BlockInputs:
    """InputMoments of each layer inside a block stack, the blocks visited in order; layers outside
    the stack (an embedding projection, a head) by prefix passes."""

    def __init__(self, model: nn.Module, reference: nn.Module, stack: str, calib: Tensor, calls: list[_Call]) -> None:
        self.model, self.reference, self.stack, self.calib, self.calls = model, reference, stack, calib, calls
        self.at = 0  # the block whose inputs are held
        self.current = [c.hidden for c in calls]
        self.original = self.current  # the same tensors until a layer before the block has changed
        self.diverged = False
        self.last: tuple[list, list, InputMoments | None] | None = None  # the last layer's inputs and moments

    @classmethod
    def for_model(cls, model: nn.Module, reference: nn.Module, calib: Tensor,
                  say: Callable[[str], None]) -> BlockInputs | None:
        """None where the model has no block stack, where its hidden states for every sample (twice)
        would not fit the memory headroom, or where the blocks do not feed each other (checked on
        the first batch: block 0 run on its input must give block 1's input)."""
        stack = block_stack(model)
        if stack is None:
            return None
        blocks = model.get_submodule(stack)
        batch = calibration_batch()
        batches = [as_input(calib[i : i + batch]) for i in range(0, calib.shape[0], batch)]
        calls = _block_calls(model, blocks[0], batches)
        if calls is None:
            return None
        held = 2 * sum(c.hidden.numel() * c.hidden.element_size() for c in calls)
        # The memory plan sets headroom for ONNX graph state only (0 for a torch module): the hidden
        # states then get what a graph's state would, a quarter of the memory available.
        headroom = memory_headroom() or available_bytes() // 4
        if held > headroom:
            say(f"layer inputs by prefix passes: the hidden states of every sample would take {format_bytes(held)} "
                f"(headroom {format_bytes(headroom)})")
            return None
        second = _block_calls(model, blocks[1], batches[:1])
        if second is None or not torch.allclose(calls[0].run(blocks[0], calls[0].hidden), second[0].hidden,
                                                rtol=1e-4, atol=1e-5):
            return None  # the blocks are not a chain (block 1 does not read block 0's output)
        say(f"layer inputs block by block through {stack} ({len(blocks)} blocks; {format_bytes(held)} of hidden "
            "states held)")
        return cls(model, reference, stack, calib, calls)

    def _block_of(self, name: str) -> int | None:
        prefix = self.stack + "."
        if not name.startswith(prefix):
            return None
        index = name[len(prefix):].split(".", 1)[0]
        return int(index) if index.isdigit() else None

    def _advance_to(self, index: int, changed: bool) -> None:
        blocks, originals = self.model.get_submodule(self.stack), self.reference.get_submodule(self.stack)
        while self.at < index:
            self.diverged = self.diverged or changed
            new = [call.run(blocks[self.at], h) for call, h in zip(self.calls, self.current)]
            if self.diverged:
                self.original = [call.run(originals[self.at], h) for call, h in zip(self.calls, self.original)]
            else:
                self.original = new
            self.current = new
            self.at += 1

    def moments(self, name: str, module: nn.Module, changed: bool) -> InputMoments | None:
        index = self._block_of(name)
        if index is None or index < self.at:  # outside the stack (or called again after it): from the input
            return streamed_input_moments(self.reference if changed else None, self.model, name, self.calib)
        self._advance_to(index, changed)
        block = self.model.get_submodule(self.stack)[index]
        layer = self.model.get_submodule(name)
        x_hat = [_input_inside(block, layer, call, h) for call, h in zip(self.calls, self.current)]
        if not changed:
            x = x_hat
        else:
            original_block = self.reference.get_submodule(self.stack)[index]
            original_layer = self.reference.get_submodule(name)
            x = [_input_inside(original_block, original_layer, call, h) for call, h in zip(self.calls, self.original)]
        if self.last is not None and _same_tensors(self.last[0], x) and _same_tensors(self.last[1], x_hat):
            return self.last[2]  # layers reading one input (q, k and v; gate and up) share its moments
        found = moments_of(module, zip(x, x_hat), self.calib.shape[0], same=not changed)
        self.last = (x, x_hat, found)
        return found


def _same_tensors(a: list, b: list) -> bool:
    return len(a) == len(b) and all(p is not None and q is not None and p.shape == q.shape and torch.equal(p, q)
                                    for p, q in zip(a, b))
