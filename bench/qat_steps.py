"""Quantization-aware training with the exporter's max-abs weight steps against learned weight
steps (finetune --qat-steps lsq) and learned activation steps (--qat-activations lsq), side by
side on one network and plan.

    python -m bench.qat_steps [--budgets 6%,3%] [--steps 300]

The network is a small CNN (three 3x3 convolutions, two Linear layers) trained here for 2 epochs
on the first 30,000 Fashion-MNIST training images (fmnist_npz.py's .npz); each budget is a plan
of int4 weights (bits=4) under that share of the float weight bytes, applied post-training, then
fine-tuned for --steps on the first 20,000 training images by distillation, once per variant
(VARIANTS: weight steps, activation steps).
Accuracy: the written QDQ files in onnxruntime on the 10,000 test images. Writes
bench/results/qat-steps.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.finetune import cpu_name

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "qat-steps.json")
VARIANTS = {"max-abs": ("max-abs", "calibrated"), "lsq": ("lsq", "calibrated"),
            "lsq-activations": ("max-abs", "lsq")}


def small_cnn(x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    side = x.shape[-1] // 4
    model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(64 * side * side, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for epoch in range(2):
        for i in torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch)).split(128):
            optimizer.zero_grad()
            F.cross_entropy(model(x[i]), y[i]).backward()
            optimizer.step()
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    import rankfold
    from rankfold.evaluate import accuracy
    from rankfold.training import FinetuneConfig, finetune_result

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="6%,3%", help="weight-byte budgets (int4 plans)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--data", default="/tmp/rankfold-fmnist", help="directory of fmnist-{train,test}.npz")
    args = ap.parse_args(argv)
    train, test = (np.load(os.path.join(args.data, f"fmnist-{k}.npz")) for k in ("train", "test"))
    x, y = torch.from_numpy(train["x"][:30000]), torch.from_numpy(train["y"][:30000]).long()
    model = small_cnn(x, y)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        def measured(result) -> float:
            path = os.path.join(tmp, "m.onnx")
            result.save(path, force=True)
            return accuracy(path, test["x"], test["y"])

        rankfold.export_onnx(model, os.path.join(tmp, "float.onnx"), example_input=x[:1])
        original = accuracy(os.path.join(tmp, "float.onnx"), test["x"], test["y"])
        for budget in args.budgets.split(","):
            plan = rankfold.make_plan(model, calib=x[:448], budgets={"weight_bytes": budget}, bits=4, min_rank=2)
            result = rankfold.apply_and_check(model, plan, calib=x[:512], min_agreement=0.0, check=False)
            row = {"budget": budget, "weight_bytes": plan.after.get("weight_bytes"), "original": original,
                   "post_training": measured(result)}
            for label, (weight_steps, activation_steps) in VARIANTS.items():
                t0 = time.time()
                config = FinetuneConfig(steps=args.steps, batch_size=64, lr=1e-3, weight_steps=weight_steps,
                                        activation_steps=activation_steps)
                tuned, _log = finetune_result(result, x[:20000], config=config, check=False)
                row[label] = measured(tuned)
                row[f"{label}_seconds"] = round(time.time() - t0, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"steps": args.steps, "cpu": cpu_name(), "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    with open(RESULTS + ".part", "w") as handle:
        json.dump({"meta": meta, "rows": rows}, handle, indent=1)
    os.replace(RESULTS + ".part", RESULTS)


if __name__ == "__main__":
    main()
