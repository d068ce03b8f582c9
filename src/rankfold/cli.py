"""The `rankfold` command line. Bad input ends in one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

from rankfold.errors import RankfoldError, first_line
from rankfold.io import check_output_directory, check_outputs, refuse_empty_path


def _cmd_eval(args: argparse.Namespace) -> None:
    if os.path.isdir(args.model):
        return _eval_directory(args)
    if args.data is None:
        raise RankfoldError(f"{args.model}: an ONNX model is measured on --data DATA.npz (x, and labels y for "
                            "top-1 accuracy)")
    if args.text is not None:
        raise RankfoldError("--text measures a model directory (a language model or a sentence encoder); an ONNX "
                            "model takes --data")
    from rankfold.frontends.onnx import read_onnx

    graph = read_onnx(args.model)  # a clear error for a bad model before any work
    data, fixed = _graph_data(graph, args.model, args.data, need_labels=False)  # a detector's data has no labels
    if not fixed and not data.packed:
        return _eval_file(args, args.model, data.x, data.y)
    import tempfile

    import onnx

    from rankfold.frontends.onnx import bind_inputs
    from rankfold.frontends.packing import packed_model, packing_for

    # onnxruntime runs a copy whose inputs given once are initializers, as a compressed result takes
    # them, and whose inputs that differ per sample are packed as the data holds them
    if fixed:
        print(f"inputs given once ({', '.join(sorted(fixed))}) are bound as constants", file=sys.stderr)
    copy = bind_inputs(graph, fixed)
    if data.packed:
        copy = packed_model(copy, packing_for(graph, list(data.packed), data.packed_shapes))
    with tempfile.TemporaryDirectory(prefix="rankfold-eval-") as tmp:
        bound = os.path.join(tmp, os.path.basename(args.model))
        onnx.save(copy, bound)
        _eval_file(args, bound, data.x, data.y)


def _graph_data(graph, model_path: str, data_path: str, *, need_labels: bool):
    """(Dataset, inputs given once) of `data_path` for the ONNX graph `graph`; a graph with several
    inputs needs one array per input (rankfold.data.graph_data)."""
    from rankfold.data import graph_data
    from rankfold.frontends.onnx import graph_inputs

    inputs = graph_inputs(graph)
    data, fixed = graph_data(data_path, inputs, need_labels=need_labels)
    if len(inputs) > 1 and not fixed and not data.packed:
        raise RankfoldError(f"{model_path}: the graph takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}"
                            f"): give {data_path} one array per input, named after it")
    return data, fixed


def _more_samples(args: argparse.Namespace, graph, path: str, *, need_labels: bool):
    """Training or test samples (a Dataset) for the graph _load_inputs read: a file like --calib
    (one array per input for a graph with several), whose inputs given once equal --calib's (the
    loaded model holds those as constants), its per-sample input checked against the graph."""
    import numpy as np

    data, fixed = _graph_data(graph, args.model, path, need_labels=need_labels)
    given = getattr(args, "given_once", None) or {}
    for name in sorted(set(fixed) | set(given)):
        if name not in fixed or name not in given or not np.array_equal(fixed[name], given[name]):
            raise RankfoldError(f"{path}: input {name!r} must be given once as --calib gives it (a constant of the "
                                f"compressed model): {'not given once here' if name not in fixed else 'another value'}"
                                f"{'' if name in given else ' (--calib gives it per sample)'}")
    _check_samples_fit(graph, data, fixed, path)
    return data


def _check_samples_fit(graph, data, fixed: dict, source: str) -> None:
    """The per-sample input against the graph's declared dims; packed inputs each against its own."""
    import numpy as np

    from rankfold.data import check_input_shape
    from rankfold.frontends.onnx import graph_inputs

    inputs = {i.name: i for i in graph_inputs(graph)}
    if data.packed:
        shapes = data.packed_shapes or [data.x.shape[2:]] * len(data.packed)
        for name, shape in zip(data.packed, shapes):
            check_input_shape(np.empty((1, *shape)), inputs[name].dims, f"{source} ({name!r})")
        return
    check_input_shape(data.x, next(i for i in inputs.values() if i.name not in fixed).dims, source)


def _sample_shape(model, example):
    """One sample's shape for the ONNX files' MAC counts: of each packed input where inputs are
    packed, each input's own by name where they are packed flat."""
    packing = getattr(model, "packing", None)
    if packing is not None and packing.shapes is not None:
        return dict(zip(packing.names, packing.shapes))
    return tuple(example.shape[2:] if packing is not None else example.shape[1:])


def _eval_file(args: argparse.Namespace, path: str, x, y) -> None:
    from rankfold.data import check_input_shape
    from rankfold.evaluate import evaluate
    from rankfold.frontends.onnx import read_onnx
    from rankfold.report import human
    from rankfold.selfcheck import proportion_interval

    if args.limit:
        x, y = x[: args.limit], (None if y is None else y[: args.limit])
    attack = _attack_config(args, x)
    if attack is not None and y is None:
        raise RankfoldError(f"{args.data}: --attack measures top-1 under attack: it needs labels y")
    if args.original is not None:
        if attack is None or attack.kind != "transfer":
            raise RankfoldError("--original is the model a transfer attack crafts on: it needs --attack transfer")
        check_input_shape(x, _input_dims(read_onnx(args.original)), f"{args.data} (for --original)")
    elif attack is not None and attack.kind == "transfer":
        raise RankfoldError("--attack transfer crafts its inputs on another model: give it with --original")
    try:
        result = evaluate(path, x, y, runs=args.runs, measure_latency=not args.no_latency)
    except Exception as exc:
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        raise RankfoldError(f"{args.model}: onnxruntime cannot run it on {args.data}: {first_line(exc)}") from None
    robust = _robustness(args, path, x, y, attack) if attack is not None else []
    if args.json:
        print(json.dumps({**result.to_dict(), "robustness": [r.to_dict() for r in robust]}))
        return
    print(f"model           {args.model}")
    if result.accuracy is None:
        print(f"accuracy        not measured: {args.data} has no labels y (the sizes and times below are)")
    else:
        low, high = proportion_interval(result.accuracy, len(x))
        print(f"accuracy        {result.accuracy:.4f}  ({len(x)} samples; 95 % interval {low:.4f}-{high:.4f})")
        if result.accuracy_default_session is not None:
            print(f"                measured in {result.arithmetic}; onnxruntime's default session computes "
                  f"{result.accuracy_default_session:.4f} here")
    print(f"parameters      {result.params:,} ({human(result.params)})")
    print(f"MACs            {result.macs:,} ({human(result.macs)}) per sample")
    print(f"weight bytes    {result.weight_bytes:,}")
    print(f"file bytes      {result.file_bytes:,}")
    print(f"activations     {result.peak_activation_bytes:,} B at the peak (batch 1, graph liveness)")
    if result.int8_kernel_max_units is not None:
        verdict = "ok" if result.int8_kernel_max_units <= 1 else \
            "WRONG on this CPU: plan with --target host, which gives such CPUs 7-bit int8 weights"
        print(f"int8 kernels    {result.int8_kernel_max_units} unit(s) at most from the reference arithmetic, "
              f"layer by layer ({verdict}; {result.cpu})")
    for batch, ms in ((1, result.latency_ms_b1), (32, result.latency_ms_b32)):
        if ms is not None:
            print(f"latency b{batch:<2d}     {ms:.3f} ms   (onnxruntime, 1 thread, median of {args.runs})")
        elif not args.no_latency:
            print(f"latency b{batch:<2d}     not measured: the file's batch is fixed at another size")
    if result.latency_note and (result.latency_ms_b1 is not None or result.latency_ms_b32 is not None):
        print(f"                {result.latency_note}")
    for r in robust:
        print(f"{r.attack} eps={r.eps:<6g} adversarial top-1 {r.adversarial_accuracy:.4f} "
              f"(clean {r.clean_accuracy:.4f}, {r.samples} samples; {r.twin_agreement:.1%} of them judged alike "
              "by the gradient twin)")
    if robust:
        print(f"attack          eps in {robust[0].eps_units}; gradients: {robust[0].gradients}")


def _load_directory(path: str):
    """A model directory as a module: a rankfold-compressed one (rankfold.json) or a Hugging Face one."""
    from rankfold.frontends.hf import is_hf_directory, load_hf
    from rankfold.saved import CONFIG_NAME, load_compressed

    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return load_compressed(path)
    if not is_hf_directory(path):
        raise RankfoldError(f"{path} is a directory without config.json or {CONFIG_NAME}: give an ONNX file, a "
                            "Hugging Face model directory or one that rankfold compress wrote")
    return load_hf(path)


def _eval_directory(args: argparse.Namespace) -> None:
    """eval on a model directory: perplexity of a causal language model on text, or a sentence
    encoder's embedding cosine to --original's."""
    from rankfold.frontends.hf import CausalLM, calibration_ids, embedding_cosine, perplexity, read_texts

    given = [f for f, v in (("--data", args.data), ("--attack", args.attack)) if v]
    if given:
        raise RankfoldError(f"{'/'.join(given)}: not available for a model directory (measured on --text)")
    if args.text is None:
        raise RankfoldError(f"{args.model}: a model directory is measured on text: give --text FILE|DIR")
    model = _load_directory(args.model)
    texts = read_texts(args.text)
    ids = calibration_ids(args.model, model, texts, args.seq_len, args.samples)
    out = {"model": args.model, "kind": type(model).__name__, "params": sum(p.numel() for p in model.parameters()),
           "samples": len(ids), "seq_len": int(ids.shape[1])}
    if isinstance(model, CausalLM):
        if args.original:
            raise RankfoldError("--original compares sentence encoders; a language model is measured by perplexity")
        out["perplexity"] = perplexity(model, ids)
    else:
        if not args.original:
            raise RankfoldError("a sentence encoder is measured against the model it came from: give --original DIR")
        out["embedding_cosine"] = embedding_cosine(model, _load_directory(args.original), ids)
    if args.json:
        print(json.dumps(out))
        return
    print(f"model           {args.model} ({out['kind']})")
    print(f"parameters      {out['params']:,}")
    if "perplexity" in out:
        print(f"perplexity      {out['perplexity']:.3f} on {len(ids)} windows of {ids.shape[1]} tokens of {args.text}")
    else:
        print(f"embedding cos.  {out['embedding_cosine']:.4f} to {args.original} on {len(ids)} sentences of "
              f"{args.text}")


ATTACK_NAMES = ("fgsm", "pgd", "transfer")  # robustness.ATTACKS (a test keeps them equal)
QAT_STEP_NAMES = ("max-abs", "lsq")  # training.qat.WEIGHT_STEPS (a test keeps them equal)
QAT_ACTIVATION_NAMES = ("calibrated", "lsq")  # training.qat.ACTIVATION_STEPS (a test keeps them equal)


def _attack_args(p: argparse.ArgumentParser, *, compress: bool) -> None:
    """The attack options of eval and compress (rankfold.robustness)."""
    what = ("also measure clean and adversarial top-1 of the original and of the result, side by side, on "
            "--attack-data" if compress else "also measure adversarial top-1: white-box fgsm/pgd on the model as it "
            "runs (a QDQ model through a float twin with straight-through rounding, judged in onnxruntime), or "
            "transfer: crafted by pgd on --original")
    p.add_argument("--attack", choices=ATTACK_NAMES, help=what)
    p.add_argument("--eps", type=_eps_list, default=None,
                   help="attack size(s), comma-separated (default 0.03): in pixel units [0, 1] with --pixel-mean/"
                        "--pixel-std, else in the model's input units")
    p.add_argument("--steps", type=_positive_int, default=None, help="pgd/transfer steps (default 10)")
    p.add_argument("--step-size", type=_float_between_0_1, default=None,
                   help="pgd step as a fraction of eps (default 0.25)")
    p.add_argument("--pixel-mean", type=_float_list, help="the input normalization (x = (pixel - mean) / std), one "
                   "value or one per channel: eps is then in pixels and attacks keep pixels in [0, 1]")
    p.add_argument("--pixel-std", type=_float_list, help="see --pixel-mean")
    p.add_argument("--attack-samples", type=_positive_int, default=1000,
                   help="attack the first N samples (default 1000; an attack runs the model steps+1 times)")
    p.add_argument("--attack-seed", type=_integer, default=None, help="pgd's random start (default 0)")
    if compress:
        p.add_argument("--attack-data", help=".npz with x and y: the samples --attack measures")
        p.add_argument("--preserve-robustness", action="store_true",
                       help="calibrate on pgd inputs (crafted on the original at the largest --eps) as well as "
                            "clean ones: the factorization and the self-check then cover where an attacker "
                            "takes the inputs (doubles the calibration samples); with --train, the fine-tuning "
                            "is adversarial distillation within --eps")
    else:
        p.add_argument("--original", help="transfer: the model the attack is crafted on")


# options that only an attack reads: given without one, they are refused, not ignored
ATTACK_OPTIONS = {"eps": "--eps", "steps": "--steps", "step_size": "--step-size", "attack_seed": "--attack-seed",
                  "pixel_mean": "--pixel-mean", "pixel_std": "--pixel-std"}


def _attack_config(args: argparse.Namespace, x, *, needed: bool = False):
    """The AttackConfig the options ask for (None without --attack, unless `needed`), checked
    against the data's channels before any work."""
    from rankfold.robustness import DEFAULT_EPS, AttackConfig

    if not args.attack and not needed:
        stray = [flag for key, flag in ATTACK_OPTIONS.items() if getattr(args, key) is not None]
        if stray:
            raise RankfoldError(f"{'/'.join(stray)} set an attack: give --attack too")
        return None
    try:
        chosen = (("steps", "steps"), ("step_size", "step_size"), ("attack_seed", "seed"))
        given = {field: getattr(args, key) for key, field in chosen if getattr(args, key) is not None}
        config = AttackConfig(args.attack or "pgd", args.eps or (DEFAULT_EPS,), pixel_mean=args.pixel_mean,
                              pixel_std=args.pixel_std, **given)
    except ValueError as exc:
        raise RankfoldError(str(exc).replace("pixel_mean and pixel_std", "--pixel-mean and --pixel-std")) from None
    config.check_channels(x, "--pixel-mean/--pixel-std")
    return config


def _robustness_inputs(args: argparse.Namespace, model, calib, example, log):
    """compress: the attack options checked before any work (the measured samples loaded into
    args.attack_samples_xy); with --preserve-robustness, the calibration inputs plus pgd inputs."""
    from rankfold.data import check_input_shape, load_npz

    args.attack_config = _attack_config(args, example.numpy(), needed=args.preserve_robustness)
    if args.attack and not args.attack_data:
        raise RankfoldError("--attack measures the original and the result on labelled samples: give --attack-data")
    if args.attack_data and not args.attack:
        raise RankfoldError("--attack-data is what --attack measures on: give --attack too")
    if args.attack_data:
        data = load_npz(args.attack_data)
        check_input_shape(data.x, [None, *example.shape[1:]], args.attack_data)
        args.attack_samples_xy = (data.x[: args.attack_samples], data.y[: args.attack_samples])
    if not args.preserve_robustness:
        return calib
    if calib is None:
        raise RankfoldError("--preserve-robustness crafts pgd inputs from the calibration samples: give --calib")
    from rankfold.robustness import adversarial_calibration

    config = args.attack_config
    log(f"--preserve-robustness: crafting pgd inputs (eps {max(config.eps):g} in {config.units}) on the original "
        f"from the {len(calib)} calibration samples")
    return adversarial_calibration(model, calib, config, progress=log)


def _robustness_side_by_side(args: argparse.Namespace) -> dict | None:
    """compress --attack: clean and adversarial top-1 of the original and of the result (printed)."""
    import dataclasses

    from rankfold.robustness import robustness_table

    if not args.attack:
        return None
    x, y = args.attack_samples_xy
    config = args.attack_config
    # The original is attacked white-box; a transfer attack judges those same inputs on the result.
    original = _robustness(args, args.model, x, y, dataclasses.replace(config, kind="pgd")
                           if config.kind == "transfer" else config)
    compressed = _robustness(args, args.output, x, y, config, source=args.model)
    print(robustness_table([*(("original", r) for r in original), *(("compressed", r) for r in compressed)]))
    print(f"attack: eps in {config.units}; gradients of the result: {compressed[0].gradients}")
    return {"original": [r.to_dict() for r in original], "compressed": [r.to_dict() for r in compressed]}


def _robustness(args: argparse.Namespace, path: str, x, y, attack, source: str | None = None) -> list:
    from rankfold.robustness import robust_accuracy

    n = min(args.attack_samples, len(x))
    return robust_accuracy(path, x[:n], y[:n], attack, source=source or getattr(args, "original", None),
                           progress=_log(args.quiet))


OBSERVER_NAMES = ("minmax", "mse", "percentile")  # quantize.observers.OBSERVERS (a test keeps them equal)

BUDGET_FLAGS = {"max_params": "params", "max_weight_bytes": "weight_bytes", "max_macs": "macs",
                "max_latency": "latency_ms", "max_ram": "ram_bytes"}


def _load_inputs(args: argparse.Namespace):
    """(graph, model, calib tensor or None, example tensor) from --model/--calib, checked."""
    import torch

    from rankfold.frontends.onnx import graph_inputs, load_onnx, read_onnx
    from rankfold.frontends.packing import packing_for

    graph = read_onnx(args.model)
    inputs = graph_inputs(graph)
    if len(inputs) > 1 and not args.calib:
        raise RankfoldError(f"{args.model}: the graph takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)})"
                            ": give --calib with one array per input, named after it")
    calib, fixed = _graph_data(graph, args.model, args.calib, need_labels=False) if args.calib else (None, {})
    packing = packing_for(graph, list(calib.packed), calib.packed_shapes) if calib is not None and calib.packed \
        else None
    if calib is not None:  # before the load, which decides shape-driven Ifs on these samples
        _check_samples_fit(graph, calib, fixed, args.calib)
        calib = torch.from_numpy(calib.x[: args.calib_limit])
    model = load_onnx(args.model, fixed, calib[:2] if calib is not None else None, packing)
    args.conversion_line = _conversion_checked(args.model, model, calib, fixed)
    args.given_once = fixed  # constants of the model: --train and --data must give the same (_more_samples)
    if model.fixed_batch is not None and model.fixed_batch != 1:
        raise RankfoldError(f"{args.model}: the graph's batch is fixed at {model.fixed_batch}; rankfold takes a "
                            "dynamic batch or a batch fixed at 1 (export the model again with either)")
    example = calib[:2] if calib is not None else _example_input(graph)
    example = example[: model.fixed_batch or len(example)]  # what the export traces: the file's batch
    _check_rules_known(args, model)
    _use_memory_budget(args, model, example, calib)
    return graph, model, calib, example


CONVERSION_REFUSED = 0.1  # relative error from onnxruntime's run of the file: a conversion gone wrong
CONVERSION_EXACT = 1e-3  # below: float rounding; between the two, said (deep networks amplify rounding)


def _conversion_checked(path: str, model, calib, fixed) -> str | None:
    """The graph as rankfold reads it, run beside onnxruntime's run of the file on the first
    calibration samples, before any work: refused where they differ beyond float rounding, so a
    conversion rankfold gets wrong cannot pass silently into a result. The line to say, if any."""
    from rankfold.frontends.onnx import onnxruntime_disagreement

    if calib is None:
        return None
    found = onnxruntime_disagreement(path, model, calib[:4], fixed)
    if found is None:
        return None
    output, error = found
    if error > CONVERSION_REFUSED:
        raise RankfoldError(f"{path}: the graph as rankfold reads it differs from onnxruntime's run of the file on "
                            f"the first calibration samples (relative error {error:.3f} on output {output!r}, at "
                            f"most {CONVERSION_REFUSED} allowed): a conversion rankfold gets wrong; nothing was done "
                            "(please report it with the file)")
    if error > CONVERSION_EXACT:
        return (f"  the graph as read differs from onnxruntime's run of the file by {error:.1e} (output {output!r}, "
                "first calibration samples): float rounding amplified through the network, or a conversion to check")
    return f"  read as onnxruntime runs the file: relative error {error:.1e} on the first calibration samples"


def _check_rules_known(args: argparse.Namespace, model) -> None:
    from rankfold.selfcheck import check_rules_problem, declare_embeddings

    names = list(model.output_names)
    problem = check_rules_problem(tuple(getattr(args, "check", None) or ()), names)
    if problem:
        raise RankfoldError(problem)
    declare_embeddings(model, getattr(args, "embedding", None) or [])


def _use_memory_budget(args: argparse.Namespace, model, example, calib=None) -> None:
    """The batch and graph-state headroom that keep this run under --max-memory (as compress()
    chooses them: host_memory.calibration_memory), for every calibration pass that follows; a
    budget too small for one sample is refused here, before any work."""
    from rankfold.host_memory import calibration_memory, format_bytes
    from rankfold.settings import use_batch, use_memory_headroom

    memory, state = calibration_memory(model, example, calib, args.max_memory)
    use_batch(memory.batch)  # a graph's fixed batch at most
    use_memory_headroom(state)
    args.memory_line = "  " + memory.describe()  # said when the work starts, after every check
    if state:
        args.memory_line += f", {format_bytes(state)} of it for the graph state between layers"
    if getattr(model, "runs_at_batch", None):  # ONNX graphs say; modules from a directory never fix it
        args.memory_line += "\n  the graph's batch is fixed at 1: calibration runs one sample at a time, and " \
                            "the result keeps the fixed batch"
    elif getattr(model, "fixed_batch", None):
        args.memory_line += "\n  the graph's batch is fixed at 1, and the result keeps it; its steps compute each " \
                            "sample alone at any batch (checked on two samples), so calibration runs in batches"
    if getattr(model, "size_note", None):
        args.memory_line += "\n  " + model.size_note
    if getattr(model, "quantized_note", None):
        args.memory_line += "\n  " + model.quantized_note
    if getattr(model, "opset_note", None):
        args.memory_line += "\n  " + model.opset_note
    if getattr(model, "widened_note", None):
        args.memory_line += "\n  " + model.widened_note
    if getattr(args, "conversion_line", None):
        args.memory_line += "\n" + args.conversion_line
    if getattr(model, "fixed_inputs", None):
        from rankfold.data import listed

        args.memory_line += (f"\n  inputs given once ({listed(model.fixed_inputs)}): calibrated at the values given; "
                             "a float or weight-only quantized result is written into the original graph and takes "
                             "them again, one with int8 activations (or one that graph cannot hold) takes "
                             f"{', '.join(model.packing.names if model.packing else model.input_names)} only")
    if getattr(model, "packing", None) is not None:
        args.memory_line += "\n  " + model.packing.describe()


def _budgets(args: argparse.Namespace) -> dict[str, str]:
    from rankfold.target import parse_budget

    budgets = {q: getattr(args, flag) for flag, q in BUDGET_FLAGS.items() if getattr(args, flag) is not None}
    for q, text in budgets.items():
        parse_budget(q, text)  # a bad value fails here, before any work
    return budgets


def _cmd_compress(args: argparse.Namespace) -> None:
    budgets = _budgets(args)
    if os.path.isdir(args.model):
        return _compress_hf(args, budgets)
    if args.calib_text is not None:
        raise RankfoldError("--calib-text calibrates a Hugging Face model directory; an ONNX model takes --calib "
                            "CALIB.npz")
    if args.train_text is not None:
        raise RankfoldError("--train-text fine-tunes a Hugging Face model directory; an ONNX model takes --train "
                            "TRAIN.npz")
    if args.mlp_keep is not None:
        raise RankfoldError("--mlp-keep prunes the feed-forward blocks of a transformer read from a Hugging Face model "
                            "directory; an ONNX model has no such option")
    split = _split_of(args)
    if split is not None:
        return _on_head(args, split, lambda: _compress_onnx(args, budgets))
    return _compress_onnx(args, budgets)


def _split_of(args: argparse.Namespace):
    """The graph of --model cut before the ops rankfold cannot run (onnx_split.py), or None where
    it runs them all."""
    from rankfold.frontends.onnx import read_onnx
    from rankfold.frontends.onnx_split import split_at_unsupported

    graph = read_onnx(args.model)
    # Which inputs are given once decides which Ifs branch on the input's values: read only where there are Ifs
    # (the calibration file is read again, whole, by the run itself)
    branches = any(n.op_type == "If" for n in graph.graph.node)
    given_once = set(_graph_data(graph, args.model, args.calib, need_labels=False)[1]) if args.calib and branches \
        else set()
    return split_at_unsupported(graph, given_once)


def _on_head(args: argparse.Namespace, split, run: Callable[[], None]) -> None:
    """compress or apply on a graph with ops rankfold cannot run: `run` works on its head
    (onnx_split.py), compressed and checked as a graph of its own in a scratch directory; the
    result is joined to the nodes after it, run once in onnxruntime, and written to -o."""
    import tempfile

    import onnx

    from rankfold.frontends.onnx_split import join
    from rankfold.io import replace_atomically, write_json_atomic
    from rankfold.runtime import session

    _check_outputs(args)
    _log(args.quiet)(split.describe())
    given = (args.model, args.output, args.force)
    with tempfile.TemporaryDirectory(prefix="rankfold-head-") as scratch:
        head_path, compressed = os.path.join(scratch, "head.onnx"), os.path.join(scratch, "compressed-head.onnx")
        onnx.save(split.head, head_path)
        args.model, args.output, args.force, args.joined_to = head_path, compressed, True, given[1]
        try:
            run()
        finally:
            args.model, args.output, args.force, args.joined_to = (*given, None)
        joined = join(onnx.load(compressed), split)
    session(joined)  # onnxruntime takes the joined graph, or the error names it; nothing is written before
    print(_joined_check(args, joined))
    replace_atomically(args.output, joined.SerializeToString())
    if args.report:  # the run's report named the scratch head: it names the files given, and the cut
        with open(args.report) as handle:
            report = json.load(handle)
        report.update(model=args.model, output=args.output, cut={
            "unsupported": split.unsupported, "values": split.cut, "nodes_kept_after": len(split.tail)})
        write_json_atomic(args.report, report)
    print(f"wrote {args.output}: the compressed head joined to the {len(split.tail)} node(s) kept after it"
          + _fixed_sizes_line(args))


def _joined_check(args: argparse.Namespace, joined) -> str:
    """The joined file against the original file, both in onnxruntime, on every final output and
    the held-back calibration samples (the head's own check compared the values at the cut):
    refused like any result, before anything is written. The line to say."""
    import torch

    from rankfold.frontends.onnx import read_onnx
    from rankfold.selfcheck import agreement, refuse_if_poor, split_holdout

    if args.no_check:
        return "self-check of the joined file: not run (--no-check): the result is unchecked"
    if not args.calib:
        raise RankfoldError("the joined file cannot be checked without calibration data (--calib); pass --no-check "
                            "to write it unchecked")
    graph = read_onnx(args.model)
    data, fixed = _graph_data(graph, args.model, args.calib, need_labels=False)
    samples = torch.from_numpy(data.x[: args.calib_limit])
    held = split_holdout(samples)[1]
    where = "held-back samples" if held is not None else "calibration samples (fitting used them too)"
    runs = [_onnxruntime_module(proto, fixed, data) for proto in (graph, joined)]
    check = agreement(*runs, samples if held is None else held, where=where, rules=tuple(args.check))
    refuse_if_poor(check, args.min_agreement, args.max_output_error, tuple(args.check))
    return "self-check (the joined file against the original, both in onnxruntime): " + check.describe()


def _onnxruntime_module(proto, fixed: dict, data):
    """A module that runs the ONNX graph `proto` in onnxruntime on the per-sample input as rankfold
    holds it: inputs given once bound, inputs that differ per sample packed."""
    from rankfold.frontends.onnx import bind_inputs
    from rankfold.frontends.packing import packed_model, packing_for
    from rankfold.runtime import session
    from rankfold.selfcheck import SessionModule

    bound = bind_inputs(proto, fixed)
    return SessionModule(session(packed_model(bound, packing_for(bound, list(data.packed), data.packed_shapes))
                                 if data.packed else bound))


def _wrote(args: argparse.Namespace) -> str:
    if getattr(args, "joined_to", None):  # a head compressed in scratch (_on_head): -o is written after
        return "the compressed head is ready; joining the nodes kept after it"
    return f"wrote {args.output}" + _fixed_sizes_line(args)


def _fixed_sizes_line(args: argparse.Namespace) -> str:
    """What a written file no longer leaves open of the user's file's input sizes, and why."""
    if not (str(args.model).endswith(".onnx") and os.path.isfile(args.model) and os.path.isfile(args.output)):
        return ""
    from rankfold.frontends.onnx import sizes_fixed_by

    fixed = sizes_fixed_by(args.model, args.output)
    if not fixed:
        return ""
    listed = "; ".join(f"{name} along axis {', '.join(map(str, axes))}" for name, axes in fixed.items())
    return (f"\n  its inputs take the calibration samples' size only ({listed}), where {args.model} leaves it "
            "open: the file computed at other sizes does not agree with the model")


def _compress_onnx(args: argparse.Namespace, budgets: dict[str, str]) -> None:
    if budgets or args.target:
        uniform = [flag for flag, value in (("--keep", args.keep), ("--method", args.method), ("--ranks", args.ranks))
                   if value is not None]
        if uniform:
            raise RankfoldError(f"{'/'.join(uniform)} set a uniform compression; the planner (--target, --max-*) "
                                "chooses per layer: use one or the other")
        return _compress_planned(args, budgets)
    planned_only = [flag for flag, value in (("--bits", args.bits), ("--group-size", args.group_size),
                                              ("--plan-out", args.plan_out),
                                              ("--observer", args.observer), ("--train", args.train),
                                              ("--finetune-steps", args.finetune_steps),
                                              ("--finetune-minutes", args.finetune_minutes),
                                              ("--finetune-lr", args.finetune_lr),
                                              ("--finetune-feature-weight", args.finetune_feature_weight))
                    if value is not None]
    if planned_only:
        raise RankfoldError(f"{'/'.join(planned_only)} only work with the planner (--target or a --max-* budget); "
                            "uniform mode (--keep, --method) writes a float model and no plan")
    return _compress_uniform(args)


HF_REFUSED = ("calib", "train", "plan_out", "attack", "ranks")  # options an ONNX model has and a directory not


def _compress_hf(args: argparse.Namespace, budgets: dict[str, str]) -> None:
    """compress on a Hugging Face directory (a sentence encoder or a causal language model),
    calibrated on text; written as a directory that rankfold.load_compressed reads (or, for an
    encoder, -o OUT.onnx: the ONNX file, QDQ where quantized)."""
    from rankfold.frontends.hf import calibration_ids, is_hf_directory, load_hf, read_texts
    from rankfold.planner.pipeline import compress_to_budget
    from rankfold.report import layer_table, plan_table
    from rankfold.saved import check_save_directory, save_compressed
    from rankfold.target import load_target, with_group_size
    from rankfold.uniform import compress_uniform

    if not is_hf_directory(args.model):
        raise RankfoldError(f"{args.model} is a directory without config.json: give an ONNX file or a Hugging Face "
                            "model directory")
    refused = [f"--{n.replace('_', '-')}" for n in HF_REFUSED if getattr(args, n, None)]
    if refused:
        raise RankfoldError(f"{'/'.join(refused)}: not available for a model directory (it calibrates on "
                            "--calib-text, fine-tunes on --train-text and is written with "
                            "rankfold.save_compressed)")
    if args.calib_text is None and not args.no_check:
        raise RankfoldError(f"{args.model}: a model directory calibrates on text: give --calib-text FILE|DIR (or "
                            "--no-check for a data-free, unchecked result)")
    planned = bool(budgets or args.target)
    if args.mlp_keep is not None:
        _check_mlp_keep(args, planned, budgets)
    target = with_group_size(load_target(args.target or "host"), args.group_size) if planned else None
    to_onnx = args.output.endswith(".onnx")
    if to_onnx:
        check_outputs({"model": args.model}, {"-o": args.output, "--report": args.report}, force=args.force)
    else:
        check_save_directory(args.output, args.model, force=args.force)
        check_outputs({"model": args.model}, {"--report": args.report}, force=args.force)
    texts = read_texts(args.calib_text) if args.calib_text is not None else None
    train_config = _compress_finetune_config(args, args.train_text, "--train-text FILE|DIR",
                                             "compress DIR --train-text runs in one process (--device cuda for a "
                                             "GPU); torchrun runs `rankfold finetune` on ONNX files")
    if train_config is not None and texts is None:
        raise RankfoldError("--train-text: give --calib-text too (the plan and the check need calibration text)")
    train_ids = _text_training_ids(args, train_config)
    log = _log(args.quiet)
    log(f"loading {args.model}")
    model = load_hf(args.model)
    if to_onnx and not getattr(model, "exports_to_onnx", True):
        raise RankfoldError(f"-o {args.output}: this model does not export to ONNX; give a directory to save it in")
    calib = calibration_ids(args.model, model, texts, args.seq_len, args.samples) if texts is not None else None
    example = calib[:2] if calib is not None else None
    _check_rules_known(args, model)
    if calib is not None:
        _use_memory_budget(args, model, example, calib)
        log(args.memory_line)
    log(f"{'planning' if planned else 'compressing'} {args.model} ({type(model).__name__}) on "
        f"{'no data' if calib is None else f'{len(calib)} windows of {calib.shape[1]} tokens'}"
        f"{f' under {budgets}' if budgets else ''}")
    t0 = time.time()
    common = dict(calib=calib, min_rank=args.min_rank, min_agreement=args.min_agreement,
                  max_output_error=args.max_output_error, rules=tuple(args.check), progress=lambda m: log("  " + m))
    check_now = not args.no_check and train_config is None  # with training, checked after it instead
    if planned:
        result = compress_to_budget(model, target=target, budgets=budgets, example_input=example,
                                    bits=args.bits or "auto", check=check_now, mlp_keep=args.mlp_keep, **common)
    else:
        result = compress_uniform(model, method=args.method or "svd", keep=0.5 if args.keep is None else args.keep,
                                  check=check_now, example_input=example, **common)
    ft_log = None
    if train_config is not None:
        from rankfold.training import finetune_result

        log(f"fine-tuning on {len(train_ids)} windows of {train_ids.shape[1]} tokens of {args.train_text}, on "
            f"{args.device or 'cpu'}")
        result, ft_log = finetune_result(result, train_ids, config=train_config, check=not args.no_check,
                                          progress=lambda m: log("  " + m), max_memory=args.max_memory,
                                          device=args.device)
    if to_onnx:
        result.save(args.output, observer=args.observer or "percentile", force=args.force, progress=log)
    else:
        save_compressed(result, args.output, hf_source=args.model, force=args.force, progress=lambda m: log("  " + m))
    seconds = time.time() - t0
    print(plan_table(result.plan) if planned else layer_table(result.report))
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in result.module.parameters())
    if result.mlp_pruning is not None:
        pruning = result.mlp_pruning
        print(f"feed-forward blocks: {pruning['blocks']} keep {pruning['kept']} of {pruning['width']} hidden neurons "
              f"(--mlp-keep {args.mlp_keep}), before the plan")
    print(f"parameters {before:,} -> {after:,} ({after / before:.1%}) in {seconds:.0f} s")
    if ft_log is not None:
        print(_finetuned_line(ft_log))
    print("self-check: " + (result.check.describe() if result.check is not None
                            else "not run (--no-check): the result is unchecked"))
    print(f"wrote {args.output}")
    if args.report:
        from rankfold.io import write_json_atomic

        write_json_atomic(args.report, {
            "model": args.model, "output": args.output, "budgets": budgets, "seconds": seconds,
            "params_before": before, "params_after": after,
            "plan": result.plan.to_dict() if planned else None,
            "self_check": None if result.check is None else result.check.to_dict(), "mlp_pruning": result.mlp_pruning,
            "finetune": None if ft_log is None else ft_log.to_dict(), **result.report.to_dict()})


def _check_mlp_keep(args: argparse.Namespace, planned: bool, budgets: dict[str, str]) -> None:
    """--mlp-keep before any work: planned mode, calibration text, budgets it can resolve."""
    from rankfold.planner.pipeline import refuse_unresolvable_fractions

    if not planned:
        raise RankfoldError("--mlp-keep prunes before the planner: give a budget (--max-params, --max-weight-bytes, "
                            "...) or --target; uniform mode (--keep, --method) has no such step")
    if args.calib_text is None:
        raise RankfoldError("--mlp-keep chooses the neurons to keep on calibration text: give --calib-text")
    refuse_unresolvable_fractions(
        budgets, lambda quantity: "--" + next(f for f, q in BUDGET_FLAGS.items() if q == quantity).replace("_", "-"))


def _compress_uniform(args: argparse.Namespace) -> None:
    from rankfold.config import check_keep
    from rankfold.evaluate import onnx_size
    from rankfold.io import write_json_atomic
    from rankfold.methods import config_for_method, method_named, registered
    from rankfold.report import layer_table
    from rankfold.uniform import CHECK_SAMPLES, compress_uniform

    keep = 0.5 if args.keep is None else args.keep
    method = args.method or "tucker2"
    try:
        check_keep(keep, "--keep")
        config_for_method(method)
    except ValueError as exc:
        raise RankfoldError(str(exc)) from None
    layers = None
    if args.ranks == "vbmf":
        with_vbmf = [m.name for m in registered() if hasattr(m, "vbmf_config")]
        if method not in with_vbmf:
            raise RankfoldError(f"--ranks vbmf works with {', '.join(with_vbmf)}, not {method}")
        layers = {"*": method_named(method).vbmf_config()}
    elif args.ranks is not None:
        raise RankfoldError(f"--ranks must be vbmf, got {args.ranks!r}")
    _check_outputs(args)
    _graph, model, calib, example = _load_inputs(args)
    _require_compressible(model)
    _require_check_data(args, calib, CHECK_SAMPLES, "uniform mode checks on the calibration samples")
    log = _log(args.quiet)
    calib = _robustness_inputs(args, model, calib, example, log)
    log(f"compressing {args.model}: method={method} keep={keep} "
        f"{'data-aware, ' + str(len(calib)) + ' calibration samples' if calib is not None else 'data-free'}")
    log(args.memory_line)
    t0 = time.time()
    result = compress_uniform(model, method=method, keep=keep, calib=calib, layers=layers, min_rank=args.min_rank,
                              check=not args.no_check, rules=tuple(args.check), min_agreement=args.min_agreement,
                              max_output_error=args.max_output_error, example_input=example,
                              progress=lambda m: log("  " + m))
    result.save(args.output, force=args.force, progress=log)  # checked before anything is written
    report, check = result.report, result.check
    seconds = time.time() - t0
    shape = _sample_shape(model, example)
    before, after = (onnx_size(path, sample_shape=shape) for path in (args.model, args.output))
    print(layer_table(report))
    print(_size_line(before, after, seconds))
    print("self-check: " + (check.describe() if check else "not run (--no-check): the result is unchecked"))
    print(_wrote(args))
    robustness = _robustness_side_by_side(args)
    if args.report:
        write_json_atomic(args.report, {"model": args.model, "output": args.output, "method": method,
                                        "keep": keep, "seconds": seconds, "before": before.__dict__,
                                        "after": after.__dict__, "robustness": robustness,
                                        "self_check": None if check is None else check.to_dict(), **report.to_dict()})


def _require_compressible(model) -> None:
    from rankfold.analyze import COMPRESSIBLE

    if not any(isinstance(m, COMPRESSIBLE) for m in model.modules()):
        raise RankfoldError("the model has no Linear / Conv1d / Conv2d layer to compress")


def _require_check_data(args: argparse.Namespace, calib, needed: int, why: str) -> None:
    """A self-check that cannot run is an error, found before any work, unless --no-check."""
    have = 0 if calib is None else len(calib)
    if have < needed and not args.no_check:
        raise RankfoldError(f"the self-check needs at least {needed} calibration samples ({why}); got {have}"
                            f"{'' if calib is not None else ' (no --calib)'}. Give more with --calib, or pass "
                            "--no-check to write an unchecked result")


def int8_choice(target) -> str:
    """What the target makes of int8 weights, in words."""
    if target.int8_note:
        return f"{target.name}: {target.int8_note}"
    if target.runtime == "c":
        return f"{target.name}: runs the C export (int32 accumulation); int8 weights use the full 8 bits"
    return f"{target.name}: int8 weights use {'7 bits (reduce_range)' if target.reduce_range else 'the full 8 bits'}"


def _compress_planned(args: argparse.Namespace, budgets: dict[str, str]) -> None:
    from rankfold.planner.options import bit_choices
    from rankfold.planner.pipeline import CHECK_SAMPLES, compress_to_budget
    from rankfold.target import load_target, with_group_size

    target = with_group_size(load_target(args.target or "host"), args.group_size)
    bit_choices(target, args.bits or "auto")  # a bad --bits fails before the model is read
    _check_outputs(args)
    graph, model, calib, example = _load_inputs(args)
    _require_check_data(args, calib, CHECK_SAMPLES, "an eighth, 16 to 128, is held back from planning")
    train = _compress_training(args, graph)
    log = _log(args.quiet)
    calib = _robustness_inputs(args, model, calib, example, log)
    budgets = _bytes_of_the_file(args, model, example, budgets, log)
    log(f"planning {args.model} for target {target.name} under {budgets or 'the target limits'}")
    log("  " + int8_choice(target))
    log(args.memory_line)
    t0 = time.time()
    # Timing runs the original file in onnxruntime with one input: with inputs given once or
    # packed, the module is exported.
    original_file = None if model.fixed_inputs or model.packing else args.model
    result = compress_to_budget(model, calib=calib, target=target, budgets=budgets, example_input=example,
                                min_rank=args.min_rank, min_agreement=args.min_agreement,
                                max_output_error=args.max_output_error, onnx_path=original_file,
                                bits=args.bits or "auto", check=not args.no_check and train is None,
                                rules=tuple(args.check), progress=lambda m: log("  " + m))
    ft_log = None
    if train is not None:  # checked after training instead, on the same held-back samples
        from rankfold.training import finetune_result

        if args.preserve_robustness:
            result = _clean_check_samples(result, calib, log)

        log(f"fine-tuning on {len(train[0])} samples of {args.train}, on {args.device or 'cpu'}")
        result, ft_log = finetune_result(result, train[0], config=train[1], check=not args.no_check,
                                          progress=lambda m: log("  " + m),
                                          attack=args.attack_config if args.preserve_robustness else None,
                                          max_memory=args.max_memory, device=args.device)
    _finish(args, result, example, t0, budgets, ft_log)


def _bytes_of_the_file(args: argparse.Namespace, model, example, budgets: dict[str, str], log) -> dict[str, str]:
    """An already-quantized graph is read in float, so its float size is several times its file's:
    a percentage byte budget is taken of the weight bytes the file holds, and without a byte
    budget (and without --bits 32) the result may not outgrow the file (a --max-params plan of
    ddddocr's int8 recogniser was written at 3.3x its bytes, in float)."""
    if getattr(model, "widened_note", None) and "weight_bytes" in budgets:
        return _half_the_bytes(args.model, budgets, log)
    if not getattr(model, "quantized_note", None) or ("weight_bytes" not in budgets and str(args.bits) == "32"):
        return budgets
    from rankfold.evaluate import onnx_size
    from rankfold.target import Budget, parse_budget

    held = onnx_size(args.model).weight_bytes
    given = budgets.get("weight_bytes")
    budget = parse_budget("weight_bytes", given) if given else Budget("weight_bytes", 1.0, relative=True)
    limit = int(budget.limit(held))
    args.file_weight_limit = limit  # the plan counts its layers only: the written file is checked too (_save_within)
    # The plan prices the layers; the constants outside them (the activations' scales and zero
    # points, integer weights of ops that are not layers) come on top, as the written file holds them
    outside = _bytes_outside_the_layers(model, example)
    log(f"  the file holds {held:,} weight bytes (integer weights): "
        f"{f'--max-weight-bytes {given} is' if given else 'the result may not outgrow them, at most'} {limit:,}, "
        f"{outside:,} of them for constants outside the layers")
    return {**budgets, "weight_bytes": str(max(limit - outside, 1))}


def _bytes_outside_the_layers(model, example) -> int:
    """The weight bytes a file written from `model` holds outside its layers, measured on one written
    (unchecked) in a scratch directory: the exporter writes every scale and zero point a quantizer
    reads as float constants of its own (6 QDQ pairs of 5 bytes each were 304 bytes written); and
    the float32 scale and 8-bit zero point of each activation that int8 kernels read, which a result
    with int8 activations adds, beyond the one per step that the planner prices: the graph's own
    QDQ pairs, written back, are activations too (18 steps priced, 52 written: a result 6 bytes
    over its limit was refused)."""
    import tempfile

    import onnx

    from rankfold.analyze import COMPRESSIBLE, TABLES
    from rankfold.evaluate import onnx_size
    from rankfold.export.onnx import export_onnx
    from rankfold.quantize.export import layer_tensors
    from rankfold.quantize.onnx_qdq import float_activations

    layers = sum(p.numel() * 4 for m in model.modules() if isinstance(m, (*COMPRESSIBLE, *TABLES))
                 for p in m.parameters(recurse=False))
    with tempfile.TemporaryDirectory(prefix="rankfold-") as scratch:
        path = os.path.join(scratch, "as-read.onnx")
        export_onnx(model, path, example_input=example, verify=False)
        graph = onnx.load(path)
        quantized_activations = set(float_activations(graph)) & layer_tensors(graph)
        unpriced = max(len(quantized_activations) - len(getattr(model, "steps", [])), 0)
        return max(onnx_size(path, graph).weight_bytes - layers, 0) + 5 * unpriced


def _half_the_bytes(path: str, budgets: dict[str, str], log) -> dict[str, str]:
    """A float16 graph is read in float32, so its float32 size is twice its file's: a percentage
    byte budget is taken of the bytes the file holds (--max-weight-bytes 50% of a float16 file is
    the bytes int8 weights take, not float16 ones)."""
    from rankfold.evaluate import onnx_size
    from rankfold.target import parse_budget

    given = budgets["weight_bytes"]
    budget = parse_budget("weight_bytes", given)
    if not budget.relative:
        return budgets
    held = onnx_size(path).weight_bytes
    limit = int(budget.limit(held))
    log(f"  the file holds {held:,} weight bytes (float16): --max-weight-bytes {given} is {limit:,}")
    return {**budgets, "weight_bytes": str(limit)}


def _save_within(args: argparse.Namespace, result, limit: int) -> None:
    """result.save, staged in a scratch directory: the file takes args.output only when it holds at
    most `limit` weight bytes (weights outside the planned layers, such as those behind an
    already-quantized graph's QLinearConv ops, are written in float and count too)."""
    import tempfile

    from rankfold.evaluate import onnx_size
    from rankfold.io import replace_atomically

    with tempfile.TemporaryDirectory(prefix="rankfold-") as scratch:
        staged = os.path.join(scratch, os.path.basename(args.output))
        result.save(staged, observer=args.observer or "percentile", force=True, progress=_log(args.quiet))
        held = onnx_size(staged).weight_bytes
        if held > limit:
            raise RankfoldError(f"the result would hold {held:,} weight bytes, more than the {limit:,} allowed (the "
                                "input file's integer weights): weights outside the planned layers are written in "
                                "float; nothing was written. Give a larger --max-weight-bytes, or --bits 32 to "
                                "accept a float result")
        with open(staged, "rb") as handle:
            replace_atomically(args.output, handle.read())


def _clean_check_samples(result, calib, log):
    """Adversarial distillation teaches the student the teacher's clean answers where the teacher's
    own adversarial inputs fool it: its self-check judges the clean held-back samples only."""
    import dataclasses

    from rankfold.robustness import clean_calibration_samples

    if not result.plan.held_back:  # --no-check with few samples: nothing is held back
        return result
    clean = clean_calibration_samples(calib, len(calib) - result.plan.held_back)
    log(f"  the self-check after adversarial distillation judges the {len(clean)} clean held-back samples")
    return dataclasses.replace(result, check_samples=clean)


def _compress_finetune_config(args: argparse.Namespace, given, data_flag: str, torchrun_hint: str):
    """compress's FinetuneConfig when training data was given (`given`), else None; the fine-tuning
    options without data, a run without a length, a device torch cannot use and torchrun are
    refused first."""
    from rankfold.training import FinetuneConfig
    from rankfold.training.distributed import launched_by_torchrun, training_device

    asked = [f for f, v in (("--finetune-steps", args.finetune_steps), ("--finetune-minutes", args.finetune_minutes),
                            ("--finetune-lr", args.finetune_lr),
                            ("--finetune-feature-weight", args.finetune_feature_weight), ("--device", args.device))
             if v is not None]
    flag = data_flag.split()[0]
    if given is None:
        if asked:
            raise RankfoldError(f"{'/'.join(asked)} need {data_flag} (the inputs to fine-tune on)")
        return None
    if args.finetune_steps is None and args.finetune_minutes is None:
        raise RankfoldError(f"{flag} fine-tunes the result: say how long with --finetune-steps N or "
                            "--finetune-minutes M")
    training_device(args.device)
    if launched_by_torchrun():  # every process would plan, and measured plans can differ between them
        raise RankfoldError(torchrun_hint)
    try:
        chosen = {name: value for name, value in (("lr", args.finetune_lr),
                                                   ("feature_weight", args.finetune_feature_weight))
                  if value is not None}  # the rest keep FinetuneConfig's defaults
        return FinetuneConfig(steps=args.finetune_steps, minutes=args.finetune_minutes, **chosen)
    except ValueError as exc:
        raise RankfoldError(str(exc)) from None


def _text_training_ids(args: argparse.Namespace, config):
    """The token ids compress DIR --train-text trains on, or None; made and checked (one batch at
    least) before the model is read."""
    if config is None:
        return None
    from rankfold.frontends.hf import read_texts, training_ids
    from rankfold.training.distributed import World
    from rankfold.training.loop import check_training_data

    ids = training_ids(args.model, read_texts(args.train_text, "--train-text"), args.seq_len)
    check_training_data(ids, None, config, World())
    return ids


def _compress_training(args: argparse.Namespace, graph):
    """(training inputs, FinetuneConfig) for compress --train, or None; checked before any work."""
    import torch

    from rankfold.training.distributed import World
    from rankfold.training.loop import check_training_data

    config = _compress_finetune_config(args, args.train, "--train TRAIN.npz",
                                       "under torchrun, plan first (compress --plan-out PLAN.json), then run "
                                       "`torchrun ... rankfold.cli finetune MODEL --plan PLAN.json`")
    if config is None:
        return None
    data = _more_samples(args, graph, args.train, need_labels=False)
    train_x = torch.from_numpy(data.x)
    check_training_data(train_x, None, config, World())
    return train_x, config


def _finish(args: argparse.Namespace, result, example, t0: float, budgets: dict | None, ft_log=None) -> None:
    """Export, then print and write the plan and the report (nothing is written on failure); with
    `ft_log` (compress --train), what the fine-tuning did too."""
    from rankfold.evaluate import onnx_size
    from rankfold.io import write_json_atomic
    from rankfold.report import plan_table

    limit = getattr(args, "file_weight_limit", None)
    if limit is None:
        result.save(args.output, observer=args.observer or "percentile", force=args.force, progress=_log(args.quiet))
    else:
        _save_within(args, result, limit)
    seconds = time.time() - t0
    shape = _sample_shape(result.module, example)
    before, after = (onnx_size(path, sample_shape=shape) for path in (args.model, args.output))
    print(plan_table(result.plan))
    if ft_log is not None:
        print(_finetuned_line(ft_log))
    print(_size_line(before, after, seconds))
    print("self-check: " + (result.check.describe() if result.check is not None
                            else "not run (--no-check): the result is unchecked"))
    print(_wrote(args))
    if getattr(args, "plan_out", None):
        result.plan.save(args.plan_out)
        print(f"wrote {args.plan_out}")
    robustness = _robustness_side_by_side(args) if hasattr(args, "attack") else None
    if args.report:
        write_json_atomic(args.report, {
            "model": args.model, "output": args.output, "budgets": budgets, "seconds": seconds,
            "before": before.__dict__, "after": after.__dict__, "plan": result.plan.to_dict(),
            "robustness": robustness, "finetune": None if ft_log is None else ft_log.to_dict(),
            "self_check": None if result.check is None else result.check.to_dict(), **result.report.to_dict()})


def _size_line(before, after, seconds: float) -> str:
    def ratio(new: int, old: int) -> str:
        return f"{new / old:.1%}" if old else "n/a"

    return (f"parameters {before.params:,} -> {after.params:,} ({ratio(after.params, before.params)}), "
            f"MACs {before.macs:,} -> {after.macs:,} ({ratio(after.macs, before.macs)}), {seconds:.1f}s")


def _cmd_apply(args: argparse.Namespace) -> None:
    from rankfold.planner.plan import load_plan

    plan = load_plan(args.plan)
    split = _split_of(args)  # a plan that compress wrote for a graph's head applies to that head
    if split is not None:
        return _on_head(args, split, lambda: _apply(args, plan))
    return _apply(args, plan)


def _apply(args: argparse.Namespace, plan) -> None:
    from rankfold.planner.pipeline import CHECK_SAMPLES, apply_and_check

    _check_outputs(args)
    _graph, model, calib, example = _load_inputs(args)
    _require_check_data(args, calib, CHECK_SAMPLES, "an eighth, 16 to 128, is held back as in planning")
    log = _log(args.quiet)
    log(f"applying {args.plan} to {args.model}")
    log(args.memory_line)
    t0 = time.time()
    result = apply_and_check(model, plan, calib=calib, min_agreement=args.min_agreement,
                             max_output_error=args.max_output_error, example_input=example, check=not args.no_check,
                             rules=tuple(args.check), progress=lambda m: log("  " + m))
    _finish(args, result, example, t0, None)


def _cmd_finetune(args: argparse.Namespace) -> None:
    """Distil the original into its compression (from --plan, or a float --student file), check,
    write. Under torchrun every process trains its share; only rank 0 prints and writes."""
    import torch

    from rankfold.planner.pipeline import CHECK_SAMPLES
    from rankfold.training import finetune_result
    from rankfold.training.distributed import join_world, leave_world
    from rankfold.training.loop import check_training_data

    config = _finetune_config(args)
    if (args.plan is None) == (args.student is None):
        raise RankfoldError("give the compressed network: --plan PLAN.json (applied to MODEL) or --student FILE.onnx "
                            "(a float compression of MODEL), one of them")
    plan = _plan_or_student(args)
    _check_outputs(args)
    refuse_empty_path("--checkpoint", args.checkpoint, "directory")
    graph, model, calib, example = _load_inputs(args)
    _require_check_data(args, calib, CHECK_SAMPLES, "an eighth, 16 to 128, is held back for the self-check")
    train = _more_samples(args, graph, args.train, need_labels=args.label_weight > 0)
    limit = args.train_limit or len(train.x)
    train_x = torch.from_numpy(train.x[:limit])
    labels = torch.from_numpy(train.y[:limit]).long() if args.label_weight > 0 else None
    attack = _adversarial_distillation(args, train.x)
    world = join_world(args.device)
    check_training_data(train_x, labels, config, world)
    if args.checkpoint:  # made last: nothing is made when an input is wrong
        _checkpoint_directory(args.checkpoint, [args.model, args.train, args.calib, args.plan, args.student])
    log = _log(args.quiet or not world.is_main)
    try:
        t0 = time.time()
        result = _student_result(args, plan, model, calib, example, log)
        log(f"fine-tuning on {len(train_x)} samples of {args.train} ({world.size} process"
            f"{'es' if world.size > 1 else ''}, global batch {config.batch_size}, on {world.device})")
        result, ft_log = finetune_result(result, train_x, config=config, labels=labels, check=not args.no_check,
                                         checkpoint_dir=args.checkpoint, qat=not args.no_qat,
                                         progress=lambda m: log("  " + m), attack=attack,
                                         max_memory=args.max_memory, device=args.device)
        if world.is_main:
            _finish_finetune(args, result, ft_log, example, t0)
        world.barrier()
    finally:
        leave_world()


def _adversarial_distillation(args: argparse.Namespace, x):
    """finetune --adversarial-eps: the AttackConfig of adversarial distillation, checked against the
    training data's channels (None without it)."""
    from rankfold.robustness import AttackConfig

    if args.adversarial_eps is None:
        stray = [flag for flag, value in (("--pixel-mean", args.pixel_mean), ("--pixel-std", args.pixel_std)) if value]
        if stray:
            raise RankfoldError(f"{'/'.join(stray)} give the units of --adversarial-eps: give it too")
        return None
    try:
        config = AttackConfig("pgd", (args.adversarial_eps,), pixel_mean=args.pixel_mean, pixel_std=args.pixel_std)
    except ValueError as exc:
        raise RankfoldError(str(exc).replace("pixel_mean and pixel_std", "--pixel-mean and --pixel-std")) from None
    config.check_channels(x, "--pixel-mean/--pixel-std")
    return config


def _checkpoint_directory(path: str, inputs: list) -> None:
    """A directory for the checkpoint: new (made now) or existing; rankfold writes only its
    checkpoint file in it, and a file of that name it did not write is refused on resume."""
    import os

    if os.path.lexists(path) and not os.path.isdir(path):
        raise RankfoldError(f"--checkpoint {path} exists and is not a directory")
    if any(source and os.path.abspath(source) == os.path.abspath(path) for source in inputs):
        raise RankfoldError(f"--checkpoint {path} is an input")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise RankfoldError(f"--checkpoint {path}: cannot make the directory ({exc.strerror})") from None
    if not os.access(path, os.W_OK):
        raise RankfoldError(f"--checkpoint {path} is not writable")


def _finetune_config(args: argparse.Namespace):
    from rankfold.training import FinetuneConfig

    if args.steps is None and args.minutes is None:
        raise RankfoldError("say how long to fine-tune: --steps N and/or --minutes M")
    for flag, value in (("--qat-steps", args.qat_steps), ("--qat-activations", args.qat_activations)):
        if args.no_qat and value:
            raise RankfoldError(f"{flag} sets quantization-aware training, which --no-qat turns off: give one")
    try:
        return FinetuneConfig(steps=args.steps, minutes=args.minutes, batch_size=args.batch_size, lr=args.lr,
                              optimizer=args.optimizer, temperature=args.temperature,
                              label_weight=args.label_weight, seed=args.seed, log_every=args.log_every,
                              feature_weight=args.feature_weight,
                              checkpoint_every=args.checkpoint_every, weight_decay=args.weight_decay,
                              weight_steps=args.qat_steps or "max-abs",
                              activation_steps=args.qat_activations or "calibrated")
    except (ValueError, TypeError) as exc:
        raise RankfoldError(str(exc)) from None


def _plan_or_student(args: argparse.Namespace):
    """The plan (read and validated now), or None for a --student file, which must be a float model."""
    from rankfold.frontends.onnx import read_onnx
    from rankfold.planner.plan import load_plan

    if args.plan is not None:
        return load_plan(args.plan)
    graph = read_onnx(args.student)
    quantized = sorted({n.op_type for n in graph.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear",
                                                                            "QLinearConv", "ConvInteger")})
    if quantized:
        raise RankfoldError(f"{args.student} is quantized ({', '.join(quantized)}): give the plan it was made with "
                            "(--plan), so the fine-tuned result is quantized again at the plan's bit-widths")
    return None


def _student_result(args: argparse.Namespace, plan, model, calib, example, log):
    from rankfold.apply import CompressionReport
    from rankfold.frontends.onnx import load_onnx
    from rankfold.planner.pipeline import apply_and_check
    from rankfold.result import Compressed

    if plan is not None:
        log(f"applying {args.plan} to {args.model}")
        return apply_and_check(model, plan, calib=calib, min_agreement=args.min_agreement,
                               max_output_error=args.max_output_error, example_input=example, check=False,
                               rules=tuple(args.check), progress=lambda m: log("  " + m))
    packing = getattr(model, "packing", None)  # a student made from a packed read takes the same inputs
    if packing is not None:
        from rankfold.frontends.onnx import read_onnx
        from rankfold.frontends.packing import packing_for

        packing = packing_for(read_onnx(args.student), packing.names, packing.shapes)
    student = load_onnx(args.student, packing=packing)
    return Compressed(student, CompressionReport(), None, model, calib, None, example, args.min_agreement,
                      args.max_output_error, tuple(args.check))


def _finetuned_line(ft_log) -> str:
    return (f"fine-tuned {ft_log.steps} steps ({ft_log.samples_seen:,} samples seen, {ft_log.processes} process(es), "
            f"{ft_log.seconds:.0f} s of training)")


def _finish_finetune(args: argparse.Namespace, result, ft_log, example, t0: float) -> None:
    from rankfold.evaluate import onnx_size
    from rankfold.io import write_json_atomic

    result.save(args.output, observer=args.observer or "percentile", force=args.force, progress=_log(args.quiet))
    seconds = time.time() - t0
    shape = _sample_shape(result.module, example)
    before, after = (onnx_size(path, sample_shape=shape) for path in (args.model, args.output))
    print(_finetuned_line(ft_log))
    print(_size_line(before, after, seconds))
    print("self-check: " + (result.check.describe() if result.check is not None
                            else "not run (--no-check): the result is unchecked"))
    print(f"wrote {args.output}" + _fixed_sizes_line(args))
    if args.report:
        write_json_atomic(args.report, {
            "model": args.model, "output": args.output, "plan": args.plan, "student": args.student,
            "seconds": seconds, "finetune": ft_log.to_dict(), "before": before.__dict__, "after": after.__dict__,
            "self_check": None if result.check is None else result.check.to_dict()})


def _cmd_pareto(args: argparse.Namespace) -> None:
    from rankfold.planner.pareto import run_pareto

    try:
        budgets = [float(v.strip().rstrip("%")) / 100 for v in args.points.split(",")]
    except ValueError:
        raise RankfoldError(f"--points: expected comma-separated percentages such as 2,5,10, got {args.points!r}") \
            from None
    if any(not 0 < b <= 1 for b in budgets):  # NaN fails this too
        raise RankfoldError("--points are weight-byte percentages in (0, 100]")
    from rankfold.target import load_target

    load_target(args.target)  # a bad profile fails before the model is read
    check_outputs({"model": args.model, "--calib": args.calib, "--data": args.data},
                  {"--plot": args.plot, "--json": args.json}, force=args.force)
    graph, model, calib, example = _load_inputs(args)
    data = None
    if args.data:
        loaded = _more_samples(args, graph, args.data, need_labels=True)
        data = (loaded.x[: args.limit or None], loaded.y[: args.limit or None])
    _log(args.quiet)(args.memory_line)
    result = run_pareto(model, args.model, calib=calib, example=example, target=args.target, fractions=budgets,
                        data=data, measure_points=args.measure, plot=args.plot, json_out=args.json,
                        min_rank=args.min_rank, progress=_log(args.quiet))
    print("\n".join(result["lines"]))


def _cmd_export_c(args: argparse.Namespace) -> None:
    import os

    import numpy as np

    from rankfold.cexport.codegen import RAM_TABLE
    from rankfold.cexport.run import export_c, is_qdq, quantize_for_c
    from rankfold.data import check_input_shape, load_npz
    from rankfold.frontends.onnx import read_onnx
    from rankfold.target import load_target

    check_output_directory(args.output, {"model": args.model, "--calib": args.calib}, force=args.force)
    model = read_onnx(args.model)
    target = load_target(args.target) if args.target is not None else None  # '' is refused by name
    log = _log(args.quiet)
    sample_shape = None
    if args.calib:  # its samples' size is the size the C program runs (a model may leave H and W open)
        calib = load_npz(args.calib, need_labels=False).x[: args.calib_limit].astype(np.float32)
        check_input_shape(calib, _input_dims(model), args.calib)
        sample_shape = calib.shape[1:]
    if not is_qdq(model):
        if not args.calib:
            raise RankfoldError(f"{args.model} is a float model: give --calib data to quantize it to int8 first")
        log(f"quantizing {args.model} to int8 with {len(calib)} calibration samples")
        model = quantize_for_c(args.model, calib, lambda m: log("  " + m))
    info = export_c(model, args.output, target=target, sample_shape=sample_shape)
    print(f"wrote {args.output}: {info['ops']} ops, {info['macs']:,} MACs per sample")
    print(f"flash (weights, biases, multipliers): {info['weight_bytes']:,} bytes"
          + (f" of {target.flash_bytes:,} ({target.name})" if target and target.flash_bytes else ""))
    print(f"RAM (arena): {info['arena_bytes']:,} bytes"
          + (f" of {target.ram_bytes:,} ({target.name})" if target and target.ram_bytes else "")
          + f"; the layers that need the most (live tensors + scratch; every layer: "
          f"{os.path.join(args.output, RAM_TABLE)}):")
    for row in sorted(info["ram_per_op"], key=lambda r: -(r["tensor_bytes"] + r["scratch_bytes"]))[:3]:
        print(f"  {row['op']}: {row['tensor_bytes'] + row['scratch_bytes']:,} bytes ({row['tensor_bytes']:,} + "
              f"{row['scratch_bytes']:,})")
    if "flash_bytes" in info:
        print(f"built for {info['cpu']}: flash (code + weights) {info['flash_bytes']:,} bytes"
              + (f" of {target.flash_bytes:,}" if target.flash_bytes else "")
              + f", static RAM (arena + buffers) {info['static_ram_bytes']:,} bytes"
              + (f" of {target.ram_bytes:,}" if target.ram_bytes else "")
              + "; the stack and instructions per MAC: rankfold run-c DIR --qemu BOARD")
    elif target is not None and target.name.startswith("cortex-m"):
        print("arm-none-eabi-gcc not found: code size not measured (install gcc-arm-none-eabi)")


def _cmd_run_c(args: argparse.Namespace) -> None:
    from rankfold.cexport.run import run_c
    from rankfold.data import load_npz

    data = load_npz(args.data, need_labels=False)  # without labels: no accuracy, every other comparison
    x, y = data.x, data.y
    if args.limit:
        x, y = x[: args.limit], None if y is None else y[: args.limit]
    result = run_c(args.dir, x, y, sanitize=args.sanitize, qemu=args.qemu, qemu_samples=args.qemu_samples,
                   progress=_log(args.quiet))
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:34} {value}")


def _cmd_targets(args: argparse.Namespace) -> None:
    from importlib import resources

    from rankfold.target import builtin_targets, load_target

    if args.show is not None:  # an empty name is refused by load_target, not read as "list them all"
        load_target(args.show)
        print((resources.files("rankfold") / "targets" / f"{args.show}.toml").read_text()
              if args.show in builtin_targets() else open(args.show).read(), end="")
        return
    for name in builtin_targets():
        t = load_target(name)
        print(f"{name:12} {t.description}")
    print(int8_choice(load_target("host")))


def _cmd_demo(args: argparse.Namespace) -> None:
    from rankfold.demo import run_demo

    refuse_empty_path("--out", args.out, "directory")
    run_demo(args.out, epochs=args.epochs, target=args.target, max_weight_bytes=args.max_weight_bytes)


def _first_input(graph):
    inits = {i.name for i in graph.graph.initializer}
    return next(i for i in graph.graph.input if i.name not in inits)


def _input_dims(graph) -> list:
    """The first input's dims: ints where static, None where symbolic."""
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in _first_input(graph).type.tensor_type.shape.dim]


def _example_input(graph):
    import torch

    dims = _input_dims(graph)
    if any(d is None for d in dims[1:]):
        raise RankfoldError("the model's input has dynamic dimensions besides the batch: give --calib data")
    return torch.zeros(2, *dims[1:])


def _check_outputs(args: argparse.Namespace) -> None:
    """compress / apply: every output checked against every input and each other, before any work."""
    check_outputs({"model": args.model, "--calib": args.calib, "plan": getattr(args, "plan", None),
                   "--train": getattr(args, "train", None), "--student": getattr(args, "student", None),
                   "--attack-data": getattr(args, "attack_data", None)},
                  {"-o": args.output, "--plan-out": getattr(args, "plan_out", None), "--report": args.report},
                  force=args.force)


def _log(quiet: bool):
    return (lambda _m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))


def _model_args(p: argparse.ArgumentParser, *, plans: bool = True, writes: bool = True,
                directories: bool = False) -> None:
    """The model and calibration options; `plans`: --min-rank (apply takes its ranks from the plan),
    `writes`: --min-agreement and --observer (pareto writes no model), `directories`: MODEL may be
    a Hugging Face model directory (compress)."""
    from rankfold.settings import DEFAULT_MIN_AGREEMENT, DEFAULT_MIN_RANK

    p.add_argument("model", help="model .onnx" + (" or a Hugging Face model directory" if directories else ""))
    p.add_argument("--calib", help=".npz with x: calibration inputs (labels not needed)")
    p.add_argument("--calib-limit", type=_positive_int, default=512,
                   help="use at most N calibration samples (default 512)")
    if plans:
        p.add_argument("--min-rank", type=_positive_int, default=DEFAULT_MIN_RANK,
                       help="never factorize a layer below this rank (default 8)")
    if writes:
        p.add_argument("--min-agreement", type=_fraction, default=DEFAULT_MIN_AGREEMENT,
                       help="refuse a result whose top-1 agrees with the original on fewer held-back calibration "
                            "samples than this (sequences: read alike; score maps: their IoU) (default "
                            f"{DEFAULT_MIN_AGREEMENT})")
        p.add_argument("--observer", default=None, choices=sorted(OBSERVER_NAMES),
                       help="activation range observer for quantized layers (default percentile)")
    p.add_argument("--max-memory", type=_memory_size, default=None,
                   help="peak memory to stay under, e.g. 2GB or 800MB: calibration passes run in batches small "
                        "enough for it, and a fine-tuning step too large for it runs in micro-batches whose "
                        "gradients add up (default half of the memory available)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")


def _text_args(p: argparse.ArgumentParser) -> None:
    """Calibration text for a Hugging Face model directory (MODEL is then that directory)."""
    p.add_argument("--calib-text", help="model directory: calibration text, a .txt file or a directory of them")
    p.add_argument("--seq-len", type=_seq_len, default=256,
                   help="model directory: tokens per calibration window (default 256)")
    p.add_argument("--samples", type=_positive_int, default=128,
                   help="model directory: calibration windows (causal LMs) or sentences (encoders) (default 128)")


def _seq_len(text: str) -> int:
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected at least 2 tokens, got {text!r}")
    return value


def _memory_size(text: str) -> int:
    """'2GB', '800MB', '1.5G', '512k' or a number of bytes."""
    import math
    import re

    units = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20, "g": 2**30, "gb": 2**30}
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    try:
        value = float(match.group(1)) * units[match.group(2).lower()] if match else float("nan")
    except (ValueError, KeyError):
        value = float("nan")
    if not math.isfinite(value) or value < 1:
        raise argparse.ArgumentTypeError(f"expected a memory size such as 2GB or 800MB, got {text!r}")
    return int(value)


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad option ending in one line on stderr (and exit code 2), like every error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _device_arg(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument("--device", help=f"{prefix}where the training runs: cpu (default), cuda or cuda:N (one process; "
                                    "the teacher runs there too, the self-check on the CPU; under torchrun with "
                                    "several processes each takes the GPU of its local rank, and a single one is a "
                                    "plain run)")


def _positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _count(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 (all) or a positive integer, got {text!r}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float_in(text: str, low: float, high: float, expected: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not math.isfinite(value) or not low <= value <= high:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _float_between_0_1(text: str) -> float:
    value = _float_in(text, 0.0, 1.0, "a number in (0, 1]")
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _float_list(text: str) -> tuple[float, ...]:
    return tuple(_float_in(t, -float("inf"), float("inf"), "comma-separated numbers") for t in text.split(","))


def _eps_list(text: str) -> tuple[float, ...]:
    return tuple(_float_in(t, 0.0, float("inf"), "comma-separated numbers >= 0") for t in text.split(","))


def _fraction(text: str) -> float:
    return _float_in(text, 0.0, 1.0, "a number in [0, 1]")


def _open_fraction(text: str) -> float:
    value = _float_in(text, 0.0, 1.0, "a number between 0 and 1 (exclusive)")
    if value in (0.0, 1.0):
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1 (exclusive), got {text!r}")
    return value


def _check_rule(text: str):
    from rankfold.check_rules import parse_check_rule

    try:
        return parse_check_rule(text)
    except RankfoldError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: " + str(exc).removeprefix(f"--check {text!r}: ")) from None


def _positive_float(text: str) -> float:
    value = _float_in(text, 0.0, float("inf"), "a number > 0")
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _nonnegative(text: str) -> float:
    return _float_in(text, 0.0, float("inf"), "a number >= 0")


def _check_args(p: argparse.ArgumentParser) -> None:
    from rankfold.settings import DEFAULT_MAX_OUTPUT_ERROR

    p.add_argument("--max-output-error", type=_nonnegative, default=DEFAULT_MAX_OUTPUT_ERROR,
                   help="refuse a result whose outputs that are not class scores differ from the original's by "
                        f"more than this relative error (default {DEFAULT_MAX_OUTPUT_ERROR})")
    p.add_argument("--check", type=_check_rule, action="append", default=[], metavar="[OUTPUT=]METRIC:THRESHOLD",
                   help="what the self-check requires, replacing the default for the outputs it names (all when "
                        "no OUTPUT= is given); repeatable. METRIC: top1 (argmax agreement, per position for "
                        "sequences), sequence (read alike: equal after greedy CTC decoding of the argmaxes), "
                        "cosine, relerr, iou@LEVEL (maps thresholded at LEVEL, default 0.5). Defaults: top1 >= "
                        "--min-agreement for class scores and class maps, sequence >= --min-agreement for (N, T, "
                        "classes) softmax sequences, relerr <= --max-output-error for every other output, and also "
                        "iou@0.5 >= --min-agreement on its score channels where it has some (values in [0, 1]: a "
                        "detector's scores, a probability map); iou is measured on those channels alone, relerr on "
                        "them and on the other channels apart (the worse)")
    p.add_argument("--embedding", action="append", default=[], metavar="OUTPUT",
                   help="read this output (name or index; repeatable) as an embedding: checked by cosine (0.98 by "
                        "default, --check cosine:T to change it) and planned as a vector, not as class scores. "
                        "Outputs divided by their L2 norm, made by a BatchNormalization or named *embed* are read so "
                        "anyway")
    p.add_argument("--no-check", action="store_true",
                   help="write the result even though the self-check cannot run (too few calibration samples)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rankfold", description="Shrink trained networks for edge hardware.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("eval", help="measure an ONNX model: accuracy, size, MACs, latency",
                       description="Top-1 accuracy, parameters, MACs, weight/file bytes and onnxruntime latency "
                                   "(1 thread, median of --runs after warm-up) at batch 1 and 32.")
    p.add_argument("model", help="model .onnx, or a model directory (Hugging Face, or written by compress)")
    p.add_argument("--data", help=".npz with x (N, ...) float32 and y (N,) int labels (ONNX models)")
    p.add_argument("--text", help="model directory: text to measure on, a .txt file or a directory of them "
                                  "(perplexity for a language model; embedding cosine to --original for an encoder)")
    p.add_argument("--seq-len", type=_seq_len, default=256, help="model directory: tokens per window (default 256)")
    p.add_argument("--samples", type=_positive_int, default=128,
                   help="model directory: windows (language models) or sentences (encoders) (default 128)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--limit", type=_count, default=0, help="use only the first N samples (default 0: all)")
    p.add_argument("--runs", type=_positive_int, default=30, help="timed runs per latency (default 30)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("-q", "--quiet", action="store_true", help="no attack progress on stderr")
    _attack_args(p, compress=False)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("compress", help="compress an ONNX model: planned under budgets, or uniformly",
                       description="With --target and/or --max-* budgets the planner chooses every layer's "
                                   "method and rank (global knapsack on measured costs), applies the plan, and "
                                   "checks the result against the original on held-back calibration samples. "
                                   "Without them every layer keeps --keep of its parameters. Budget values: "
                                   "a percentage of the original (10%%) or absolute with a unit (300k, 2MB, "
                                   "512KB, 1.5ms; KB = 1024 bytes).")
    _model_args(p, directories=True)
    _check_args(p)
    _attack_args(p, compress=True)
    _text_args(p)
    p.add_argument("-o", "--output", required=True, help="output .onnx (for a model directory: a new directory "
                                                         "that rankfold.load_compressed reads)")
    p.add_argument("--target", help="target profile: host (default), cortex-m4, cortex-m7, cortex-m55 or a .toml")
    p.add_argument("--max-params", help="parameter budget, e.g. 10%% or 1.2M")
    p.add_argument("--max-weight-bytes", help="weight bytes at the target's bit-width, e.g. 3%% or 2MB (a percentage "
                                              "of an already-quantized graph is of the bytes its file holds)")
    p.add_argument("--max-macs", help="multiply-accumulates per sample, e.g. 25%% or 100M")
    p.add_argument("--max-latency", help="batch-1 latency, e.g. 30%% or 4ms (measured on host, modelled on MCUs)")
    p.add_argument("--max-ram", help="peak activation memory, e.g. 256KB")
    p.add_argument("--bits", default=None, help="weight bit-width: auto (the planner picks per layer from the "
                                                  "target's set; first and last layer float or int8, never "
                                                  "int4, where the target runs float), 32, 8 or 4")
    p.add_argument("--group-size", type=_positive_int, default=None,
                   help="int4 weights may also take one scale per N input elements of each output channel (Linear "
                        "layers and embedding tables; onnxruntime targets), e.g. 32: finer, 1 bit more per weight")
    p.add_argument("--plan-out", help="write the plan (editable JSON) here")
    p.add_argument("--method", default=None, help="uniform mode: svd | tucker2 | cp | spatial-svd | auto "
                                                  "(default tucker2)")
    p.add_argument("--keep", type=float, default=None, help="uniform mode: fraction of each layer's parameters "
                                                            "kept, in (0, 1] (default 0.5)")
    p.add_argument("--ranks", help="uniform mode: 'vbmf' chooses each layer's ranks from its weights alone "
                                   "(EVBMF) instead of --keep")
    p.add_argument("--train", help="planned mode: also fine-tune the result on these inputs (.npz with x) before "
                                   "the self-check (rankfold finetune with its defaults)")
    p.add_argument("--train-text", help="model directory: also fine-tune the result on this text (a .txt file or a "
                                        "directory of them; windows of --seq-len tokens, every one of them) before "
                                        "the self-check: distillation, KL per token for a language model, relative "
                                        "error of the embedding for an encoder")
    p.add_argument("--finetune-steps", type=_positive_int,
                   help="with --train/--train-text: optimizer steps of 64 samples")
    p.add_argument("--finetune-minutes", type=_positive_float,
                   help="with --train/--train-text: a time budget for fine-tuning")
    p.add_argument("--finetune-lr", type=_positive_float,
                   help="with --train/--train-text: peak learning rate (default 3e-4; a pretrained detector from the "
                        "field may need less: YOLOv8n kept its score maps best at 3e-5)")
    p.add_argument("--finetune-feature-weight", type=_nonnegative, metavar="W",
                   help="with --train/--train-text: add feature matching with this weight, the relative squared "
                        "error of each factorized or quantized layer's output to the original layer's on the same "
                        "batch (as rankfold finetune --feature-weight; default 0: off)")
    _device_arg(p, "with --train/--train-text: ")
    p.add_argument("--mlp-keep", type=_open_fraction, metavar="FRACTION",
                   help="model directory, planned mode: first keep this fraction of every feed-forward block's "
                        "hidden neurons (chosen and refitted on the calibration text), then plan the rest of the "
                        "budget; budgets in %% stay fractions of the original (default: no pruning)")
    p.add_argument("--report", help="also write the report as JSON")
    p.add_argument("--force", action="store_true", help="replace output files that exist (never an input)")
    p.set_defaults(func=_cmd_compress)

    p = sub.add_parser("apply", help="apply a plan file to an ONNX model",
                       description="Apply PLAN.json (from compress --plan-out, perhaps edited) deterministically: "
                                   "the same model, plan and calibration data give the same output.")
    p.add_argument("plan", help="plan .json")
    _model_args(p, plans=False)
    _check_args(p)
    p.add_argument("-o", "--output", required=True, help="output .onnx")
    p.add_argument("--report", help="also write the report as JSON")
    p.add_argument("--force", action="store_true", help="replace output files that exist (never an input)")
    p.set_defaults(func=_cmd_apply)

    p = sub.add_parser("finetune", help="distil the original into its compression (and run under torchrun)",
                       description="Trains the compressed network (a plan applied to MODEL, or a float --student "
                                   "file) to reproduce MODEL's outputs on --train inputs (distillation: KL at a "
                                   "temperature on class scores, KL per position on softmax outputs such as CTC "
                                   "frames, relative squared error on other outputs; labels optional), then runs "
                                   "compress's self-check and writes the result (QDQ when the plan quantizes). The "
                                   "same command runs under `torchrun --nproc_per_node N` (DistributedDataParallel, "
                                   "gloo on CPU, nccl on GPU): each process trains its share of the global batch "
                                   "and rank 0 writes.")
    _model_args(p, plans=False)
    _check_args(p)
    p.add_argument("--plan", help="plan .json (from compress --plan-out) to apply to MODEL")
    p.add_argument("--student", help="a float compressed .onnx of MODEL to train instead of --plan")
    p.add_argument("--train", required=True, help=".npz with x (and y for --label-weight): training inputs")
    p.add_argument("--train-limit", type=_count, default=0, help="use only the first N training samples")
    p.add_argument("-o", "--output", required=True, help="output .onnx")
    p.add_argument("--steps", type=_positive_int, help="optimizer steps of --batch-size samples")
    p.add_argument("--minutes", type=_positive_float, help="time budget: the steps are set from the speed of the "
                                                          "steps after the first, and the run stops at 1.1 times the "
                                                          "budget if later steps slow down (with --steps: the smaller)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="global batch (default 64)")
    _device_arg(p)
    p.add_argument("--lr", type=_positive_float, default=3e-4, help="peak learning rate (default 3e-4; warm-up, "
                                                                    "then cosine)")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                   help="adamw (default) or sgd (Nesterov momentum 0.9; factorized networks diverge with SGD above "
                        "about 1e-3)")
    p.add_argument("--weight-decay", type=_nonnegative, default=0.0, help="default 0")
    p.add_argument("--temperature", type=_positive_float, default=4.0,
                   help="distillation temperature of class scores (default 4; softmax outputs are distilled "
                   "unsoftened)")
    p.add_argument("--label-weight", type=_fraction, default=0.0,
                   help="weight of cross-entropy on --train's labels y, against distillation (default 0: no labels)")
    p.add_argument("--feature-weight", type=_nonnegative, default=0.0,
                   help="add feature matching with this weight: the relative squared error of each factorized or "
                        "quantized layer's output to the original layer's on the same batch (one more pass of the "
                        "original per step; default 0: off)")
    p.add_argument("--seed", type=_integer, default=0, help="data order (default 0)")
    p.add_argument("--log-every", type=_positive_int, default=50, help="progress every N steps (default 50)")
    p.add_argument("--checkpoint", help="directory for a checkpoint every --checkpoint-every steps; a run "
                                        "started again with it resumes where it stopped")
    p.add_argument("--checkpoint-every", type=_positive_int, default=100, help="default 100")
    p.add_argument("--no-qat", action="store_true",
                   help="train a quantizing plan in float and quantize afterwards as compress does (default: its "
                        "quantized layers train through their weights' quantization, and the QDQ file holds exactly "
                        "the trained weights)")
    p.add_argument("--qat-steps", choices=QAT_STEP_NAMES,
                   help="how quantized layers set each channel's step while training: max-abs (default; the "
                        "exporter's rule) or lsq (learned, started at the least-error clipping; the file holds the "
                        "learned steps)")
    p.add_argument("--qat-activations", choices=QAT_ACTIVATION_NAMES,
                   help="the int8 steps of quantized layers' inputs: calibrated (default; from the calibration data "
                        "after training, as compress does) or lsq (learned while training, started at the calibrated "
                        "ones; the file holds the learned steps)")
    p.add_argument("--adversarial-eps", type=_positive_float,
                   help="adversarial distillation: each batch is also trained on inputs moved within this eps to "
                        "where the student departs most from the teacher (pixel units with --pixel-mean/"
                        "--pixel-std, else input units); the self-check then judges the clean held-back samples")
    p.add_argument("--pixel-mean", type=_float_list, help="the input normalization (x = (pixel - mean) / std), one "
                   "value or one per channel: --adversarial-eps is then in pixels and moved inputs stay in [0, 1]")
    p.add_argument("--pixel-std", type=_float_list, help="see --pixel-mean")
    p.add_argument("--report", help="also write the report as JSON (training history included)")
    p.add_argument("--force", action="store_true", help="replace output files that exist (never an input)")
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("pareto", help="accuracy-loss vs size/latency front; what fits a target",
                       description="Solve the plan at several weight-byte budgets, print the estimated loss, "
                                   "weight bytes and latency of each, plot them (--plot), measure accuracy at a "
                                   "few points (--data), and say the least compression that fits the target.")
    _model_args(p, writes=False)
    p.add_argument("--target", default="host", help="target profile (default host)")
    p.add_argument("--points", default="2,3,5,7,10,15,20,30,50,75",
                   help="weight-byte budgets in %% of the original (default 2,3,5,7,10,15,20,30,50,75)")
    p.add_argument("--data", help=".npz with x and y: measure top-1 at --measure points of the front")
    p.add_argument("--limit", type=_count, default=0, help="use only the first N samples of --data (default 0: all)")
    p.add_argument("--measure", type=_count, default=3, help="how many points to apply and measure (default 3)")
    p.add_argument("--plot", help="write the front as a PNG")
    p.add_argument("--json", help="write the front as JSON")
    p.add_argument("--force", action="store_true", help="replace output files that exist (never an input)")
    p.set_defaults(func=_cmd_pareto)

    p = sub.add_parser("export-c", help="write an int8 QDQ model as plain C99 source",
                       description="Writes DIR with model.h/model.c (static const int8 weights, int32 biases and "
                                   "per-channel multipliers and shifts, one static arena), the int8 kernels, a test "
                                   "main.c, a Makefile (`make host`, `make cortex-m CPU=cortex-m7`) and ram.txt (each "
                                   "layer's RAM). A float model is quantized to int8 first "
                                   "with --calib. Nothing is written when the model needs an op the C back-end "
                                   "lacks or does not fit --target.")
    p.add_argument("model", help="model .onnx (QDQ, or float with --calib)")
    p.add_argument("-o", "--output", required=True, help="output directory: new or empty; --force replaces one "
                                                         "that export-c wrote")
    p.add_argument("--force", action="store_true", help="replace an output directory that export-c wrote "
                                                        "(never one holding other files)")
    p.add_argument("--target", help="check flash and RAM against this profile (e.g. cortex-m7)")
    p.add_argument("--calib", help=".npz with x: calibration inputs, to quantize a float model; their size is the "
                                   "input size the C program runs (a model may leave height and width open)")
    p.add_argument("--calib-limit", type=_positive_int, default=512)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_export_c)

    p = sub.add_parser("run-c", help="build the exported C on this machine, run it on data, compare",
                       description="Builds DIR with the host compiler (-Wall -Wextra -std=c99 -pedantic -Werror), "
                                   "runs it on --data and reports top-1 accuracy, mismatches against the NumPy "
                                   "golden model of the same integer arithmetic, and top-1 agreement with "
                                   "onnxruntime on the QDQ model.")
    p.add_argument("dir", help="directory written by export-c")
    p.add_argument("--data", required=True, help=".npz with x (and y, for accuracy)")
    p.add_argument("--limit", type=_count, default=0, help="use only the first N samples")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--sanitize", action="store_true", help="build with -fsanitize=address,undefined")
    p.add_argument("--qemu", help="also cross-compile and run under qemu on this board: mps2-an386 (Cortex-M4), "
                                  "mps2-an500 (Cortex-M7), mps2-an385 (Cortex-M3)")
    p.add_argument("--qemu-samples", type=_positive_int, default=5, help="samples to run under qemu (default 5)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_run_c)

    p = sub.add_parser("targets", help="list the built-in target profiles, or print one (--show NAME)")
    p.add_argument("--show", help="print this profile's TOML (copy it to make your own)")
    p.set_defaults(func=_cmd_targets)

    p = sub.add_parser("demo", help="the product in three minutes: plan a CNN for a microcontroller, export C, run it",
                       description="Trains (or reuses) a small CNN on Fashion-MNIST (Debian dataset-fashion-mnist) "
                                   "or scikit-learn's digits, plans it for a microcontroller with rank and bit-width "
                                   "chosen together, compares with uniform Tucker-2 at the same size, draws the "
                                   "front, exports C and runs it against the golden model (and under qemu when the "
                                   "Arm toolchain is installed).")
    p.add_argument("--out", default="out/demo", help="output directory (default out/demo)")
    p.add_argument("--epochs", type=_positive_int, default=2, help="training epochs (default 2)")
    p.add_argument("--target", default="cortex-m4", help="target profile (default cortex-m4)")
    p.add_argument("--max-weight-bytes", default="8%", help="weight-byte budget (default 8%% of the float network)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from rankfold.settings import DEFAULT_BATCH, batches_of

    args = build_parser().parse_args(argv)
    try:
        with batches_of(DEFAULT_BATCH):  # a batch chosen for this command's budget ends with it
            args.func(args)
    except RankfoldError as exc:
        print(f"rankfold: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the machine, not the input: a full disk, a vanished file, no permission
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"rankfold: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rankfold: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
