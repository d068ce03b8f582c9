"""Train the benchmark's own networks on Fashion-MNIST and write them as ONNX (BatchNorm folded).

    python -m bench.train [--epochs 3] [--out bench/models] [--only vgg]

Deterministic for a given seed on CPU; a network whose ONNX file exists is not retrained.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

from bench.nets import NETWORKS
from rankfold.demo import train
from rankfold.demo_data import fashion_mnist
from rankfold.export.onnx import export_onnx

MODELS_DIR = os.path.join(os.path.dirname(__file__), "models")


def model_path(name: str, out: str = MODELS_DIR) -> str:
    return os.path.join(out, f"{name}-fmnist.onnx")


def train_network(name: str, *, epochs: int = 3, out: str = MODELS_DIR, seed: int = 0, log=print) -> str:
    """Train `name` from NETWORKS unless its ONNX file exists; returns the path."""
    path = model_path(name, out)
    if os.path.isfile(path):
        return path
    torch.manual_seed(seed)
    data = fashion_mnist()
    model = NETWORKS[name]()
    t0 = time.time()
    log(f"training {name} ({sum(p.numel() for p in model.parameters()):,} parameters), {epochs} epochs "
        f"on {len(data.x_train):,} images")
    train(model, data.x_train, data.y_train, epochs=epochs, log=log)
    with torch.no_grad():
        logits = torch.cat([model(torch.from_numpy(data.x_test[i : i + 500])) for i in range(0, len(data.x_test), 500)])
    acc = float((logits.argmax(1).numpy() == data.y_test).mean())
    log(f"{name}: test top-1 {acc:.4f} after {time.time() - t0:.0f} s")
    os.makedirs(out, exist_ok=True)
    export_onnx(model, path, example_input=torch.from_numpy(np.ascontiguousarray(data.x_test[:2])))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default=MODELS_DIR)
    parser.add_argument("--only", choices=sorted(NETWORKS))
    args = parser.parse_args(argv)
    for name in [args.only] if args.only else NETWORKS:
        print(train_network(name, epochs=args.epochs, out=args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
