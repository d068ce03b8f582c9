"""A user's files are sacred: no command deletes or overwrites what rankfold did not create, every
output is checked against every input and every other output before work starts, and a run that
dies leaves nothing half-written beside its output (issue 20, cases 1-4)."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import rankfold
from rankfold.io import C_EXPORT_MARKER
from tests.helpers import run_cli, tiny_classifier


def digest(directory) -> dict[str, str]:
    """Every file under `directory` with its content hash: what must not change."""
    out = {}
    for root, _dirs, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                out[os.path.relpath(path, directory)] = hashlib.sha256(handle.read()).hexdigest()
    return out


@pytest.fixture()
def user_dir(tmp_path):
    """A user's directory: a model, its calibration data, and a file of their own."""
    model = tiny_classifier()
    x = np.random.default_rng(0).standard_normal((96, 1, 12, 12)).astype(np.float32)
    rankfold.export_onnx(model, tmp_path / "model.onnx", example_input=torch.from_numpy(x[:1]))
    np.savez(tmp_path / "calib.npz", x=x)
    (tmp_path / "notes.txt").write_text("the user's own notes\n")
    return tmp_path


def refused(code: int, err: str, *words: str) -> bool:
    return code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1 and \
        all(w in err for w in words)


def test_export_c_into_the_current_directory_deletes_nothing(user_dir):
    before = digest(user_dir)
    code, _out, err = run_cli("export-c", "model.onnx", "-o", ".", "--calib", "calib.npz", cwd=user_dir)
    assert refused(code, err, "current directory")
    assert digest(user_dir) == before
    code, _out, err = run_cli("export-c", "model.onnx", "-o", ".", "--calib", "calib.npz", "--force", cwd=user_dir)
    assert refused(code, err, "current directory") and digest(user_dir) == before


def test_export_c_never_replaces_a_directory_it_did_not_write(user_dir):
    target = user_dir / "existing"
    target.mkdir()
    (target / "mine.c").write_text("int main(void) { return 0; }\n")
    before = digest(user_dir)
    for extra in ([], ["--force"]):
        code, _out, err = run_cli("export-c", user_dir / "model.onnx", "-o", target, "--calib",
                                  user_dir / "calib.npz", *extra)
        assert code == 2 and "Traceback" not in err, err
        assert digest(user_dir) == before


def test_export_c_replaces_its_own_directory_only_with_force(user_dir):
    out = user_dir / "c_model"
    args = ["export-c", user_dir / "model.onnx", "-o", out, "--calib", user_dir / "calib.npz"]
    code, _out, err = run_cli(*args)
    assert code == 0, err
    assert (out / C_EXPORT_MARKER).is_file() and (out / "model.c").is_file()
    code, _out, err = run_cli(*args)
    assert refused(code, err, "--force")
    code, _out, err = run_cli(*args, "--force")
    assert code == 0, err
    for built in ("model_test", "model_cortex-m4.elf"):  # what its own Makefile builds there
        (out / built).write_bytes(b"\x7fELF")
    code, _out, err = run_cli(*args, "--force")
    assert code == 0, err
    (out / "added_by_user.txt").write_text("keep me\n")
    code, _out, err = run_cli(*args, "--force")
    assert refused(code, err, "added_by_user.txt")
    assert (out / "added_by_user.txt").read_text() == "keep me\n"
    assert not [p for p in os.listdir(user_dir) if p.startswith(".rankfold")]  # no staging left behind


def test_export_c_refuses_a_directory_holding_its_input(user_dir):
    before = digest(user_dir)
    code, _out, err = run_cli("export-c", user_dir / "model.onnx", "-o", user_dir, "--calib",
                              user_dir / "calib.npz", "--force")
    assert code == 2 and "Traceback" not in err
    assert digest(user_dir) == before


@pytest.mark.parametrize("outputs", [
    ("-o", "out.onnx", "--plan-out", "out.onnx"),
    ("-o", "out.onnx", "--report", "out.onnx"),
    ("-o", "out.onnx", "--report", "model.onnx"),
    ("-o", "out.onnx", "--plan-out", "calib.npz"),
    ("-o", "model.onnx"),
    ("-o", "./sub/../model.onnx"),
])
def test_compress_refuses_outputs_that_collide_before_any_work(user_dir, outputs):
    (user_dir / "sub").mkdir()
    before = digest(user_dir)
    started = time.perf_counter()
    code, _out, err = run_cli("compress", "model.onnx", "--calib", "calib.npz", "--max-params", "50%",
                              "--min-rank", "2", *outputs, "--force", cwd=user_dir)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert time.perf_counter() - started < 60  # refused up front, not after planning
    assert digest(user_dir) == before


def test_compress_never_overwrites_an_existing_file_without_force(user_dir):
    (user_dir / "out.onnx").write_bytes(b"the user's earlier result")
    before = digest(user_dir)
    args = ["compress", "model.onnx", "--calib", "calib.npz", "--keep", "0.5", "--min-rank", "2", "-o", "out.onnx"]
    code, _out, err = run_cli(*args, cwd=user_dir)
    assert refused(code, err, "--force")
    assert digest(user_dir) == before
    code, _out, err = run_cli(*args, "--force", cwd=user_dir)
    assert code == 0, err
    onnx.checker.check_model(onnx.load(user_dir / "out.onnx"))


def test_hard_links_count_as_the_same_file(user_dir):
    os.link(user_dir / "model.onnx", user_dir / "alias.onnx")
    before = digest(user_dir)
    code, _out, err = run_cli("compress", "model.onnx", "--keep", "0.5", "-o", "alias.onnx", "--force", cwd=user_dir)
    assert code == 2 and "input" in err
    assert digest(user_dir) == before


def _leftovers(directory, allowed):
    return sorted(set(os.listdir(directory)) - set(allowed))


def test_two_quantized_runs_on_one_output_never_mix(user_dir):
    """Each run writes under its own temporary name: both finish, and the output is one complete,
    checked model (they are deterministic, so either run's file is the same bytes)."""
    args = [sys.executable, "-m", "rankfold.cli", "compress", "model.onnx", "--calib", "calib.npz",
            "--max-weight-bytes", "30%", "--min-rank", "2", "--min-agreement", "0.3", "-o", "out.onnx", "--force",
            "-q"]
    procs = [subprocess.Popen(args, cwd=user_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1] for r in results]
    model = onnx.load(user_dir / "out.onnx")
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    assert _leftovers(user_dir, ["model.onnx", "calib.npz", "notes.txt", "out.onnx"]) == []


@pytest.mark.parametrize("delay", [1.0, 3.0, 6.0, 10.0])
def test_a_killed_compress_leaves_nothing_partial(user_dir, delay):
    """SIGKILL at several points of a quantized compress: afterwards the directory holds the inputs
    and, at most, a complete output; no temporary file, no half-written model."""
    before = digest(user_dir)
    proc = subprocess.Popen([sys.executable, "-m", "rankfold.cli", "compress", "model.onnx", "--calib", "calib.npz",
                             "--max-weight-bytes", "30%", "--min-rank", "2", "--min-agreement", "0.3", "-o",
                             "out.onnx", "--report", "r.json", "-q"], cwd=user_dir, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert {k: v for k, v in digest(user_dir).items() if k in before} == before
    extra = _leftovers(user_dir, ["model.onnx", "calib.npz", "notes.txt"])
    assert set(extra) <= {"out.onnx", "r.json"}, extra
    if "out.onnx" in extra:
        onnx.checker.check_model(onnx.load(user_dir / "out.onnx"))


@pytest.mark.parametrize("args", [
    ["eval", "m.onnx", "--data", "d.npz", "--runs", "0"],
    ["eval", "m.onnx", "--data", "d.npz", "--limit", "-10"],
    ["compress", "m.onnx", "-o", "o.onnx", "--min-agreement", "-1"],
    ["compress", "m.onnx", "-o", "o.onnx", "--min-agreement", "nan"],
    ["compress", "m.onnx", "-o", "o.onnx", "--min-agreement", "2"],
    ["compress", "m.onnx", "-o", "o.onnx", "--calib-limit", "-1"],
    ["compress", "m.onnx", "-o", "o.onnx", "--calib-limit", "0"],
    ["compress", "m.onnx", "-o", "o.onnx", "--min-rank", "x"],
    ["demo", "--epochs", "0"],
    ["pareto", "m.onnx", "--measure", "-2"],
    ["no-such-command"],
])
def test_bad_option_values_are_refused_in_one_line_before_anything_runs(tmp_path, args):
    """Found before any file is read (none of these exist) and before any work: one line, exit 2."""
    code, _out, err = run_cli(*args, cwd=tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert os.listdir(tmp_path) == []


def _huge_header_npz(path, x):
    """A valid .npz whose 'x' header claims 10^12 samples."""
    import io
    import zipfile

    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, x)
    raw = buffer.getvalue()
    header = np.lib.format.header_data_from_array_1_0(x)
    header["shape"] = (10**12, *x.shape[1:])
    fixed = io.BytesIO()
    np.lib.format.write_array_header_1_0(fixed, header)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", fixed.getvalue() + raw[len(fixed.getvalue()):])


@pytest.mark.parametrize("case", ["labels_out_of_range", "negative_labels", "nan_sample", "uint8", "complex",
                                  "huge_header"])
def test_eval_refuses_bad_data_in_one_line(user_dir, case):
    x = np.random.default_rng(1).standard_normal((20, 1, 12, 12)).astype(np.float32)
    y = np.arange(20) % 10
    path = user_dir / f"{case}.npz"
    if case == "labels_out_of_range":
        np.savez(path, x=x, y=y + 10)
    elif case == "negative_labels":
        np.savez(path, x=x, y=y - 5)
    elif case == "nan_sample":
        x[7, 0, 3, 3] = np.nan
        np.savez(path, x=x, y=y)
    elif case == "uint8":
        np.savez(path, x=(x * 40 + 128).clip(0, 255).astype(np.uint8), y=y)
    elif case == "complex":
        np.savez(path, x=x.astype(np.complex64), y=y)
    else:
        _huge_header_npz(path, x)
    code, _out, err = run_cli("eval", user_dir / "model.onnx", "--data", path, "--no-latency")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert str(path) in err or (case == "labels_out_of_range" and "scores 10 classes" in err)


TOMLS = {
    "cycles_table": 'name="t"\nlatency="model"\nclock_hz=1e6\ncycles_per_mac=3\n',
    "methods_int": 'name="t"\nmethods=5\n',
    "methods_string": 'name="t"\nmethods="svd"\n',
    "methods_empty": 'name="t"\nmethods=[]\n',
    "bits_16": 'name="t"\nweight_bits=[16]\n',
    "clock_nan": 'name="t"\nlatency="model"\nclock_hz=nan\n'
                 '[cycles_per_mac]\nconv=1\npointwise=1\ndepthwise=1\nlinear=1\n',
    "not_toml": 'name = \n',
}


@pytest.mark.parametrize("case", sorted(TOMLS))
def test_bad_target_files_are_refused_in_one_line(user_dir, case):
    (user_dir / "t.toml").write_text(TOMLS[case])
    code, _out, err = run_cli("compress", "model.onnx", "--calib", "calib.npz", "--target", "t.toml", "-o", "o.onnx",
                              cwd=user_dir)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "t.toml" in err and not (user_dir / "o.onnx").exists()


def test_no_traceback_for_cases_that_used_to_crash(user_dir):
    """Cases of issue 20 that ended in a traceback: each is one line and exit 2 now, or works."""
    class NoLayers(nn.Module):
        def forward(self, x):
            return torch.relu(x).flatten(1)

    rankfold.export_onnx(NoLayers(), user_dir / "nolayers.onnx", example_input=torch.zeros(1, 1, 12, 12))
    np.savez(user_dir / "c28.npz", x=np.zeros((64, 1, 28, 28), np.float32))
    for args in (["pareto", "model.onnx", "--calib", "calib.npz", "--points", "abc"],
                 ["pareto", "model.onnx", "--calib", "calib.npz", "--json", "/nonexistent/f.json"],
                 ["compress", "nolayers.onnx", "--calib", "calib.npz", "--keep", "0.5", "-o", "x.onnx"],
                 ["export-c", "model.onnx", "-o", "cdir", "--calib", "c28.npz"],
                 ["compress", "model.onnx", "--max-params", "50%", "-o", "x.onnx"]):
        code, _out, err = run_cli(*args, cwd=user_dir)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (args, err)
    assert not (user_dir / "x.onnx").exists() and not (user_dir / "cdir").exists()
    code, out, err = run_cli("compress", "model.onnx", "--max-params", "50%", "--min-rank", "2", "-o", "x.onnx",
                             "--no-check", cwd=user_dir)  # data-free planning (a forward hook broke it)
    assert code == 0 and "not run (--no-check)" in out, err


NUMERIC_OPTIONS = {
    "compress": ["--keep", "--min-rank", "--min-agreement", "--max-output-error", "--calib-limit", "--max-params",
                 "--max-weight-bytes", "--max-latency", "--max-ram", "--max-macs", "--bits", "--target", "--method",
                 "--max-memory",
                 "--observer"],
    "eval": ["--limit", "--runs"],
    "pareto": ["--points", "--measure", "--limit", "--target", "--max-memory"],
    "run-c": ["--limit", "--qemu-samples", "--qemu"],
    "apply": ["--calib-limit", "--min-agreement", "--max-output-error", "--observer", "--max-memory"],
    "export-c": ["--target", "--calib-limit"],
    "demo": ["--epochs", "--target", "--max-weight-bytes"],
}


def test_no_option_value_makes_a_traceback(tmp_path):
    """Generated values for every option of every command (the files named do not exist): the CLI
    answers with exit code 2 or a usage error, never with an exception."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from rankfold.cli import main

    values = st.one_of(st.text(max_size=12), st.floats(allow_nan=True, allow_infinity=True).map(str),
                       st.integers(-10**12, 10**12).map(str), st.sampled_from(["0", "-1", "nan", "inf", "1e400",
                                                                               "10%", "-5%", "3MB", "", " "]))
    positional = {"compress": ["missing.onnx", "-o", str(tmp_path / "o.onnx")], "eval": ["missing.onnx", "--data",
                  "missing.npz"], "pareto": ["missing.onnx"], "run-c": ["missing_dir", "--data", "missing.npz"],
                  "apply": ["missing.json", "missing.onnx", "-o", str(tmp_path / "o.onnx")],
                  "export-c": ["missing.onnx", "-o", str(tmp_path / "cdir")],
                  # a directory that cannot be made: any good value still ends before the training
                  "demo": ["--out", "/proc/rankfold-cannot-be-here"]}

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(command=st.sampled_from(sorted(NUMERIC_OPTIONS)), data=st.data())
    def check(command, data):
        option = data.draw(st.sampled_from(NUMERIC_OPTIONS[command]))
        value = data.draw(values)
        argv = [command, *positional[command], f"{option}={value}"]
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse: a usage error, one line
            code = exc.code
        assert code == 2, (argv, code)

    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        check()
    assert not (tmp_path / "o.onnx").exists()


@pytest.fixture()
def small_mount(tmp_path):
    """A 4 kB tmpfs (a full disk for anything rankfold writes) and a read-only one; root only."""
    full, read_only = tmp_path / "full", tmp_path / "ro"
    full.mkdir(), read_only.mkdir()
    mounted = []
    try:
        for where, options in ((full, "size=4k"), (read_only, "ro,size=4k")):
            if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                              capture_output=True).returncode != 0:
                pytest.skip("cannot mount a tmpfs here (needs root)")
            mounted.append(where)
        yield full, read_only
    finally:
        for where in mounted:
            subprocess.run(["umount", str(where)], capture_output=True)


def test_a_full_disk_or_a_read_only_directory_is_one_line_and_leaves_nothing(user_dir, small_mount):
    full, read_only = small_mount
    cases = [
        (["compress", "model.onnx", "--calib", "calib.npz", "--keep", "0.5", "--min-rank", "2",
          "-o", full / "out.onnx"], "No space left"),
        (["compress", "model.onnx", "--calib", "calib.npz", "--max-weight-bytes", "40%", "--min-rank", "2",
          "-o", full / "out.onnx"], "No space left"),
        (["export-c", "model.onnx", "--calib", "calib.npz", "-o", full / "cdir"], "No space left"),
        (["compress", "model.onnx", "--calib", "calib.npz", "--keep", "0.5", "-o", read_only / "out.onnx"],
         "not writable"),
        (["export-c", "model.onnx", "--calib", "calib.npz", "-o", read_only / "cdir"], "not writable"),
        (["compress", "model.onnx", "--calib", "calib.npz", "--keep", "0.5", "-o", user_dir], "is a directory"),
        (["export-c", "model.onnx", "--calib", "calib.npz", "-o", user_dir / "notes.txt"], "notes.txt"),
    ]
    before = digest(user_dir)
    for args, message in cases:
        code, _out, err = run_cli(*args, "-q", cwd=user_dir)
        assert refused(code, err, message), (args, err)
        assert os.listdir(full) == [] and os.listdir(read_only) == [], args
    assert digest(user_dir) == before


def test_open_height_and_width_stay_open_through_compression(tmp_path):
    """A model exported with symbolic H and W: the compressed file (float or QDQ) accepts other
    sizes, as the original does (it used to come out fixed at the calibration size)."""
    import onnxruntime as ort

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    torch.onnx.export(model, (torch.randn(1, 1, 12, 12),), str(tmp_path / "m.onnx"), dynamo=False,
                      input_names=["image"], output_names=["scores"],
                      dynamic_axes={"image": {0: "n", 2: "h", 3: "w"}, "scores": {0: "n"}})
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).standard_normal((96, 1, 12, 12)).astype(np.float32))
    for extra in (["--keep", "0.5"], ["--max-weight-bytes", "40%"]):
        code, _out, err = run_cli("compress", "m.onnx", "--calib", "c.npz", "--min-rank", "2", "-o", "o.onnx",
                                  "--force", "-q", *extra, cwd=tmp_path)
        assert code == 0, err
        session = ort.InferenceSession(str(tmp_path / "o.onnx"), providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].shape[2:] == ["h", "w"]
        assert session.run(None, {"image": np.zeros((2, 1, 20, 16), np.float32)})[0].shape == (2, 10)


def test_a_model_whose_output_is_named_by_a_number_compresses(tmp_path):
    """torch.onnx.export without output_names names the output "13", which TorchScript refuses as
    a name when rankfold exports the result: it used to end in `RuntimeError: Invalid name: '13'`."""
    torch.onnx.export(tiny_classifier(), (torch.randn(1, 1, 12, 12),), str(tmp_path / "m.onnx"), dynamo=False)
    output = onnx.load(tmp_path / "m.onnx").graph.output[0].name
    assert output.isdigit()
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).standard_normal((96, 1, 12, 12)).astype(np.float32))
    for extra in (["--keep", "0.5"], ["--max-weight-bytes", "40%"]):
        code, _out, err = run_cli("compress", "m.onnx", "--calib", "c.npz", "--min-rank", "2", "-o", "o.onnx",
                                  "--force", "-q", *extra, cwd=tmp_path)
        assert code == 0, err
        assert [o.name for o in onnx.load(tmp_path / "o.onnx").graph.output] == [output]
