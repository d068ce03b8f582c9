"""`rankfold demo`: train a small CNN, compress it data-aware, and show what changed."""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from torch import nn

from rankfold.compress import compress_with_report
from rankfold.demo_data import demo_dataset
from rankfold.evaluate import evaluate
from rankfold.export.onnx import export_onnx
from rankfold.frontends.onnx import load_onnx
from rankfold.io import write_json_atomic
from rankfold.report import comparison_table, layer_table


def small_cnn(in_ch: int = 1, classes: int = 10) -> nn.Module:
    """A VGG-style CNN small enough to train on two CPU cores in a couple of minutes."""

    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(in_ch, 32, 1), *block(32, 64, 2), *block(64, 64, 1), *block(64, 128, 2), *block(128, 128, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, classes),
    )


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, log, batch_size: int = 128) -> None:
    gen = torch.Generator().manual_seed(0)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    steps = epochs * int(np.ceil(len(x) / batch_size))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        t0, total = time.time(), 0.0
        for i, start in enumerate(range(0, len(x), batch_size)):
            idx = order[start : start + batch_size]
            loss = loss_fn(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
            if i % 100 == 0:
                log(f"  epoch {epoch + 1}/{epochs}  step {i}  loss {total / (i + 1):.3f}")
        log(f"  epoch {epoch + 1}/{epochs} done in {time.time() - t0:.0f}s, loss {total / (i + 1):.3f}")
    model.eval()


def run_demo(out_dir: str, *, epochs: int = 3, train_limit: int = 30000, keep: float = 0.3,
             method: str = "tucker2", log=print) -> dict:
    """Train, compress and measure; returns the before/after results (also written to DIR)."""
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    os.makedirs(out_dir, exist_ok=True)
    data = demo_dataset()
    x_train, y_train = data.x_train[:train_limit], data.y_train[:train_limit]
    log(f"[1/4] training a small CNN on {data.name} ({len(x_train)} images, {epochs} epochs)")
    model = small_cnn(classes=int(data.y_train.max()) + 1)
    train(model, x_train, y_train, epochs=epochs, log=log)

    calib = torch.from_numpy(data.x_train[np.random.default_rng(0).choice(len(data.x_train), 512, replace=False)])
    original_path = os.path.join(out_dir, "original.onnx")
    export_onnx(model, original_path, example_input=calib[:2])
    # Compress what the ONNX front-end reads back: the exporter has folded BatchNorm into the
    # convolutions, so the data-aware criterion sees each layer's real output scale.
    deployed = load_onnx(original_path)
    log(f"[2/4] compressing: method={method}, keep={keep}, data-aware on {len(calib)} calibration images")
    t0 = time.time()
    compressed, report = compress_with_report(deployed, method=method, keep=keep, calib=calib,
                                              progress=lambda m: log("  " + m))
    seconds = time.time() - t0
    compressed_path = os.path.join(out_dir, "compressed.onnx")
    export_onnx(compressed, compressed_path, example_input=calib[:2])
    log(layer_table(report))
    log(f"  compression took {seconds:.1f}s")
    log(f"[3/4] measuring both ONNX files in onnxruntime on {len(data.x_test)} test images")
    before = evaluate(original_path, data.x_test, data.y_test).to_dict()
    after = evaluate(compressed_path, data.x_test, data.y_test).to_dict()
    log(comparison_table(before, after))
    result = {"dataset": data.name, "method": method, "keep": keep, "compress_seconds": seconds,
              "original": before, "compressed": after, "layers": report.to_dict()["layers"]}
    write_json_atomic(os.path.join(out_dir, "demo.json"), result)
    log(f"[4/4] wrote {original_path}, {compressed_path} and {os.path.join(out_dir, 'demo.json')}")
    return result
