"""How steady a text recogniser's own reading is: the original file against itself on the bench's
fresh lines (bench/realworld.py's maker and seed), when the lines change in ways no reader sees:
Gaussian noise of a fraction of a grey level on the line's pixels (not on the padding), and the
rendered line scaled to the input's height with another filter (bicubic or Lanczos: other OCR
front-ends scale with other filters than PIL's bilinear). A compressed file is held to read lines
exactly as the original does; this puts that goal in scale. Optionally, compressed files of the
same network are measured on the same lines beside it.

    PYTHONPATH=. python -m bench.reading_floor                       # ppocr-rec, 512 fresh lines
    PYTHONPATH=. python -m bench.reading_floor --models ppocr-rec,ppocrv6-tiny-rec --compressed A.onnx

Everything runs in onnxruntime, the originals as their packages ship them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from PIL import Image

from bench import field_inputs
from bench.realworld import MODELS, fetch, lines_read_alike, ort_outputs
from rankfold.runtime import cpu_summary

NOISE_GREY_LEVELS = (0.25, 0.5, 1.0)
FILTERS = {"bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}
FRESH_SEED, NOISE_SEED = 2, 0


def on_line_noise(x: np.ndarray, grey_levels: float, rng: np.random.Generator) -> np.ndarray:
    """`x` (normalized to [-1, 1], padded with zeros) with Gaussian noise of `grey_levels` RMS (of
    255) on the line's pixels only: the padding stays exactly zero, as the package pads."""
    line = (x != 0).any(1, keepdims=True)
    return (x + line * rng.standard_normal(x.shape).astype(np.float32) * (grey_levels / 127.5)).astype(np.float32)


def measure(path: str, x: np.ndarray, reference: list[np.ndarray], *, blank: int = 0) -> dict[str, float]:
    got = ort_outputs(path, x)
    frames = float((reference[0].argmax(-1) == got[0].argmax(-1)).mean())
    return {"lines_alike": lines_read_alike(reference, got, blank), "frames_alike": frames}


def floor(model_name: str, fresh: int, compressed: list[str], cache: str) -> dict:
    model = next(m for m in MODELS if m.name == model_name)
    path = fetch(model, cache)
    x = model.make_inputs(np.random.default_rng(FRESH_SEED), fresh)
    reference = ort_outputs(path, x)
    rows = {}
    noise = np.random.default_rng(NOISE_SEED)
    for level in NOISE_GREY_LEVELS:
        noisy = on_line_noise(x, level, noise)
        rows[f"original, noise {level} grey levels on the line"] = measure(path, noisy, reference)
    for name, resample in FILTERS.items():
        if model.make_inputs is not field_inputs.reading_lines:
            continue  # its lines are made otherwise (grey, another size): no filter to swap
        shifted = field_inputs.reading_lines(np.random.default_rng(FRESH_SEED), fresh, resample=resample)
        rows[f"original, lines scaled {name}"] = measure(path, shifted, reference)
    for file in compressed:
        rows[f"compressed {os.path.basename(file)}"] = measure(file, x, reference)
    return {"model": model_name, "fresh_lines": fresh, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="ppocr-rec", help="recognisers of bench/realworld.py (default ppocr-rec)")
    parser.add_argument("--fresh", type=int, default=512, help="fresh lines, seed 2 as the bench's (default 512)")
    parser.add_argument("--compressed", nargs="*", default=[], help="compressed files of the (first) model")
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/rankfold-field"))
    parser.add_argument("--out", default="bench/results/reading-floor.json")
    args = parser.parse_args(argv)
    results = []
    for i, name in enumerate(args.models.split(",")):
        result = floor(name, args.fresh, args.compressed if i == 0 else [], args.cache)
        result["cpu"] = cpu_summary()
        results.append(result)
        for row, figures in result["rows"].items():
            print(f"{name:18s} {row:48s} lines alike {figures['lines_alike']:.3f}  "
                  f"frames {figures['frames_alike']:.4f}", flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
