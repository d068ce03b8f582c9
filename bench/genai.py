"""A language model as onnxruntime-genai's model builder writes it (issue 16's ONNX front-end, issue
14's "exported by many tools"): SmolLM2-135M (bench/smollm2.py's float directory) built into one
ONNX file with GroupQueryAttention, SkipSimplifiedLayerNormalization, a packed q, k, v MatMul per
block, the token table tied to the LM head, and 30 past / present key-value caches, then
compressed by `rankfold compress` from the command line; both files' perplexity measured in
onnxruntime on held-back windows of the Python documentation (bench/text.py splits).

    pip install onnxruntime-genai==0.18.0 --no-deps   # its builder, and its runtime to generate
    PYTHONPATH=. python -m bench.genai [--cuts 0.1,0.2] [--bytes 0.25] [--calib 128] [--seq-len 128]
                                      [--held 64] [--prompts 8]

Calibration: the first --calib windows of the "calib" split, their all-ones mask and empty caches
given once (the written file takes them again: rankfold writes the result into the file's own
graph); each cut removes that fraction of the decoder blocks' Linear parameters (bench/smollm2.py's
count) as a --max-params budget over the file's parameters (the tied table and head counted
once); each --bytes fraction is a --max-weight-bytes budget. Each written file is then run by
onnxruntime-genai's own runtime beside the original's genai_config.json and tokenizer: greedy
generation of 32 tokens after the first 32 tokens of --prompts held-back windows, against the
original's (the same first token, the common prefix, tokens per second).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

from bench.smollm2 import float_directory
from bench.text import sentences

RESULTS = os.path.join(os.path.dirname(__file__), "results", "genai.json")
BLOCK_LINEAR_PARAMS = 106_168_320  # SmolLM2-135M: 30 blocks of q, k, v, o, gate, up, down
LAYERS, KV_HEADS, HEAD_SIZE = 30, 3, 64


def built_file(directory: str, work: str) -> str:
    """The model builder's fp32 CPU file for the float directory (built once into `work`)."""
    out = os.path.join(work, "smollm2-genai")
    path = os.path.join(out, "model.onnx")
    if not os.path.isfile(path):
        try:
            import onnxruntime_genai  # noqa: F401
        except ImportError:
            raise SystemExit("building the file needs: pip install onnxruntime-genai==0.18.0 --no-deps") from None
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", directory, "-o", out,
                        "-p", "fp32", "-e", "cpu", "-c", os.path.join(work, "genai-cache")], check=True,
                       stdout=subprocess.DEVNULL)
    return path


def windows_file(directory: str, split: str, count: int, seq_len: int, path: str) -> np.ndarray:
    """`count` windows of `seq_len` tokens of `split` as the file's inputs: the ids per window,
    the mask and the (empty) caches given once."""
    from rankfold.frontends.hf import text_windows

    ids = text_windows(directory, sentences(split), seq_len, count).numpy().astype(np.int64)
    arrays = {"input_ids": ids, "attention_mask": np.ones((1, seq_len), np.int64)}
    for layer in range(LAYERS):
        for part in ("key", "value"):
            arrays[f"past_key_values.{layer}.{part}"] = np.zeros((1, KV_HEADS, 0, HEAD_SIZE), np.float32)
    np.savez(path, **arrays)
    return ids


def perplexity(path: str, held: str) -> float:
    """Next-token perplexity of the file on the held-back windows, one window a run."""
    import onnxruntime as ort

    arrays = np.load(held)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    nll, count = 0.0, 0
    for row in arrays["input_ids"]:
        feeds = {name: (row[None] if name == "input_ids" else arrays[name]) for name in names}
        logits = session.run(["logits"], feeds)[0][0, :-1].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= float(log_p[np.arange(len(row) - 1), row[1:]].sum())
        count += len(row) - 1
    return float(np.exp(nll / count))


GENERATED = 32


def generation(original_dir: str, path: str, held: str, prompts: int) -> dict:
    """Greedy generation in onnxruntime-genai with the file at `path` in place of the original's
    model.onnx (its config and tokenizer beside it), against the original's: the share of prompts
    whose first generated token is the original's, the mean common prefix of the GENERATED
    tokens, and the median tokens per second of each."""
    import onnxruntime_genai as og

    beside = path + ".genai"
    os.makedirs(beside, exist_ok=True)
    for name in os.listdir(original_dir):
        if not name.startswith("model.onnx"):
            shutil.copy(os.path.join(original_dir, name), beside)
    linked = os.path.join(beside, "model.onnx")
    if not os.path.lexists(linked):
        os.symlink(os.path.abspath(path), linked)
    starts = np.load(held)["input_ids"][:prompts, :32]

    def generate(directory: str) -> tuple[list[list[int]], float]:
        model = og.Model(directory)
        outputs, speeds = [], []
        for start in starts:
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(start) + GENERATED, do_sample=False)
            generator = og.Generator(model, params)
            generator.append_tokens(start.astype(np.int32))
            begin = time.perf_counter()
            while not generator.is_done():
                generator.generate_next_token()
            speeds.append(GENERATED / (time.perf_counter() - begin))
            outputs.append(list(generator.get_sequence(0))[len(start):])
        return outputs, float(np.median(speeds))

    theirs, their_speed = generate(original_dir)
    ours, our_speed = generate(beside)

    def common(a: list[int], b: list[int]) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    return {"first_token_same": float(np.mean([a[0] == b[0] for a, b in zip(ours, theirs)])),
            "common_prefix": float(np.mean([common(a, b) for a, b in zip(ours, theirs)])),
            "tokens_per_s": round(our_speed, 1), "original_tokens_per_s": round(their_speed, 1)}


def _fractions(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def _file_bytes(path: str) -> int:
    """The file's bytes with its external data (the builder's model.onnx.data)."""
    return sum(os.path.getsize(p) for p in (path, path + ".data") if os.path.exists(p))


def file_params(path: str) -> int:
    import onnx

    model = onnx.load(path)
    return sum(int(np.prod(init.dims)) for init in model.graph.initializer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuts", default="0.1,0.2", help="fractions of the block Linear parameters removed")
    parser.add_argument("--bytes", default="0.25", help="weight-byte budgets, as fractions of the file's")
    parser.add_argument("--prompts", type=int, default=8, help="held-back prompts generated from (0: none)")
    parser.add_argument("--calib", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--held", type=int, default=64)
    parser.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "rankfold-field"))
    parser.add_argument("--work", default=os.path.join("bench", "results", "genai-work"))
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    directory = float_directory(args.cache)
    original = built_file(directory, args.work)
    calib, held = (os.path.join(args.work, f"{split}.npz") for split in ("calib", "held"))
    windows_file(directory, "calib", args.calib, args.seq_len, calib)
    windows_file(directory, "held", args.held, args.seq_len, held)
    total = file_params(original)
    base = perplexity(original, held)
    print(f"original: {total:,} parameters, perplexity {base:.3f} on {args.held} windows of {args.seq_len}",
          flush=True)
    rows = [{"run": "original", "params": total, "perplexity": base, "file_bytes": _file_bytes(original)}]
    runs = [(f"cut-{cut:g}", f"{cut:.0%} of block params removed",
             ["--max-params", str(total - int(cut * BLOCK_LINEAR_PARAMS))]) for cut in _fractions(args.cuts)]
    runs += [(f"bytes-{share:g}", f"{share:.0%} of the weight bytes", ["--max-weight-bytes", f"{share:.0%}"])
             for share in _fractions(args.bytes)]
    for stem, label, budget in runs:
        out = os.path.join(args.work, f"{stem}.onnx")
        for stale in (out, out + ".data"):
            if os.path.exists(stale):
                os.remove(stale)
        start = time.time()
        run = subprocess.run([sys.executable, "-m", "rankfold.cli", "compress", original, "--calib", calib,
                              *budget, "-o", out], capture_output=True, text=True)
        seconds = time.time() - start
        said = [line for line in (run.stdout + run.stderr).splitlines() if "self-check" in line or "error" in line]
        row = {"run": label, "budget": budget[1], "seconds": round(seconds, 1), "check": said[-1] if said else "",
               "written": run.returncode == 0,
               "into_the_graph": run.returncode == 0 and "written into the original graph:" in run.stdout + run.stderr}
        if run.returncode == 0:
            row.update(params=file_params(out), file_bytes=_file_bytes(out), perplexity=perplexity(out, held))
            row["ratio"] = row["perplexity"] / base
            if args.prompts:
                row["generation"] = generation(os.path.dirname(original), out, held, args.prompts)
        print(json.dumps(row), flush=True)
        rows.append(row)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    with open(args.out, "w") as handle:
        json.dump({"file": "onnxruntime-genai 0.18.0 builder, fp32, cpu", "calib_windows": args.calib,
                   "held_windows": args.held, "seq_len": args.seq_len, "peak_rss_gib_children": round(peak, 2),
                   "rows": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
