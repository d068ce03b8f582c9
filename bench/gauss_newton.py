"""What the Gauss-Newton output metric (rankfold/gauss_newton.py) buys: the same plans applied with
it and without it (softmax heads keep theirs either way), side by side in one run.

    PYTHONPATH=. python -m bench.gauss_newton [--budgets 3%,5%] [--minilm-cut 0.5] [--out FILE]

ResNet-18 (../shared/models/resnet18-fmnist.onnx) planned at --budgets of its parameters (float),
calibrated on 512 Fashion-MNIST training images, top-1 on the first 2,000 test images; MiniLM
(bench.llm's model and data) planned at --minilm-cut of its Linear parameters removed, embedding
cosine on the 500 held-back sentences.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import numpy as np
import torch

import rankfold
import rankfold.apply
from bench.llm import MINILM, calibration_windows
from bench.realworld import fetch
from bench.run import RESNET
from bench.text import sentences
from rankfold.check_rules import CheckRule
from rankfold.demo_data import fashion_mnist
from rankfold.frontends.hf import embedding_cosine, load_hf, tokenize
from rankfold.frontends.onnx import load_onnx
from rankfold.output_metric import softmax_head_metrics

RESULTS = os.path.join(os.path.dirname(__file__), "results", "gauss-newton.json")


def _heads_only(model, names, calib, **_kwargs):
    return softmax_head_metrics(model, names, calib)


def _never_judged(_layers: int, _macs: int) -> int:
    return 0


def side_by_side(compress: Callable[[], torch.nn.Module], measure: Callable[[torch.nn.Module], float]) -> dict:
    """measure(compress()) without the Gauss-Newton metrics, with them everywhere ("unjudged"), and
    with them where the network measures them closer (rankfold's default; seconds beside)."""
    row = {}
    with_metrics, judged = rankfold.apply.output_metrics, rankfold.apply.judge_samples
    for label, metrics, judge in (("without", _heads_only, judged), ("unjudged", with_metrics, _never_judged),
                                  ("with", with_metrics, judged)):
        rankfold.apply.output_metrics, rankfold.apply.judge_samples = metrics, judge
        try:
            t0 = time.time()
            small = compress()
            row[label], row[f"{label}_seconds"] = measure(small), time.time() - t0
        finally:
            rankfold.apply.output_metrics, rankfold.apply.judge_samples = with_metrics, judged
    return row


def resnet_rows(budgets: list[str]) -> list[dict]:
    data = fashion_mnist()
    x, y = torch.from_numpy(data.x_test[:2000]), data.y_test[:2000]
    pick = np.random.default_rng(0).choice(len(data.x_train), 512, replace=False)
    calib = torch.from_numpy(data.x_train[pick])
    model = load_onnx(RESNET)

    def top1(m: torch.nn.Module) -> float:
        with torch.no_grad():
            scores = torch.cat([m(x[i : i + 250]) for i in range(0, len(x), 250)])
        return float((scores.argmax(1).numpy() == y).mean())

    rows = []
    for budget in budgets:
        row = side_by_side(lambda b=budget: rankfold.compress_to_budget(model, calib=calib, budgets={"params": b},
                                                                         bits=32, check=False).module, top1)
        rows.append({"model": "resnet18-fmnist", "budget": f"{budget} params", "measure": "top-1 (2,000 test)",
                     "original": top1(model), **row})
        print(rows[-1], flush=True)
    return rows


def minilm_row(cut: float, cache: str) -> dict:
    directory = os.path.dirname(fetch(MINILM, cache))
    model = load_hf(directory)
    held = tokenize(directory, sentences("held")[:500], 64)
    calib = calibration_windows(directory, 512)
    total = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() + m.bias.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    budget = {"params": str(int(total - cut * linear))}
    row = side_by_side(lambda: rankfold.compress_to_budget(model, calib=calib, budgets=budget, bits=32, min_rank=4,
                                                           rules=(CheckRule("cosine", 0.0),)).module,
                       lambda small: embedding_cosine(small, model, held))
    return {"model": "all-MiniLM-L6-v2", "budget": f"{cut:.0%} of the Linear parameters removed",
            "measure": "embedding cosine (500 held-back)", **row}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.gauss_newton", description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="3%,5%", help="ResNet-18 parameter budgets ('' for none)")
    parser.add_argument("--minilm-cut", type=float, default=0.5, help="MiniLM: fraction of Linear parameters removed "
                                                                       "(0: skip)")
    parser.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "rankfold-field"))
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = resnet_rows([b for b in args.budgets.split(",") if b])
    if args.minilm_cut > 0:
        rows.append(minilm_row(args.minilm_cut, args.cache))
        print(rows[-1], flush=True)
    with open(args.out, "w") as handle:
        json.dump({"rows": rows}, handle, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
