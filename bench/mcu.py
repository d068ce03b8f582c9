"""Microcontroller kernels measured under qemu: instructions per multiply-accumulate, flash, RAM.

    python -m bench.mcu                         # the five reference layers (A-E) on Cortex-M7
    python -m bench.mcu --board mps2-an386      # the same on Cortex-M4
    python -m bench.mcu --networks              # also the bench networks (ResNet-18 3 %, ...)

Each layer is a one-layer model quantized to int8 (QDQ, as rankfold writes it), exported with
`export_c`, built with arm-none-eabi-gcc -O2 and run under qemu with `-icount shift=0`: the count is
instructions, not cycles, the measure of issue 18's CMSIS-NN reference figures (quoted beside
ours; CMSIS-NN cannot be downloaded here). Every run is checked against the golden model (0
mismatches, or the bench fails). Writes bench/results/mcu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(BENCH_DIR, "results", "mcu.json")

# Issue 18: CMSIS-NN (arm-none-eabi-gcc 12.2 -O2, qemu mps2-an500, -icount shift=0), per MAC.
CMSIS_NN_REFERENCE = {"A": 1.76, "B": 1.76, "C": 7.93, "D": 2.02, "E": 8.77}
GOALS = {"A": 2.2, "B": 2.2, "C": 9.9, "D": 2.5, "E": 11.0}


@dataclass(frozen=True)
class Layer:
    key: str
    title: str
    in_shape: tuple[int, ...]
    kind: str  # conv | linear
    out_c: int
    kernel: int = 1
    padding: int = 0
    groups: int = 1
    activation: str = ""  # "", relu, relu6


LAYERS = (
    Layer("A", "Conv 3x3, 64->64, 16x16, pad 1, ReLU", (64, 16, 16), "conv", 64, 3, 1, 1, "relu"),
    Layer("B", "Conv 1x1, 128->32, 8x8", (128, 8, 8), "conv", 32, 1, 0, 1, ""),
    Layer("C", "Depthwise 3x3, 96 ch, 16x16, pad 1, ReLU6", (96, 16, 16), "conv", 96, 3, 1, 96, "relu6"),
    Layer("D", "Fully connected 512->10", (512,), "linear", 10),
    Layer("E", "Conv 3x3, 1->32, 32x32, pad 1 (stem)", (1, 32, 32), "conv", 32, 3, 1, 1, ""),
)


def layer_module(layer: Layer):
    import torch
    from torch import nn

    torch.manual_seed(0)
    if layer.kind == "linear":
        core = nn.Linear(layer.in_shape[0], layer.out_c)
    else:
        core = nn.Conv2d(layer.in_shape[0], layer.out_c, layer.kernel, padding=layer.padding, groups=layer.groups)
    parts = [core] + {"relu": [nn.ReLU()], "relu6": [nn.ReLU6()], "": []}[layer.activation]
    return nn.Sequential(*parts).eval()


def quantized_file(module, in_shape: tuple[int, ...], path: str, samples: int = 32) -> np.ndarray:
    """Write `module` as an int8 QDQ file (every layer int8); returns its calibration inputs."""
    import torch

    from rankfold.analyze import COMPRESSIBLE
    from rankfold.quantize.export import export_quantized

    torch.manual_seed(1)
    calib = torch.randn(samples, *in_shape)
    bits = {n: 8 for n, m in module.named_modules() if isinstance(m, COMPRESSIBLE)}
    export_quantized(module, bits, path, calib=calib, example_input=calib[:2], reduce_range=False)
    return calib.numpy()


def measure(path: str, x: np.ndarray, board: str, work: str, samples: int = 2) -> dict:
    """Export, run on the host and under qemu; instructions per MAC, flash, RAM, golden check."""
    info, result = exported_and_checked(path, x, board, os.path.join(work, "c"), samples)
    return {"macs": info["macs"], "arena_bytes": info["arena_bytes"],
            "instructions": result["instructions"], "instructions_per_mac": result["instructions_per_mac"],
            "flash_bytes": result["flash_bytes"], "ram_bytes": result["ram_bytes"],
            "stack_bytes": result["stack_bytes"], "golden_mismatches": result["golden_mismatches"],
            "samples": int(len(x))}


def exported_and_checked(path: str, x: np.ndarray, board: str, directory: str, samples: int) -> tuple[dict, dict]:
    """export_c, then run_c on the host and under qemu; the bench stops unless the C matches the
    golden model everywhere and qemu matches the host."""
    import onnx

    from rankfold.cexport.run import export_c, run_c

    info = export_c(onnx.load(path), directory)
    result = run_c(directory, x, None, qemu=board, qemu_samples=samples)
    if result["golden_mismatches"] or not result["qemu_matches_host"]:
        raise SystemExit(f"{path}: {result['golden_mismatches']} golden mismatches, qemu matches host: "
                         f"{result['qemu_matches_host']}")
    return info, result


def profile_model(path: str, x: np.ndarray, board: str, samples: int = 1) -> dict:
    """A whole QDQ model: export, host run against the golden model, then each op's instructions
    under qemu (RF_PROFILE), with its MACs, kernel and the scratch it needs."""
    import onnx

    from rankfold.cexport.codegen import kernel_of, scratch_bytes
    from rankfold.cexport.ir import Conv, read_program
    from rankfold.cexport.run import quantize_input, run_qemu

    with tempfile.TemporaryDirectory() as work:
        directory = os.path.join(work, "c")
        info, checked = exported_and_checked(path, x, board, directory, samples)
        program = read_program(onnx.load(os.path.join(directory, "model.onnx")))
        profiled = run_qemu(directory, board, quantize_input(program, x[:samples]), profile=True)
    ops = []
    for op, instructions in zip(program.ops, profiled["instructions_per_op"] or []):
        macs = program.tensors[op.out].size * op.macs_per_output if isinstance(op, Conv) else 0
        ops.append({"name": op.name, "op": type(op).__name__, "kernel": kernel_of(program, op),
                    "kind": latency_kind(program, op) if isinstance(op, Conv) else None,
                    "outputs": program.tensors[op.out].size,
                    "bits": getattr(op, "bits", None), "macs": macs, "instructions": instructions,
                    "instructions_per_mac": instructions / macs if macs else None,
                    "scratch_bytes": scratch_bytes(program, op),
                    "output_shape": list(program.tensors[op.out].shape)})
    return {"model": os.path.basename(path), "board": board, "macs": info["macs"],
            "arena_bytes": info["arena_bytes"], "instructions": checked["instructions"],
            "instructions_per_mac": checked["instructions_per_mac"], "flash_bytes": checked["flash_bytes"],
            "ram_bytes": checked["ram_bytes"], "stack_bytes": checked["stack_bytes"],
            "golden_mismatches": checked["golden_mismatches"], "samples": checked["samples"], "ops": ops}


def latency_kind(program, op) -> str:
    """The planner's kind of a convolution (planner/costs.py): linear, pointwise, depthwise, conv."""
    _o, _i, k_h, k_w = op.weight.shape
    if op.groups > 1:
        return "depthwise"
    if k_h * k_w == 1:
        return "linear" if int(np.prod(program.tensors[op.inp].shape[1:])) == 1 else "pointwise"
    return "conv"


KINDS = ("conv", "pointwise", "depthwise", "linear")


def fit_latency_model(rows: list[dict]) -> dict:
    """Least squares over every convolution of the profiled networks: instructions = MACs *
    cycles_per_mac[kind] + outputs * cycles_per_output + layer_overhead_cycles (qemu counts
    instructions: cycles at one instruction per cycle). The error of the fit per layer and per whole
    network (the convolutions' sum)."""
    layers = [(row["network"], op) for row in rows for op in row["ops"] if op.get("kind")]
    design = np.array([[op["macs"] * (op["kind"] == kind) for kind in KINDS] + [op["outputs"], 1.0]
                       for _n, op in layers], np.float64)
    measured = np.array([op["instructions"] for _n, op in layers], np.float64)
    weights = 1.0 / np.maximum(measured, 1.0)  # relative error: small layers count as much as big ones
    solution, *_ = np.linalg.lstsq(design * weights[:, None], measured * weights, rcond=None)
    solution = np.maximum(solution, 0.0)
    predicted = design @ solution
    per_layer = np.abs(predicted - measured) / measured
    per_network = {}
    for name in dict.fromkeys(n for n, _op in layers):
        picked = np.array([n == name for n, _op in layers])
        per_network[name] = float(abs(predicted[picked].sum() - measured[picked].sum()) / measured[picked].sum())
    return {"cycles_per_mac": {k: round(float(v), 3) for k, v in zip(KINDS, solution[:4])},
            "cycles_per_output": round(float(solution[4]), 2), "layer_overhead_cycles": round(float(solution[5])),
            "layers": len(layers), "median_layer_error": float(np.median(per_layer)),
            "p90_layer_error": float(np.quantile(per_layer, 0.9)), "network_error": per_network}


def print_profile(row: dict) -> None:
    print(f"{row['model']} on {row['board']}: {row['instructions_per_mac']:.2f} instructions per MAC "
          f"({row['instructions']:,} for {row['macs']:,} MACs), flash {row['flash_bytes']:,} B, RAM "
          f"{row['ram_bytes']:,} B (arena {row['arena_bytes']:,}, stack {row['stack_bytes']:,})")
    for op in row["ops"]:
        ipm = f"{op['instructions_per_mac']:6.2f}" if op["instructions_per_mac"] else "     -"
        print(f"  {op['op']:9s} {op['kernel']:15s} {str(op['bits'] or ''):2s} {op['macs']:>11,} MACs "
              f"{op['instructions']:>12,} instr {ipm}/MAC  {str(op['output_shape']):16s} {op['name']}")


def vgg16_bn_style(classes: int = 10):
    """VGG-16 with batch normalization (13 convolutions, 5 max-pools, two-layer classifier), widths
    quartered so that its int8 weights fit a Cortex-M7's 2 MB of flash with 32 x 32 inputs."""
    from torch import nn

    layers, cin = [], 1
    for item in (16, 16, "M", 32, 32, "M", 64, 64, 64, "M", 128, 128, 128, "M", 128, 128, 128, "M"):
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU()]
            cin = item
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, classes))


def mobilenetv3_small_style(classes: int = 10):
    """MobileNetV3-Small's bottlenecks (hard-swish, squeeze-and-excitation with a hard-sigmoid gate,
    3x3 and 5x5 depthwise), scaled for 32 x 32 inputs."""
    import torch
    from torch import nn

    class SqueezeExcite(nn.Module):
        def __init__(self, channels: int):
            super().__init__()
            self.reduce, self.expand = nn.Conv2d(channels, channels // 4, 1), nn.Conv2d(channels // 4, channels, 1)

        def forward(self, x):
            gate = nn.functional.adaptive_avg_pool2d(x, 1)
            return x * nn.functional.hardsigmoid(self.expand(torch.relu(self.reduce(gate))))

    class Bottleneck(nn.Module):
        def __init__(self, cin, kernel, hidden, cout, se, act, stride):
            super().__init__()
            parts = [] if hidden == cin else [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), act()]
            parts += [nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False),
                      nn.BatchNorm2d(hidden), act()]
            parts += [SqueezeExcite(hidden)] if se else []
            parts += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.body, self.skip = nn.Sequential(*parts), stride == 1 and cin == cout

        def forward(self, x):
            return x + self.body(x) if self.skip else self.body(x)

    hs, re = nn.Hardswish, nn.ReLU
    config = ((3, 16, 16, True, re, 1), (3, 72, 24, False, re, 2), (3, 88, 24, False, re, 1),
              (5, 96, 40, True, hs, 2), (5, 240, 40, True, hs, 1), (5, 120, 48, True, hs, 1),
              (5, 144, 48, True, hs, 1), (5, 288, 96, True, hs, 2), (5, 576, 96, True, hs, 1))
    layers, cin = [nn.Conv2d(1, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), hs()], 16
    for kernel, hidden, cout, se, act, stride in config:
        layers.append(Bottleneck(cin, kernel, hidden, cout, se, act, stride))
        cin = cout
    layers += [nn.Conv2d(cin, 288, 1, bias=False), nn.BatchNorm2d(288), hs(), nn.AdaptiveAvgPool2d(1),
               nn.Flatten(), nn.Linear(288, 256), hs(), nn.Linear(256, classes)]
    return nn.Sequential(*layers)


def network_files(work: str, calib: np.ndarray) -> dict[str, str]:
    """int8 QDQ files of the bench's trained networks (bench/models, `python -m bench.train`) and
    of the VGG-16-BN and MobileNetV3 shapes above (random weights, batch-norm statistics from the
    calibration images: instruction counts and bit-exactness do not depend on training)."""
    import torch

    from bench.train import model_path
    from rankfold.analyze import COMPRESSIBLE
    from rankfold.export.onnx import export_onnx
    from rankfold.frontends.onnx import load_onnx
    from rankfold.quantize.export import export_quantized

    modules = {}
    for name in ("vgg", "mobilenetv2"):
        if os.path.isfile(model_path(name)):
            modules[f"{name} (bench, trained)"] = load_onnx(model_path(name))
        else:
            print(f"{model_path(name)} missing: python -m bench.train --only {name}", flush=True)
    torch.manual_seed(0)
    for name, build in (("vgg16-bn-style", vgg16_bn_style), ("mobilenetv3-small-style", mobilenetv3_small_style)):
        module = build()
        module.train()
        with torch.no_grad():  # batch-norm statistics from real images, as a trained network has
            for start in range(0, len(calib), 64):
                module(torch.from_numpy(calib[start : start + 64]))
        folded = os.path.join(work, f"{name}-float.onnx")  # the exporter folds batch-norm into the convolutions
        export_onnx(module.eval(), folded, example_input=torch.from_numpy(calib[:2]))
        modules[f"{name} (random weights)"] = load_onnx(folded)
    files = {}
    x = torch.from_numpy(calib)
    for label, module in modules.items():
        path = os.path.join(work, label.split()[0] + ".onnx")
        bits = {n: 8 for n, m in module.named_modules() if isinstance(m, COMPRESSIBLE)}
        export_quantized(module, bits, path, calib=x, example_input=x[:2], reduce_range=False)
        files[label] = path
    return files


def run_layers(board: str, keys: str) -> list[dict]:
    rows = []
    for layer in LAYERS:
        if layer.key not in keys:
            continue
        with tempfile.TemporaryDirectory() as work:
            path = os.path.join(work, "layer.onnx")
            x = quantized_file(layer_module(layer), layer.in_shape, path)
            row = {"layer": layer.key, "title": layer.title, "board": board, **measure(path, x[:8], board, work)}
        row["cmsis_nn_reference"] = CMSIS_NN_REFERENCE[layer.key]
        row["ratio_to_cmsis_nn"] = row["instructions_per_mac"] / CMSIS_NN_REFERENCE[layer.key]
        row["goal"] = GOALS[layer.key]
        rows.append(row)
        print(f"{layer.key} {layer.title:45s} {row['instructions_per_mac']:6.2f} instr/MAC "
              f"(CMSIS-NN {CMSIS_NN_REFERENCE[layer.key]:.2f}, x{row['ratio_to_cmsis_nn']:.2f}; goal "
              f"{GOALS[layer.key]}), arena {row['arena_bytes']:,} B", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--board", default="mps2-an500", help="qemu board (mps2-an385 M3, -an386 M4, -an500 M7)")
    ap.add_argument("--layers", default="ABCDE", help="which of the layers A-E to run")
    ap.add_argument("--no-save", action="store_true", help="print only; leave bench/results/mcu.json")
    ap.add_argument("--model", action="append", default=[],
                    help="a QDQ model to profile op by op (repeatable); its inputs from --data")
    ap.add_argument("--data", help=".npz whose x feeds --model (the first 8 samples)")
    ap.add_argument("--networks", action="store_true",
                    help="the bench networks and the VGG-16-BN / MobileNetV3 shapes, int8, with --calib")
    ap.add_argument("--calib", default="/tmp/rankfold-fmnist/fmnist-calib.npz",
                    help="calibration images for --networks (../shared/data/fmnist_npz.py)")
    args = ap.parse_args(argv)
    from rankfold.cexport.run import qemu_tools_missing

    missing = qemu_tools_missing()
    if missing:
        raise SystemExit(missing)
    if args.model or args.networks:
        rows = []
        with tempfile.TemporaryDirectory() as work:
            models = {os.path.basename(p): p for p in args.model}
            if args.networks:
                calib = np.load(args.calib)["x"][:256]
                models.update(network_files(work, calib))
            x = np.load(args.data or args.calib)["x"][:8]
            for label, path in models.items():
                row = {"network": label, **profile_model(path, x, args.board)}
                print_profile(row)
                rows.append(row)
        fit = fit_latency_model(rows)
        print("latency model fitted to these layers:", json.dumps(fit))
        rows.append({"network": "latency model fit", "board": args.board, "fitted_to": list(models), **fit})
        if not args.no_save:
            save(rows, lambda r: r.get("network") is not None and r.get("board") == args.board
                 and (r["network"] in models or r["network"] == "latency model fit"))
        return
    rows = run_layers(args.board, args.layers)
    if not args.no_save:
        save(rows, lambda r: r.get("board") == args.board and r.get("layer", "-") in args.layers)
    sys.stdout.flush()


def save(rows: list[dict], replaces) -> None:
    """Add `rows` to bench/results/mcu.json, dropping the earlier rows `replaces` picks."""
    existing = []
    if os.path.exists(RESULTS):
        with open(RESULTS) as handle:
            existing = json.load(handle)
    stamp = {"date": time.strftime("%Y-%m-%d"), "host_cpu": platform.processor() or platform.machine()}
    with open(RESULTS, "w") as handle:
        json.dump([r for r in existing if not replaces(r)] + [{**r, **stamp} for r in rows], handle, indent=1)
        handle.write("\n")


if __name__ == "__main__":
    main()
