"""YOLOv8n on scenes it fires on. The synthetic scenes of bench/field_inputs.py put fewer than one
score cell in 40,000 above 0.25 (none above 0.5): their thresholded-map IoU compares maps of noise
near the threshold. Here each synthetic scene is pushed by a few steps of gradient ascent on its
pixels (Adam on the input, the 40 best cells' score logits) until the detector scores some cells
above 0.9, and the compressed file is compared with the original on such scenes and on the plain
ones, both in onnxruntime, at IoU thresholds 0.25 and 0.5.

    PYTHONPATH=. python -m bench.fired_scenes --work /tmp/fired            # inputs, then a 50 % plan
    PYTHONPATH=. python -m bench.fired_scenes --work /tmp/fired --distill 6144,3000  # then distilled (~1 h)
    PYTHONPATH=. python -m bench.fired_scenes --work /tmp/fired --measure OTHER.onnx

--distill COUNT,STEPS also distils the plan (`rankfold finetune --plan`, steps of 16 at lr 3e-5,
the rate YOLOv8n stands) on COUNT fired scenes made from seeds 3, 4, ... (512 a seed), and
measures both files. 6,144 scenes hold 7.5 GB (about twice that while they are joined); the
training then fits its micro-batches into the memory left.

The scenes are made by the model itself: a measure of what compression keeps where the detector
is sure, not a stand-in for photographs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np
import torch

from bench import field_inputs
from bench.realworld import MODELS, fetch, map_iou, ort_outputs

YOLO = next(m for m in MODELS if m.name == "yolov8n")


def fired_scenes(model: torch.nn.Module, rng: np.random.Generator, n: int, *, steps: int = 12,
                 batch: int = 16) -> np.ndarray:
    """`n` synthetic scenes, each moved by `steps` Adam steps (lr 0.01, pixels kept in [0, 1]) toward
    higher scores at its 40 best cells (best class per cell, as logits)."""
    out = []
    for start in range(0, n, batch):
        x = torch.from_numpy(field_inputs.scenes(rng, min(batch, n - start))).requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=0.01)
        for _ in range(steps):
            scores = model(x)[:, 4:].clamp(1e-4, 1 - 1e-4)
            best = torch.log(scores / (1 - scores)).amax(1)
            loss = -best.topk(40, dim=1).values.mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                x.clamp_(0, 1)
        out.append(x.detach().numpy())
    return np.concatenate(out)


def measure(original: str, compressed: str, inputs: dict[str, np.ndarray]) -> dict:
    rows = {}
    for name, x in inputs.items():
        ref, got = ort_outputs(original, x), ort_outputs(compressed, x)
        rows[name] = {f"iou@{t}": map_iou(t, lambda y: y[:, 4:])(ref, got) for t in (0.25, 0.5)}
        rows[name]["cells_above_0.5"] = int((ref[0][:, 4:] > 0.5).sum())
        print(f"{name:10} " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in rows[name].items()), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.fired_scenes", description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="a directory for the inputs and the compressed file")
    parser.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "rankfold-field"))
    parser.add_argument("--fresh", type=int, default=128, help="fresh scenes to measure on (default 128)")
    parser.add_argument("--measure", help="measure this compressed file instead of making one")
    parser.add_argument("--distill", type=_count_and_steps, metavar="COUNT,STEPS",
                        help="also distil the plan on COUNT fired scenes for STEPS steps of 16")
    args = parser.parse_args(argv)
    from rankfold.frontends.onnx import load_onnx

    path = fetch(YOLO, args.cache)
    os.makedirs(args.work, exist_ok=True)
    model = load_onnx(path).eval().requires_grad_(False)
    calib, fresh = (os.path.join(args.work, f"{n}.npz") for n in ("calib", "fresh"))
    for file, seed, n in ((calib, 1, 256), (fresh, 2, args.fresh)):
        if not os.path.exists(file):
            np.savez(file, x=fired_scenes(model, np.random.default_rng(seed), n))
            print(f"wrote {file}", flush=True)
    files = [args.measure] if args.measure else []
    if not files:
        files.append(os.path.join(args.work, "half.onnx"))
        plan = os.path.join(args.work, "half-plan.json")
        subprocess.run([sys.executable, "-m", "rankfold.cli", "compress", path, "--calib", calib, "--max-params",
                        "50%", "--no-check", "--force", "-o", files[0], "--plan-out", plan], check=True)
        if args.distill:
            files.append(_distilled(model, path, plan, calib, args.work, *args.distill))
    inputs = {"fired": np.load(fresh)["x"], "synthetic": field_inputs.scenes(np.random.default_rng(2), args.fresh)}
    for file in files:
        print(file)
        measure(path, file, inputs)
    return 0


def _distilled(model: torch.nn.Module, path: str, plan: str, calib: str, work: str, count: int, steps: int) -> str:
    train = os.path.join(work, f"train-{count}.npz")
    if not os.path.exists(train):
        parts = [fired_scenes(model, np.random.default_rng(3 + i), min(512, count - 512 * i))
                 for i in range((count + 511) // 512)]
        np.savez(train, x=np.concatenate(parts))
        print(f"wrote {train}", flush=True)
    out = os.path.join(work, "half-distilled.onnx")
    subprocess.run([sys.executable, "-m", "rankfold.cli", "finetune", path, "--plan", plan, "--calib", calib,
                    "--train", train, "--steps", str(steps), "--batch-size", "16", "--lr", "3e-5",
                    "--min-agreement", "0", "--max-output-error", "100", "--force", "-o", out], check=True)
    return out


def _count_and_steps(text: str) -> tuple[int, int]:
    count, steps = (int(v) for v in text.split(","))
    if count < 16 or steps < 1:
        raise argparse.ArgumentTypeError(f"expected COUNT,STEPS with COUNT >= 16 and STEPS >= 1, got {text!r}")
    return count, steps


if __name__ == "__main__":
    raise SystemExit(main())
