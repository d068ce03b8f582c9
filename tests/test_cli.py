import json

import numpy as np
import pytest
import torch

import rankfold
from rankfold.cli import main
from rankfold.selfcheck import proportion_interval
from tests.helpers import run_cli, tiny_classifier


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A tiny classifier as ONNX, with a dataset and calibration data."""
    root = tmp_path_factory.mktemp("cli")
    model = tiny_classifier()
    x = np.random.default_rng(0).standard_normal((64, 1, 12, 12)).astype(np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    rankfold.export_onnx(model, root / "m.onnx", example_input=torch.from_numpy(x[:1]))
    np.savez(root / "data.npz", x=x, y=y)
    np.savez(root / "calib.npz", x=x[:32])
    return root


def test_every_command_has_help():
    for command in ([], ["eval"], ["compress"], ["apply"], ["pareto"], ["targets"], ["demo"]):
        code, out, _ = run_cli(*command, "--help")
        assert code == 0 and "usage: rankfold" in out


def test_eval_json_has_the_contract_keys(small):
    code, out, err = run_cli("eval", str(small / "m.onnx"), "--data", str(small / "data.npz"), "--json",
                             "--runs", "3")
    assert code == 0, err
    result = json.loads(out)
    assert set(result) >= {"accuracy", "params", "macs", "weight_bytes", "file_bytes", "latency_ms_b1",
                           "latency_ms_b32"}
    assert result["accuracy"] == 1.0  # labels are the model's own predictions
    assert result["params"] == 16 * 9 + 16 + 32 * 16 * 9 + 32 + 330
    assert result["latency_ms_b1"] > 0 and result["latency_ms_b32"] > 0
    code, out, err = run_cli("eval", str(small / "m.onnx"), "--data", str(small / "data.npz"), "--runs", "3")
    samples = int(out.split("accuracy")[1].split("(")[1].split()[0])
    low, _high = proportion_interval(1.0, samples)
    assert code == 0 and f"({samples} samples; 95 % interval {low:.4f}-1.0000)" in out, out


def test_eval_of_a_file_exported_at_batch_1_times_it_at_batch_1_only(small, tmp_path):
    """onnxruntime refuses 32 samples at once to a graph whose batch is fixed at 1: eval runs it
    sample by sample and says the batch-32 latency was not measured, instead of failing."""
    path = tmp_path / "b1.onnx"
    torch.onnx.export(tiny_classifier().eval(), (torch.randn(1, 1, 12, 12),), str(path), dynamo=False,
                      input_names=["x"])  # no dynamic axes: the batch is 1
    code, out, err = run_cli("eval", str(path), "--data", str(small / "data.npz"), "--runs", "3")
    assert code == 0, err
    assert "accuracy        1.0000" in out and "latency b1 " in out
    assert "latency b32     not measured: the file's batch is fixed at another size" in out
    code, out, err = run_cli("eval", str(path), "--data", str(small / "data.npz"), "--json", "--runs", "3")
    assert code == 0 and json.loads(out)["latency_ms_b32"] is None and json.loads(out)["latency_ms_b1"] > 0


def test_compress_writes_a_smaller_model_and_report(small, tmp_path):
    out = tmp_path / "c.onnx"
    report = tmp_path / "r.json"
    code, stdout, err = run_cli("compress", str(small / "m.onnx"), "--calib", str(small / "calib.npz"),
                                "--keep", "0.4", "--min-rank", "2", "-o", str(out), "--report", str(report))
    assert code == 0, err
    assert "total" in stdout and out.is_file()
    data = json.loads(report.read_text())
    assert data["after"]["params"] < data["before"]["params"]
    assert any(layer["method"] == "tucker2" for layer in data["layers"])


@pytest.mark.parametrize("args, message", [
    (["eval", "missing.onnx", "--data", "D"], "missing.onnx: no such file"),
    (["eval", "NOTONNX", "--data", "D"], "not an ONNX model"),
    (["eval", "M", "--data", "missing.npz"], "missing.npz: no such file"),
    (["eval", "M", "--data", "BADNPZ"], "not a readable .npz"),
    (["eval", "M", "--data", "WRONGSHAPE"], "do not fit the model's input"),
    (["compress", "M", "--keep", "1.5", "-o", "OUT"], "--keep must be a number in (0, 1]"),
    (["compress", "M", "--method", "magic", "-o", "OUT"], "unknown method 'magic'"),
    (["compress", "M", "--calib", "WRONGSHAPE", "-o", "OUT"], "do not fit the model's input"),
    (["compress", "M", "-o", "/nonexistent/dir/out.onnx"], "does not exist"),
    (["compress", "M", "--keep", "0.5", "-o", "OUT", "--report", ""], "--report: expected a file path, got ''"),
    (["pareto", "M", "--calib", "D", "--json", ""], "--json: expected a file path, got ''"),
])
def test_bad_input_is_one_line_exit_2_and_no_output(small, tmp_path, args, message):
    (tmp_path / "notonnx.onnx").write_text("hello")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    np.savez(tmp_path / "wrong.npz", x=np.zeros((4, 3, 12, 12), np.float32), y=np.zeros(4, np.int64))
    subst = {"M": str(small / "m.onnx"), "D": str(small / "data.npz"), "NOTONNX": str(tmp_path / "notonnx.onnx"),
             "BADNPZ": str(tmp_path / "bad.npz"), "WRONGSHAPE": str(tmp_path / "wrong.npz"),
             "OUT": str(tmp_path / "out.onnx"), "missing.onnx": str(tmp_path / "missing.onnx"),
             "missing.npz": str(tmp_path / "missing.npz")}
    code, out, err = run_cli(*[subst.get(a, a) for a in args])
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert message in err
    assert not (tmp_path / "out.onnx").exists()
    assert not list(tmp_path.glob("*.onnx.tmp*")) and len(list(tmp_path.glob("tmp*"))) == 0


def test_main_returns_exit_code_without_exiting(small, capsys):
    assert main(["eval", str(small / "nope.onnx"), "--data", "x.npz"]) == 2
    assert "no such file" in capsys.readouterr().err


def _onnx_outputs(path, x):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_planned_compress_then_apply_reproduces_it(small, tmp_path):
    out, plan, report = tmp_path / "p.onnx", tmp_path / "plan.json", tmp_path / "r.json"
    code, stdout, err = run_cli("compress", str(small / "m.onnx"), "--calib", str(small / "data.npz"),
                                "--target", "cortex-m4", "--max-params", "50%", "--min-rank", "2",
                                "-o", str(out), "--plan-out", str(plan), "--report", str(report))
    assert code == 0, err
    assert "self-check: top-1 agreement" in stdout and "before" in stdout
    saved = json.loads(plan.read_text())
    assert saved["after"]["params"] <= 0.5 * saved["before"]["params"]
    assert json.loads(report.read_text())["self_check"]["samples"] == 16
    again = tmp_path / "again.onnx"
    code, _, err = run_cli("apply", str(plan), str(small / "m.onnx"), "--calib", str(small / "data.npz"),
                           "-o", str(again))
    assert code == 0, err
    x = np.load(small / "data.npz")["x"][:8]
    np.testing.assert_array_equal(_onnx_outputs(out, x), _onnx_outputs(again, x))


@pytest.mark.parametrize("extra, message", [
    (["--max-params", "10 parsecs"], "max_params"),
    (["--max-params", "50%", "--keep", "0.3"], "one or the other"),
    (["--target", "cortex-m99"], "unknown target"),
    (["--max-params", "0.1%"], "cannot be met"),
    (["--max-params", "60%", "--min-agreement", "1.01", "--min-rank", "2"], "--min-agreement"),
])
def test_planned_compress_bad_input_exits_2_and_writes_nothing(small, tmp_path, extra, message):
    out = tmp_path / "never.onnx"
    code, _, err = run_cli("compress", str(small / "m.onnx"), "--calib", str(small / "data.npz"), "-o", str(out),
                           "--target", "cortex-m4", *extra) if "--target" not in extra else run_cli(
        "compress", str(small / "m.onnx"), "--calib", str(small / "data.npz"), "-o", str(out), *extra)
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_apply_refuses_a_bad_plan(small, tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text("{not json")
    code, _, err = run_cli("apply", str(bad), str(small / "m.onnx"), "-o", str(tmp_path / "x.onnx"))
    assert code == 2 and "not a JSON plan" in err


def test_targets_lists_and_shows_profiles():
    code, out, _ = run_cli("targets")
    assert code == 0 and "cortex-m7" in out and "host" in out
    code, out, _ = run_cli("targets", "--show", "cortex-m7")
    assert code == 0 and "flash_bytes = 2_097_152" in out


def test_pareto_prints_plots_and_says_what_fits(small, tmp_path):
    plot, front = tmp_path / "front.png", tmp_path / "front.json"
    code, out, err = run_cli("pareto", str(small / "m.onnx"), "--calib", str(small / "data.npz"), "--target",
                             "cortex-m4", "--points", "30,60,90", "--data", str(small / "data.npz"),
                             "--measure", "2", "--min-rank", "2", "--plot", str(plot), "--json", str(front))
    assert code == 0, err
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(front.read_text())
    assert [p["budget"] for p in result["points"]] == [0.3, 0.6, 0.9]
    assert sum(p["accuracy"] is not None for p in result["points"]) == 2
    assert "target cortex-m4 holds this network" in out


def test_help_starts_without_importing_torch():
    """`rankfold --help` must answer at once: nothing that imports torch or onnxruntime runs for it."""
    import subprocess
    import sys

    check = ("import sys\nfrom rankfold.cli import main\nfor argv in (['--help'], ['compress', '--help'], "
             "['demo', '--help']):\n    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
             "heavy = sorted(m for m in ('torch', 'onnxruntime', 'onnx') if m in sys.modules)\n"
             "print('HEAVY', heavy)\nimport rankfold\nassert callable(rankfold.compress)\n")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout


def _initializers(path) -> list[tuple]:
    import onnx
    from onnx import numpy_helper

    return sorted((tuple(a.shape), a.tobytes()) for a in map(numpy_helper.to_array, onnx.load(path).graph.initializer))


def test_plan_then_apply_gives_the_same_weights_through_the_cli_and_the_api(tmp_path):
    """The plan records how many calibration samples its planning held back; applying it holds
    back as many whichever door it goes through (the API's apply_plan used to fit on all of them)."""
    x = np.random.default_rng(1).standard_normal((96, 1, 12, 12)).astype(np.float32)
    rankfold.export_onnx(tiny_classifier(), tmp_path / "m.onnx", example_input=torch.from_numpy(x[:1]))
    np.savez(tmp_path / "c.npz", x=x)
    code, _out, err = run_cli("compress", "m.onnx", "--calib", "c.npz", "--max-params", "60%", "--bits", "32",
                              "--min-rank", "2", "-o", "cli.onnx", "--plan-out", "plan.json", "-q", cwd=tmp_path)
    assert code == 0, err
    plan = rankfold.load_plan(tmp_path / "plan.json")
    assert plan.held_back == 16 and not plan.quantized
    calib = torch.from_numpy(x)
    module, _report = rankfold.apply_plan(rankfold.load_onnx(tmp_path / "m.onnx"), plan, calib=calib)
    rankfold.export_onnx(module, tmp_path / "api.onnx", example_input=calib[:1])
    assert _initializers(tmp_path / "cli.onnx") == _initializers(tmp_path / "api.onnx")
    # and the API's own planned compress, applied again from its plan
    model = rankfold.load_onnx(tmp_path / "m.onnx")
    planned = rankfold.compress(model, calib=calib, max_params="60%", bits=32, min_rank=2)
    again, _report = rankfold.apply_plan(model, planned.rankfold_plan, calib=calib)
    for (name, a), (_, b) in zip(planned.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(rankfold.RankfoldError, match="holding back the last 16"):
        rankfold.apply_plan(model, plan, calib=calib[:40])


def test_the_commands_are_python_functions_that_return_data(small, capsys):
    """eval, pareto, export-c and run-c have functions behind them that return what the CLI prints."""
    x = np.load(small / "data.npz")["x"]
    y = np.load(small / "data.npz")["y"]
    result = rankfold.evaluate_onnx(small / "m.onnx", x, y, measure_latency=False)
    assert result.params > 0 and 0 <= result.accuracy <= 1
    model, calib = rankfold.load_onnx(small / "m.onnx"), torch.from_numpy(x)
    front = rankfold.run_pareto(model, str(small / "m.onnx"), calib=calib, example=calib[:1], target="cortex-m4",
                                fractions=[0.5, 0.2], min_rank=2)
    assert [p["budget"] for p in front["points"]] == [0.2, 0.5] and front["lines"]
    assert capsys.readouterr().out == ""  # nothing printed: the CLI prints front["lines"]


def test_the_result_object_saves_what_the_cli_writes(tmp_path):
    """compress_to_budget(...).save() is the CLI's writer: the same QDQ file (int8 weights, checked
    again on the held-back samples) through either door; an existing file is kept unless forced."""
    x = np.random.default_rng(3).standard_normal((96, 1, 12, 12)).astype(np.float32)
    rankfold.export_onnx(tiny_classifier(), tmp_path / "m.onnx", example_input=torch.from_numpy(x[:1]))
    np.savez(tmp_path / "c.npz", x=x)
    code, _out, err = run_cli("compress", "m.onnx", "--calib", "c.npz", "--target", "cortex-m4", "--max-params",
                              "60%", "--bits", "8", "--min-rank", "2", "-o", "cli.onnx", "-q", cwd=tmp_path)
    assert code == 0, err
    result = rankfold.compress_to_budget(rankfold.load_onnx(tmp_path / "m.onnx"), calib=torch.from_numpy(x),
                                         target="cortex-m4", budgets={"params": "60%"}, bits=8, min_rank=2)
    assert isinstance(result, rankfold.Compressed) and result.quantized and result.check is not None
    check = result.save(tmp_path / "api.onnx")
    assert check is result.check and check.samples == 16  # the QDQ file's own check
    assert _initializers(tmp_path / "cli.onnx") == _initializers(tmp_path / "api.onnx")
    assert any(n.op_type == "DequantizeLinear" for n in __import__("onnx").load(tmp_path / "api.onnx").graph.node)
    (tmp_path / "kept.onnx").write_bytes(b"a user's file")
    with pytest.raises(rankfold.RankfoldError, match="exists"):
        result.save(tmp_path / "kept.onnx")
    assert (tmp_path / "kept.onnx").read_bytes() == b"a user's file"
    with pytest.raises(rankfold.RankfoldError, match="observer"):
        result.save(tmp_path / "other.onnx", observer="median")
    assert not (tmp_path / "other.onnx").exists()


def test_uniform_mode_through_the_api_is_the_cli_path(small, tmp_path):
    calib = torch.from_numpy(np.load(small / "calib.npz")["x"])
    code, _out, err = run_cli("compress", str(small / "m.onnx"), "--calib", str(small / "calib.npz"), "--keep", "0.4",
                              "--min-rank", "2", "-o", str(tmp_path / "cli.onnx"), "-q")
    assert code == 0, err
    result = rankfold.compress_uniform(rankfold.load_onnx(small / "m.onnx"), keep=0.4, calib=calib, min_rank=2)
    assert result.plan is None and result.check.samples == len(calib)
    result.save(tmp_path / "api.onnx")
    assert _initializers(tmp_path / "cli.onnx") == _initializers(tmp_path / "api.onnx")
    with pytest.raises(rankfold.RankfoldError, match="at least 16 calibration samples"):
        rankfold.compress_uniform(rankfold.load_onnx(small / "m.onnx"), keep=0.4, calib=calib[:8])
