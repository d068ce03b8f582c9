"""A compressed model as a directory that loads again: `model.safetensors` (float tensors, and the
quantized layers' weights as int8 or packed int4 codes with their scales) and `rankfold.json`
(which layers are factorized, with what method and ranks, and how each weight is stored). A model
read from a Hugging Face directory keeps its config.json and tokenizer files beside them, so
load_compressed(DIR) rebuilds it with `transformers` alone; any other model is rebuilt on the
original architecture the caller hands over (`base=`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from rankfold.analyze import tied_names
from rankfold.errors import RankfoldError
from rankfold.layers import LowRank

SAVED_FORMAT = "rankfold-compressed/1"
CONFIG_NAME = "rankfold.json"
WEIGHTS_NAME = "model.safetensors"
SCALE_SUFFIX = ":scale"  # the tensor beside a quantized weight's codes that holds its scales
HF_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
            "modules.json", os.path.join("1_Pooling", "config.json"), "generation_config.json")


def _safetensors():
    try:
        from safetensors.numpy import load_file, save_file
    except ImportError:
        raise RankfoldError("saving a model directory needs safetensors: pip install 'rankfold[llm]'") from None
    return load_file, save_file


def stored_weights(module: nn.Module, leaf_bits: Mapping[str, int], *, per_tensor: set[str],
                   reduce_range: bool, groups: Mapping[str, int] | None = None
                   ) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """The module's state as safetensors arrays: each quantized leaf's weight (already on its
    grid) as integer codes (int4 packed two per byte) plus its scales (per channel, per tensor,
    or per group of `groups[leaf]` input elements), everything else float. Returns the arrays
    and, per quantized weight, how it is stored."""
    groups = groups or {}
    from rankfold.quantize.core import pack_int4, quantize_weight

    arrays, quantized, tied = {}, {}, tied_names(module)
    for name, value in module.state_dict().items():
        if name in tied:  # stored once, under the first name
            continue
        leaf = name.rsplit(".", 1)[0]
        array = value.detach().cpu().numpy()
        if name.endswith(".weight") and leaf in leaf_bits:
            bits = leaf_bits[leaf]
            qw = quantize_weight(array, bits, groups.get(leaf), reduce_range=reduce_range,
                                 per_tensor=leaf in per_tensor)
            codes = np.frombuffer(pack_int4(qw.q), np.uint8) if bits == 4 else qw.q.astype(np.int8)
            arrays[name] = np.ascontiguousarray(codes)
            arrays[name + SCALE_SUFFIX] = np.ascontiguousarray(qw.scale[:1] if leaf in per_tensor else qw.scale)
            quantized[name] = {"bits": bits, "shape": list(array.shape),
                               **({"group_size": groups[leaf]} if leaf in groups else {})}
        else:
            arrays[name] = np.ascontiguousarray(array)
    return arrays, quantized


def loaded_weights(arrays: Mapping[str, np.ndarray], quantized: Mapping[str, dict]) -> dict[str, Tensor]:
    """The state dict that stored_weights' arrays stand for (codes times scales for quantized weights)."""
    from rankfold.quantize.core import QuantizedWeight, unpack_int4

    state = {}
    for name, array in arrays.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        if name in quantized:
            shape, bits = quantized[name]["shape"], quantized[name]["bits"]
            count = int(np.prod(shape))
            codes = unpack_int4(array.tobytes(), count) if bits == 4 else array
            scale = arrays[name + SCALE_SUFFIX].astype(np.float32)
            group = quantized[name].get("group_size")
            if group:
                array = QuantizedWeight(codes.reshape(shape), scale.reshape(shape[0], -1), bits, group).dequantize()
            else:
                array = (codes.reshape(shape[0], -1).astype(np.float32) * scale.reshape(-1, 1)).reshape(shape)
        state[name] = torch.from_numpy(np.array(array))
    return state


def check_save_directory(directory: str, hf_source: str | os.PathLike | None, *, force: bool) -> None:
    """Before any work: `directory` can take a saved model (not a file, not the source model's own
    directory nor inside it, empty unless `force`)."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise RankfoldError(f"{directory} exists and is not a directory")
    parent = os.path.dirname(os.path.abspath(directory))
    if not os.path.isdir(parent):
        raise RankfoldError(f"{directory}: the parent directory {parent} does not exist")
    if hf_source is not None:
        source = os.path.realpath(os.fspath(hf_source))
        if os.path.commonpath([os.path.realpath(directory), source]) == source:
            raise RankfoldError(f"{directory} is the model's own directory (or inside it): its files would be "
                                "overwritten; save into another directory")
    if os.path.isdir(directory) and os.listdir(directory) and not force:
        raise RankfoldError(f"{directory} is not empty (force replaces rankfold's files in it)")


def check_quantized(result, quantized: nn.Module, say) -> None:
    """The self-check again, on the quantized weights that are about to be written (the plan's
    check measured the float module): refused, and nothing written, when it fails."""
    from rankfold.planner.pipeline import check_result

    plan = result.plan
    if result.check is None or result.calib is None or not plan.held_back:
        return  # unchecked results stay unchecked (--no-check); said when they were made
    held = result.check_samples if result.check_samples is not None else \
        result.calib[len(result.calib) - plan.held_back:]
    say("self-check of the quantized weights")
    result.check = check_result(result.original, quantized, held, result.min_agreement, say,
                                result.max_output_error, result.rules)


def save_compressed(result, directory: str | os.PathLike, *, hf_source: str | os.PathLike | None = None,
                    force: bool = False, progress: Callable[[str], None] | None = None) -> str:
    """Write `result` (a Compressed) into `directory` (created; an existing one is refused unless
    `force`, and then only rankfold's own files in it are replaced). Quantized layers are stored
    as the QDQ export stores them (the same rounding); `hf_source`: the Hugging Face directory the
    model came from, whose config and tokenizer files are copied so that the directory loads alone."""
    from rankfold.io import write_json_atomic
    from rankfold.planner.plan import fitting_samples
    from rankfold.quantize.export import quantized_copy
    from rankfold.quantize.weights import grouped_leaves, per_tensor_leaves

    say = progress or (lambda _m: None)
    _load, save_file = _safetensors()
    directory = os.fspath(directory)
    check_save_directory(directory, hf_source, force=force)
    if hf_source is not None:
        from rankfold.frontends.hf import saved_base

        base = saved_base(result.module)  # refuses a model that load_hf did not make, before any work
    module, leaf_bits, whole, reduce_range = result.module, {}, set(), False
    if result.quantized:
        plan = result.plan
        per_tensor = plan.per_tensor_layers()
        if result.weights_on_grid:  # trained on its grid: kept exactly
            from rankfold.quantize.weights import quantized_leaves

            leaf_bits, reduce_range = quantized_leaves(module, plan.layer_bits()), plan.reduce_range
        else:
            module, leaf_bits = quantized_copy(module, plan.layer_bits(), calib=fitting_samples(plan, result.calib),
                                               per_tensor=per_tensor, groups=plan.grouped_layers(), progress=say)
            check_quantized(result, module, say)
        whole = per_tensor_leaves(module, per_tensor)
    arrays, quantized = stored_weights(module, leaf_bits, per_tensor=whole, reduce_range=reduce_range,
                                       groups=grouped_leaves(module, plan.grouped_layers()) if result.quantized else {})
    factorized = [{"name": n, "method": m.method, "ranks": list(m.ranks)}
                  for n, m in module.named_modules() if isinstance(m, LowRank)]
    config = {"format": SAVED_FORMAT, "base": base if hf_source is not None else None, "factorized": factorized,
              "quantized": quantized, "tied": tied_names(module)}
    os.makedirs(directory, exist_ok=True)
    part = os.path.join(directory, f".{WEIGHTS_NAME}.{os.getpid()}.part")
    save_file(arrays, part)
    os.replace(part, os.path.join(directory, WEIGHTS_NAME))
    if hf_source is not None:
        for name in HF_FILES:
            source = os.path.join(os.fspath(hf_source), name)
            if os.path.isfile(source):
                os.makedirs(os.path.dirname(os.path.join(directory, name)), exist_ok=True)
                shutil.copyfile(source, os.path.join(directory, name))
        changes = getattr(module, "config_changes", None)
        if changes:  # e.g. a pruned feed-forward width: transformers builds the layers at the saved sizes
            with open(os.path.join(os.fspath(hf_source), "config.json")) as handle:
                hf_config = json.load(handle)
            write_json_atomic(os.path.join(directory, "config.json"), {**hf_config, **changes})
    write_json_atomic(os.path.join(directory, CONFIG_NAME), config)
    return directory


def load_compressed(directory: str | os.PathLike, base: nn.Module | None = None) -> nn.Module:
    """The compressed model saved in `directory` (save_compressed), in eval mode. `base`: a module
    of the original architecture (its weights are not used), needed unless the directory holds a
    Hugging Face model."""
    load_file, _save = _safetensors()
    directory = os.fspath(directory)
    path = os.path.join(directory, CONFIG_NAME)
    try:
        with open(path) as handle:
            config = json.load(handle)
    except OSError as exc:
        raise RankfoldError(f"{directory}: no {CONFIG_NAME} ({exc.strerror}); not a model saved by rankfold") from None
    if not isinstance(config, dict) or config.get("format") != SAVED_FORMAT:
        raise RankfoldError(f"{path}: not a rankfold model (expected \"format\": \"{SAVED_FORMAT}\")")
    if base is None:
        base = _hf_base(directory, config.get("base"))
    import copy

    from rankfold.methods import method_named

    model = copy.deepcopy(base).eval()
    for entry in config["factorized"]:
        layer = model.get_submodule(entry["name"])
        model.set_submodule(entry["name"], method_named(entry["method"]).skeleton(layer, tuple(entry["ranks"])))
    state = loaded_weights(load_file(os.path.join(directory, WEIGHTS_NAME)), config["quantized"])
    for name, first in (config.get("tied") or {}).items():  # the architecture ties them again
        state[name] = state[first]
    for name in state:  # bias correction may have given a factor a bias it was built without
        owner, _dot, attr = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if attr == "bias" and getattr(module, "bias", 0) is None:
            module.bias = nn.Parameter(torch.zeros_like(state[name]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RankfoldError(f"{directory}: the saved weights do not fit the model (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}): was `base` the original architecture?")
    return model.eval()


def _hf_base(directory: str, base: dict | None) -> nn.Module:
    if not base:
        raise RankfoldError(f"{directory}: the model was not saved from a Hugging Face directory; give its "
                            "original architecture: load_compressed(DIR, base=module)")
    from rankfold.frontends.hf import rebuilt_base

    return rebuilt_base(directory, base)
