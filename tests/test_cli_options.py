"""Every option of every command refuses a bad value with one line on stderr and exit code 2,
before any work and writing nothing (issue 15). The table below must name every option that takes
a value: a new option without a bad-value case fails test_the_table_covers_every_option."""

import argparse
import contextlib
import io
import json

import numpy as np
import pytest
import torch

import rankfold
from rankfold.cli import build_parser, main
from tests.helpers import tiny_classifier

# (command, option) -> (arguments, bad value, what the error must say). In the arguments, M is the
# model, C calibration data, P a plan, O an output path, X the bad value; lower-case names are files
# that do not exist or are broken (see the fixture).
FT = ["M", "--plan", "P", "--calib", "C", "--train", "D", "--steps", "1"]  # finetune's arguments before the case's
CASES = {
    ("eval", "model"): (["X", "--data", "D"], "@missing.onnx", "no such file"),
    ("eval", "--data"): (["M", "--data", "X"], "@bad.npz", "not a readable .npz"),
    ("eval", "--text"): (["M", "--data", "D", "--text", "X"], "@missing.txt", "--text measures a model directory"),
    ("eval", "--seq-len"): (["M", "--data", "D", "--seq-len", "X"], "0", "positive integer"),
    ("eval", "--samples"): (["M", "--data", "D", "--samples", "X"], "-3", "positive integer"),
    ("eval", "--limit"): (["M", "--data", "D", "--limit", "X"], "-1", "expected 0 (all) or a positive integer"),
    ("eval", "--runs"): (["M", "--data", "D", "--runs", "X"], "0", "expected a positive integer"),
    ("eval", "--attack"): (["M", "--data", "D", "--attack", "X"], "cw", "invalid choice"),
    ("eval", "--eps"): (["M", "--data", "D", "--attack", "pgd", "--eps", "X"], "0.1,-2", "numbers >= 0"),
    ("eval", "--steps"): (["M", "--data", "D", "--attack", "pgd", "--steps", "X"], "0", "positive integer"),
    ("eval", "--step-size"): (["M", "--data", "D", "--attack", "pgd", "--step-size", "X"], "2", "in (0, 1]"),
    ("eval", "--pixel-mean"): (["M", "--data", "D", "--attack", "pgd", "--pixel-std", "1", "--pixel-mean", "X"],
                               "half", "comma-separated numbers"),
    ("eval", "--pixel-std"): (["M", "--data", "D", "--attack", "pgd", "--pixel-mean", "0", "--pixel-std", "X"], "0",
                              "pixel_std must be > 0"),
    ("eval", "--attack-samples"): (["M", "--data", "D", "--attack", "pgd", "--attack-samples", "X"], "0",
                                   "positive integer"),
    ("eval", "--attack-seed"): (["M", "--data", "D", "--attack", "pgd", "--attack-seed", "X"], "1.5", "integer"),
    ("eval", "--original"): (["M", "--data", "D", "--attack", "transfer", "--original", "X"], "@notonnx.onnx",
                             "not an ONNX model"),
    ("compress", "model"): (["X", "-o", "O"], "@notonnx.onnx", "not an ONNX model"),
    ("compress", "--attack"): (["M", "--calib", "C", "--attack", "X", "-o", "O"], "fgm", "invalid choice"),
    ("compress", "--eps"): (["M", "--calib", "C", "--preserve-robustness", "--eps", "X", "-o", "O"], "inf",
                            "numbers >= 0"),
    ("compress", "--steps"): (["M", "--calib", "C", "--preserve-robustness", "--steps", "X", "-o", "O"], "-1",
                              "positive integer"),
    ("compress", "--step-size"): (["M", "--calib", "C", "--preserve-robustness", "--step-size", "X", "-o", "O"],
                                  "0", "in (0, 1]"),
    ("compress", "--pixel-mean"): (["M", "--calib", "C", "--preserve-robustness", "--pixel-std", "1,1",
                                    "--pixel-mean", "X", "-o", "O"], "0,0", "1 channels"),
    ("compress", "--pixel-std"): (["M", "--calib", "C", "--preserve-robustness", "--pixel-mean", "0",
                                   "--pixel-std", "X", "-o", "O"], "-1", "pixel_std must be > 0"),
    ("compress", "--attack-samples"): (["M", "--calib", "C", "--attack-samples", "X", "-o", "O"], "none",
                                       "integer"),
    ("compress", "--attack-seed"): (["M", "--calib", "C", "--attack-seed", "X", "-o", "O"], "x", "integer"),
    ("compress", "--attack-data"): (["M", "--calib", "C", "--attack", "pgd", "--attack-data", "X", "-o", "O"],
                                    "@wrong.npz", "do not fit the model's input"),
    ("compress", "--calib"): (["M", "--calib", "X", "-o", "O"], "@bad.npz", "not a readable .npz"),
    ("compress", "--calib-limit"): (["M", "--calib", "C", "--calib-limit", "X", "-o", "O"], "0", "positive integer"),
    ("compress", "--calib-text"): (["M", "--calib-text", "X", "-o", "O"], "@missing.txt", "--calib-text calibrates a "
                                   "Hugging Face model directory"),
    ("compress", "--train-text"): (["M", "--calib", "C", "--train-text", "X", "-o", "O"], "@missing.txt",
                                   "--train-text fine-tunes a Hugging Face model directory"),
    ("compress", "--seq-len"): (["M", "--calib", "C", "--seq-len", "X", "-o", "O"], "1", "at least 2 tokens"),
    ("compress", "--samples"): (["M", "--calib", "C", "--samples", "X", "-o", "O"], "0", "positive integer"),
    ("compress", "--min-rank"): (["M", "--calib", "C", "--min-rank", "X", "-o", "O"], "0", "positive integer"),
    ("compress", "--min-agreement"): (["M", "--calib", "C", "--min-agreement", "X", "-o", "O"], "7",
                                      "a number in [0, 1]"),
    ("compress", "--observer"): (["M", "--calib", "C", "--max-params", "50%", "--observer", "X", "-o", "O"],
                                 "median", "invalid choice"),
    ("compress", "--max-memory"): (["M", "--calib", "C", "--max-memory", "X", "-o", "O"], "lots",
                                   "expected a memory size"),
    ("compress", "--max-output-error"): (["M", "--calib", "C", "--max-output-error", "X", "-o", "O"], "-1",
                                         "a number >= 0"),
    ("compress", "--check"): (["M", "--calib", "C", "--check", "X", "-o", "O"], "top1:abc", "top1:abc"),
    ("compress", "--embedding"): (["M", "--calib", "C", "--embedding", "X", "-o", "O"], "nosuch",
                                  "--embedding 'nosuch': the model has no such output"),
    ("compress", "--output"): (["M", "--calib", "C", "-o", "X"], "M", "never writes over its inputs"),
    ("compress", "--target"): (["M", "--calib", "C", "--target", "X", "-o", "O"], "cortex-m99", "unknown target"),
    ("compress", "--max-params"): (["M", "--calib", "C", "--max-params", "X", "-o", "O"], "10 parsecs", "10 parsecs"),
    ("compress", "--max-weight-bytes"): (["M", "--calib", "C", "--max-weight-bytes", "X", "-o", "O"], "-3%", "-3%"),
    ("compress", "--max-macs"): (["M", "--calib", "C", "--max-macs", "X", "-o", "O"], "many", "many"),
    ("compress", "--max-latency"): (["M", "--calib", "C", "--max-latency", "X", "-o", "O"], "4 hours", "4 hours"),
    ("compress", "--max-ram"): (["M", "--calib", "C", "--max-ram", "X", "-o", "O"], "nanKB", "nanKB"),
    ("compress", "--bits"): (["M", "--calib", "C", "--max-params", "50%", "--bits", "X", "-o", "O"], "7",
                             "not 7"),
    ("compress", "--group-size"): (["M", "--calib", "C", "--max-params", "50%", "--group-size", "X", "-o", "O"], "0",
                                   "positive integer"),
    ("compress", "--plan-out"): (["M", "--calib", "C", "--max-params", "50%", "--plan-out", "X", "-o", "O"], "C",
                                 "never writes over its inputs"),
    ("compress", "--method"): (["M", "--calib", "C", "--method", "X", "-o", "O"], "magic", "unknown method 'magic'"),
    ("compress", "--keep"): (["M", "--calib", "C", "--keep", "X", "-o", "O"], "1.5",
                           "--keep must be a number in (0, 1]"),
    ("compress", "--ranks"): (["M", "--calib", "C", "--ranks", "X", "-o", "O"], "random", "--ranks must be vbmf"),
    ("compress", "--train"): (["M", "--calib", "C", "--max-params", "50%", "--finetune-steps", "2", "--train", "X",
                              "-o", "O"], "@wrong.npz", "do not fit the model's input"),
    ("compress", "--finetune-steps"): (["M", "--calib", "C", "--max-params", "50%", "--train", "D",
                                       "--finetune-steps", "X", "-o", "O"], "0", "positive integer"),
    ("compress", "--finetune-minutes"): (["M", "--calib", "C", "--max-params", "50%", "--train", "D",
                                         "--finetune-minutes", "X", "-o", "O"], "-1", "a number > 0"),
    ("compress", "--mlp-keep"): (["M", "--calib", "C", "--max-params", "50%", "--mlp-keep", "X", "-o", "O"], "0",
                                 "between 0 and 1 (exclusive)"),
    ("compress", "--finetune-lr"): (["M", "--calib", "C", "--max-params", "50%", "--train", "D",
                                    "--finetune-steps", "1", "--finetune-lr", "X", "-o", "O"], "0", "a number > 0"),
    ("compress", "--finetune-feature-weight"): (["M", "--calib", "C", "--max-params", "50%", "--train", "D",
                                                "--finetune-steps", "1", "--finetune-feature-weight", "X", "-o", "O"],
                                               "-1", "a number >= 0"),
    ("compress", "--device"): (["M", "--calib", "C", "--max-params", "50%", "--train", "D", "--finetune-steps", "1",
                               "--device", "X", "-o", "O"], "cuda:x", "expected cpu, cuda or cuda:N"),
    ("compress", "--report"): (["M", "--calib", "C", "--report", "X", "-o", "O"], "M", "never writes over its inputs"),
    ("apply", "plan"): (["X", "M", "--calib", "C", "-o", "O"], "@bad.json", "bad.json"),
    ("apply", "model"): (["P", "X", "--calib", "C", "-o", "O"], "@missing.onnx", "no such file"),
    ("apply", "--calib"): (["P", "M", "--calib", "X", "-o", "O"], "@missing.npz", "no such file"),
    ("apply", "--calib-limit"): (["P", "M", "--calib", "C", "--calib-limit", "X", "-o", "O"], "many", "integer"),
    ("apply", "--min-agreement"): (["P", "M", "--calib", "C", "--min-agreement", "X", "-o", "O"], "nan",
                                   "a number in [0, 1]"),
    ("apply", "--observer"): (["P", "M", "--calib", "C", "--observer", "X", "-o", "O"], "", "invalid choice"),
    ("apply", "--max-memory"): (["P", "M", "--calib", "C", "--max-memory", "X", "-o", "O"], "0",
                                "expected a memory size"),
    ("apply", "--max-output-error"): (["P", "M", "--calib", "C", "--max-output-error", "X", "-o", "O"], "inf",
                                      "a number >= 0"),
    ("apply", "--check"): (["P", "M", "--calib", "C", "--check", "X", "-o", "O"], "nosuch:0.5",
                          "'nosuch:0.5': expected"),
    ("apply", "--embedding"): (["P", "M", "--calib", "C", "--embedding", "X", "-o", "O"], "3",
                               "--embedding '3': the model has no such output"),
    ("apply", "--output"): (["P", "M", "--calib", "C", "-o", "X"], "P", "never writes over its inputs"),
    ("apply", "--report"): (["P", "M", "--calib", "C", "--report", "X", "-o", "O"], "C",
                            "never writes over its inputs"),
    ("finetune", "model"): (["X", *FT[1:], "-o", "O"], "@missing.onnx", "no such file"),
    ("finetune", "--calib"): ([*FT, "--calib", "X", "-o", "O"], "@bad.npz", "not a readable .npz"),
    ("finetune", "--calib-limit"): ([*FT, "--calib-limit", "X", "-o", "O"], "0", "positive integer"),
    ("finetune", "--min-agreement"): ([*FT, "--min-agreement", "X", "-o", "O"], "7", "a number in [0, 1]"),
    ("finetune", "--observer"): ([*FT, "--observer", "X", "-o", "O"], "median", "invalid choice"),
    ("finetune", "--max-memory"): ([*FT, "--max-memory", "X", "-o", "O"], "lots", "expected a memory size"),
    ("finetune", "--max-output-error"): ([*FT, "--max-output-error", "X", "-o", "O"], "-1", "a number >= 0"),
    ("finetune", "--check"): ([*FT, "--check", "X", "-o", "O"], "top1:abc", "top1:abc"),
    ("finetune", "--embedding"): ([*FT, "--embedding", "X", "-o", "O"], "nosuch",
                                  "--embedding 'nosuch': the model has no such output"),
    ("finetune", "--plan"): (["M", "--plan", "X", *FT[3:], "-o", "O"], "@bad.json", "bad.json"),
    ("finetune", "--student"): (["M", "--student", "X", *FT[3:], "-o", "O"], "@notonnx.onnx", "not an ONNX model"),
    ("finetune", "--train"): ([*FT, "--train", "X", "-o", "O"], "@wrong.npz", "do not fit the model's input"),
    ("finetune", "--train-limit"): ([*FT, "--train-limit", "X", "-o", "O"], "-1",
                                    "expected 0 (all) or a positive integer"),
    ("finetune", "--output"): ([*FT, "-o", "X"], "M", "never writes over its inputs"),
    ("finetune", "--steps"): ([*FT, "--steps", "X", "-o", "O"], "0", "positive integer"),
    ("finetune", "--minutes"): ([*FT, "--minutes", "X", "-o", "O"], "0", "a number > 0"),
    ("finetune", "--device"): ([*FT, "--device", "X", "-o", "O"], "tpu", "expected cpu, cuda or cuda:N"),
    ("finetune", "--batch-size"): ([*FT, "--batch-size", "X", "-o", "O"], "65", "larger than the training set"),
    ("finetune", "--lr"): ([*FT, "--lr", "X", "-o", "O"], "-1", "a number > 0"),
    ("finetune", "--optimizer"): ([*FT, "--optimizer", "X", "-o", "O"], "rmsprop", "invalid choice"),
    ("finetune", "--weight-decay"): ([*FT, "--weight-decay", "X", "-o", "O"], "2",
                                     "weight_decay must be a number in [0, 1]"),
    ("finetune", "--temperature"): ([*FT, "--temperature", "X", "-o", "O"], "nan", "a number > 0"),
    ("finetune", "--label-weight"): ([*FT, "--label-weight", "X", "-o", "O"], "2", "a number in [0, 1]"),
    ("finetune", "--feature-weight"): ([*FT, "--feature-weight", "X", "-o", "O"], "-1", "--feature-weight"),
    ("finetune", "--seed"): ([*FT, "--seed", "X", "-o", "O"], "x", "integer"),
    ("finetune", "--log-every"): ([*FT, "--log-every", "X", "-o", "O"], "0", "positive integer"),
    ("finetune", "--checkpoint"): ([*FT, "--checkpoint", "X", "-o", "O"], "M", "exists and is not a directory"),
    ("finetune", "--checkpoint-every"): ([*FT, "--checkpoint-every", "X", "-o", "O"], "-3", "positive integer"),
    ("finetune", "--qat-steps"): ([*FT, "--qat-steps", "X", "-o", "O"], "minmax", "invalid choice"),
    ("finetune", "--qat-activations"): ([*FT, "--qat-activations", "X", "-o", "O"], "minmax", "invalid choice"),
    ("finetune", "--adversarial-eps"): ([*FT, "--adversarial-eps", "X", "-o", "O"], "-0.1", "a number > 0"),
    ("finetune", "--pixel-mean"): ([*FT, "--adversarial-eps", "0.1", "--pixel-std", "1,1", "--pixel-mean", "X",
                                    "-o", "O"], "0,0", "1 channels"),
    ("finetune", "--pixel-std"): ([*FT, "--pixel-std", "X", "-o", "O"], "0.3", "give it too"),
    ("finetune", "--report"): ([*FT, "--report", "X", "-o", "O"], "C", "never writes over its inputs"),
    ("pareto", "model"): (["X"], "@notonnx.onnx", "not an ONNX model"),
    ("pareto", "--calib"): (["M", "--calib", "X"], "@wrong.npz", "do not fit the model's input"),
    ("pareto", "--calib-limit"): (["M", "--calib", "C", "--calib-limit", "X"], "-4", "positive integer"),
    ("pareto", "--min-rank"): (["M", "--calib", "C", "--min-rank", "X"], "2.5", "integer"),
    ("pareto", "--max-memory"): (["M", "--calib", "C", "--max-memory", "X"], "-1GB", "expected a memory size"),
    ("pareto", "--target"): (["M", "--calib", "C", "--target", "X"], "nowhere", "unknown target"),
    ("pareto", "--points"): (["M", "--calib", "C", "--points", "X"], "10,abc", "--points"),
    ("pareto", "--data"): (["M", "--calib", "C", "--data", "X"], "@bad.npz", "not a readable .npz"),
    ("pareto", "--limit"): (["M", "--calib", "C", "--limit", "X"], "-2", "expected 0 (all) or a positive integer"),
    ("pareto", "--measure"): (["M", "--calib", "C", "--measure", "X"], "-1", "expected 0 (all) or a positive"),
    ("pareto", "--plot"): (["M", "--calib", "C", "--plot", "X"], "M", "never writes over its inputs"),
    ("pareto", "--json"): (["M", "--calib", "C", "--json", "X"], "C", "never writes over its inputs"),
    ("export-c", "model"): (["X", "-o", "O"], "@missing.onnx", "no such file"),
    ("export-c", "--output"): (["M", "--calib", "C", "-o", "X"], "@", "holds the model input"),
    ("export-c", "--target"): (["M", "--calib", "C", "--target", "X", "-o", "O"], "cortex-m99", "unknown target"),
    ("export-c", "--calib"): (["M", "--calib", "X", "-o", "O"], "@wrong.npz", "do not fit the model's input"),
    ("export-c", "--calib-limit"): (["M", "--calib", "C", "--calib-limit", "X", "-o", "O"], "0", "positive integer"),
    ("run-c", "dir"): (["X", "--data", "D"], "@nodir", "nodir"),
    ("run-c", "--data"): (["@nodir", "--data", "X"], "@bad.npz", "not a readable .npz"),
    ("run-c", "--limit"): (["@nodir", "--data", "D", "--limit", "X"], "x", "integer"),
    ("run-c", "--qemu"): (["@nodir", "--data", "D", "--qemu", "X"], "mps2-an999", "mps2-an999"),
    ("run-c", "--qemu-samples"): (["@nodir", "--data", "D", "--qemu-samples", "X"], "0", "positive integer"),
    ("targets", "--show"): (["--show", "X"], "nowhere", "unknown target"),
    ("demo", "--out"): (["--out", "X"], "M", "m.onnx"),
    ("demo", "--epochs"): (["--epochs", "X"], "0", "positive integer"),
    ("demo", "--target"): (["--target", "X"], "cortex-m99", "unknown target"),
    ("demo", "--max-weight-bytes"): (["--max-weight-bytes", "X"], "abc", "abc"),
}


def _value_options() -> set[tuple[str, str]]:
    """(command, option) for every positional and every option that takes a value."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found = set()
    for command, sub in commands.choices.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction) or action.nargs == 0:
                continue
            found.add((command, max(action.option_strings, key=len) if action.option_strings else action.dest))
    return found


def test_the_table_covers_every_option():
    assert _value_options() == set(CASES)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("options")
    x = np.random.default_rng(0).standard_normal((64, 1, 12, 12)).astype(np.float32)
    model = tiny_classifier()
    rankfold.export_onnx(model, root / "m.onnx", example_input=torch.from_numpy(x[:1]))
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    np.savez(root / "data.npz", x=x, y=y)
    np.savez(root / "calib.npz", x=x)
    np.savez(root / "wrong.npz", x=np.zeros((4, 3, 12, 12), np.float32), y=np.zeros(4, np.int64))
    (root / "bad.npz").write_bytes(b"garbage")
    (root / "notonnx.onnx").write_text("hello")
    (root / "bad.json").write_text("{not json")
    plan = rankfold.make_plan(rankfold.load_onnx(root / "m.onnx"), calib=torch.from_numpy(x[:56]),
                              budgets={"params": "60%"}, min_rank=2, bits=32)
    plan.save(root / "plan.json")
    json.loads((root / "plan.json").read_text())  # a good plan: the cases fail on their own value
    return root


@pytest.mark.parametrize("command, option", sorted(CASES))
def test_every_option_refuses_a_bad_value(files, tmp_path, command, option, capsys):
    arguments, bad, message = CASES[(command, option)]
    names = {"M": files / "m.onnx", "C": files / "calib.npz", "D": files / "data.npz", "P": files / "plan.json",
             "O": tmp_path / ("cdir" if command == "export-c" else "out.onnx")}

    def resolve(word: str) -> str:  # @name: a file of the fixture's directory (perhaps missing)
        return str(files / word[1:]) if word.startswith("@") else str(names.get(word, word))

    argv = [command]
    for word in arguments:  # an option's value joined to it (--opt=value): values may start with '-'
        if word == "X" and argv[-1].startswith("--"):
            argv[-1] += "=" + resolve(bad)
        else:
            argv.append(resolve(bad) if word == "X" else resolve(word))
    before = sorted(p.name for p in files.iterdir())
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's usage error
            code = exc.code
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert message in err, (argv, err)
    assert list(tmp_path.iterdir()) == [] and sorted(p.name for p in files.iterdir()) == before


@pytest.mark.parametrize("extra, message", [
    (["--max-params", "50%", "--ranks", "vbmf"], "--ranks set a uniform compression"),
    (["--max-params", "50%", "--keep", "0.3", "--method", "svd"], "--keep/--method set a uniform compression"),
    (["--keep", "0.3", "--bits", "8"], "--bits only work with the planner"),
    (["--keep", "0.3", "--group-size", "32"], "--group-size only work with the planner"),
    (["--max-params", "50%", "--target", "cortex-m4", "--group-size", "32"], "target cortex-m4 has no grouped int4"),
    (["--keep", "0.3", "--plan-out", "@plan-out.json"], "--plan-out only work with the planner"),
    (["--observer", "minmax"], "--observer only work with the planner"),
    (["--keep", "0.3", "--train", "@t.npz", "--finetune-steps", "5"], "--train/--finetune-steps only work with"),
    (["--max-params", "50%", "--finetune-steps", "5"], "--finetune-steps need --train"),
    (["--max-params", "50%", "--train", "@t.npz"], "say how long with --finetune-steps"),
    (["--max-params", "50%", "--train", "@t.npz", "--finetune-lr", "1e-4"], "say how long with --finetune-steps"),
    (["--max-params", "50%", "--finetune-lr", "1e-4"], "--finetune-lr need --train"),
    (["--keep", "0.3", "--finetune-lr", "1e-4"], "--finetune-lr only work with the planner"),
    (["--max-params", "50%", "--finetune-feature-weight", "1"], "--finetune-feature-weight need --train"),
    (["--keep", "0.3", "--finetune-feature-weight", "1"], "--finetune-feature-weight only work with the planner"),
])
def test_options_the_mode_does_not_use_are_refused(files, tmp_path, extra, message, capsys):
    extra = [str(tmp_path / e[1:]) if e.startswith("@") else e for e in extra]
    code = main(["compress", str(files / "m.onnx"), "--calib", str(files / "calib.npz"), "-o",
                 str(tmp_path / "out.onnx"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_apply_takes_its_ranks_from_the_plan_and_pareto_writes_no_model():
    def options(command: str) -> set[str]:
        return {o for command_, o in _value_options() if command_ == command}

    assert "--min-rank" not in options("apply")
    assert not {"--min-agreement", "--observer"} & options("pareto")


def test_the_cli_observers_are_the_quantizers():
    from rankfold.cli import OBSERVER_NAMES
    from rankfold.quantize.observers import OBSERVERS

    assert set(OBSERVER_NAMES) == set(OBSERVERS)


@pytest.mark.parametrize("command, arguments, message", [
    ("finetune", [*FT, "--checkpoint", "", "-o", "O"], "--checkpoint: expected a directory path, got ''"),
    ("finetune", [*FT, "--device", "", "-o", "O"], "--device '': expected cpu, cuda or cuda:N"),
    ("export-c", ["M", "--calib", "C", "--target", "", "-o", "O"], "unknown target ''"),
    ("targets", ["--show", ""], "unknown target ''"),
    ("demo", ["--out", ""], "--out: expected a directory path, got ''"),
])
def test_an_empty_value_is_refused_not_read_as_the_default(files, tmp_path, command, arguments, message, capsys):
    """An empty --checkpoint, --device, --target or --show was read as 'none given' (no
    checkpoints, the CPU, no target, every target) and the command went on; demo --out '' failed
    without naming the option."""
    names = {"M": files / "m.onnx", "C": files / "calib.npz", "D": files / "data.npz", "P": files / "plan.json",
             "O": tmp_path / ("cdir" if command == "export-c" else "out.onnx")}
    with contextlib.redirect_stdout(io.StringIO()):
        code = main([command, *(str(names.get(a, a)) for a in arguments)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []
