"""Malformed files from a careless user or a hand edit (issue 20): an edited plan is checked field
by field and its edited layers recounted; generated plan JSON, target TOML and .npz files end in
one RankfoldError line, never in another exception."""

import io
import json
import warnings
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rankfold
from rankfold.data import load_npz
from rankfold.errors import RankfoldError
from rankfold.planner.plan import load_plan
from rankfold.target import load_target
from tests.helpers import run_cli, tiny_classifier

SETTINGS = settings(max_examples=200, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """A model, its calibration data and a plan made for it."""
    root = tmp_path_factory.mktemp("plans")
    x = np.random.default_rng(0).standard_normal((96, 1, 12, 12)).astype(np.float32)
    rankfold.export_onnx(tiny_classifier(), root / "m.onnx", example_input=torch.from_numpy(x[:1]))
    np.savez(root / "calib.npz", x=x)
    code, _out, err = run_cli("compress", "m.onnx", "--calib", "calib.npz", "--max-params", "60%", "--min-rank", "2",
                              "-o", "p.onnx", "--plan-out", "plan.json", "-q", cwd=root)
    assert code == 0, err
    return root


def edited(planned, tmp_path, edit):
    plan = json.loads((planned / "plan.json").read_text())
    edit(plan)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(plan))
    return path


def first_factorized(plan) -> dict:
    return next(layer for layer in plan["layers"] if layer["method"] != "none")


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["layers"].append(dict(p["layers"][0])), "listed twice"),
    (lambda p: first_factorized(p).update(ranks=first_factorized(p)["ranks"] + [3]), "positive integer rank"),
    (lambda p: first_factorized(p).update(ranks=[0] * len(first_factorized(p)["ranks"])), "positive integer rank"),
    (lambda p: first_factorized(p).update(method=["svd"]), "method must be a string"),
    (lambda p: p["layers"][0].update(bits=8.0), "bits must be an integer"),
    (lambda p: p["layers"][0].update(bits=True), "bits must be an integer"),
    (lambda p: p["layers"][0].update(params="12"), "params must be an integer"),
    (lambda p: p.update(est_loss=float("nan")), "est_loss must be finite"),
    (lambda p: p.update(limits={"params": -1}), "limit 'params'"),
    (lambda p: p.update(layers={"a": 1}), "layers must be a list"),
    (lambda p: p["layers"][0].update(method="none", ranks=[4]), "takes no ranks"),
    (lambda p: p["layers"][0].update(weight_scales="row"), "weight_scales must be one of channel, tensor"),
    (lambda p: p["layers"][0].update(weight_scales=1), "weight_scales must be a string"),
])
def test_an_edited_plan_with_a_bad_field_is_refused_in_one_line(planned, tmp_path, edit, message):
    path = edited(planned, tmp_path, edit)
    code, _out, err = run_cli("apply", path, "m.onnx", "--calib", "calib.npz", "-o", tmp_path / "x.onnx",
                              cwd=planned)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "x.onnx").exists()


def test_an_edited_layer_is_recounted_not_shown_with_the_planned_numbers(planned, tmp_path):
    plan = json.loads((planned / "plan.json").read_text())
    layer = first_factorized(plan)
    layer["ranks"] = [max(2, r // 2) for r in layer["ranks"]]
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(plan))
    code, out, err = run_cli("apply", path, "m.onnx", "--calib", "calib.npz", "-o", tmp_path / "x.onnx",
                             "--report", tmp_path / "r.json", cwd=planned)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    applied = next(r for r in report["layers"] if r["name"] == layer["name"])
    shown = next(r for r in report["plan"]["layers"] if r["name"] == layer["name"])
    assert shown["params"] == applied["params_after"] != layer["params"]
    assert report["plan"]["after"]["params"] == plan["after"]["params"] + shown["params"] - layer["params"]
    assert "edited after planning" in shown["note"] and "edited after planning" in out


def test_generated_plan_files_are_refused_cleanly(planned, tmp_path):
    base = json.loads((planned / "plan.json").read_text())
    junk = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                     st.text(max_size=6), st.lists(st.integers(-3, 40), max_size=3), st.dictionaries(
                         st.text(max_size=4), st.integers(), max_size=2))
    top_keys = st.sampled_from(sorted(base))
    layer_keys = st.sampled_from(sorted(base["layers"][0]))

    @SETTINGS
    @given(where=st.integers(0, 2), key=st.one_of(top_keys, layer_keys), value=junk,
           index=st.integers(0, len(base["layers"]) - 1))
    def check(where, key, value, index):
        plan = json.loads(json.dumps(base))
        if where == 0 and key in plan:
            plan[key] = value
        elif where == 1 and key in plan["layers"][index]:
            plan["layers"][index][key] = value
        else:
            plan["layers"][index].pop(key, None) if key in plan["layers"][index] else plan.pop(key, None)
        path = tmp_path / "plan.json"
        path.write_text(json.dumps(plan))
        try:
            load_plan(path)
        except RankfoldError as exc:
            assert "\n" not in str(exc)

    check()


def test_generated_target_files_are_refused_cleanly(tmp_path):
    fields = ["name", "flash_bytes", "ram_bytes", "clock_hz", "cycles_per_mac", "latency", "methods", "weight_bits",
              "activation_bits", "runtime", "reduce_range", "int8_note", "description"]
    toml_values = st.one_of(st.just('"x"'), st.just("nan"), st.just("inf"), st.just("-1"), st.just("0"),
                            st.just("3"), st.just("1.5"), st.just("true"), st.just("[]"), st.just("[4]"),
                            st.just("[16]"), st.just('["svd"]'), st.just('["cp", 2]'), st.just("{a = 1}"),
                            st.just('"auto"'), st.just('"measured"'), st.just("[[1]]"), st.text(max_size=8))

    @SETTINGS
    @given(assignments=st.dictionaries(st.sampled_from(fields), toml_values, min_size=1, max_size=5))
    def check(assignments):
        path = tmp_path / "t.toml"
        path.write_text('name = "mine"\n' + "".join(f"{k} = {v}\n" for k, v in assignments.items() if k != "name"))
        try:
            load_target(str(path))
        except RankfoldError as exc:
            assert "\n" not in str(exc)

    check()


def npz_bytes(arrays: dict) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_generated_npz_files_are_refused_cleanly(tmp_path):
    dtypes = st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.uint8, np.complex64, np.bool_])
    shapes = st.lists(st.integers(0, 3), min_size=0, max_size=4).map(tuple)

    @SETTINGS
    @given(x_dtype=dtypes, x_shape=shapes, y_dtype=dtypes, y_shape=shapes, with_y=st.booleans(),
           special=st.sampled_from([None, np.nan, np.inf, -1, 1e30]), cut=st.integers(0, 400),
           damage=st.sampled_from(["none", "truncate", "garbage", "not-zip"]))
    def check(x_dtype, x_shape, y_dtype, y_shape, with_y, special, cut, damage):
        x = np.ones(x_shape, dtype=x_dtype)
        if special is not None and x.size:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # 1e30 into float16 or int: overflow is the point
                try:
                    x.flat[0] = special
                except (OverflowError, ValueError):
                    pass
        arrays = {"x": x, **({"y": np.zeros(y_shape, dtype=y_dtype)} if with_y else {})}
        data = npz_bytes(arrays)
        if damage == "truncate":
            data = data[: max(1, len(data) - cut)]
        elif damage == "garbage":
            data = data[:cut] + bytes(range(256)) + data[cut + 256:]
        elif damage == "not-zip":
            data = b"\x93NUMPY" + data[6:]
        path = tmp_path / "d.npz"
        path.write_bytes(data)
        for need_labels in (True, False):
            try:
                load_npz(path, need_labels=need_labels)
            except RankfoldError as exc:
                assert "\n" not in str(exc)

    check()


def test_an_npz_header_that_lies_about_its_size_is_refused(tmp_path):
    """A zip entry whose .npy header claims far more samples than the file holds."""
    path = tmp_path / "big.npz"
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000, 1, 4, 4), }"
    header += b" " * (118 - len(header)) + b"\n"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\0" * 64)
    with pytest.raises(RankfoldError):
        load_npz(path, need_labels=False)


def test_a_network_torch_cannot_export_is_one_clear_error_and_leaves_nothing(tmp_path):
    class Unexportable(torch.nn.Module):
        def forward(self, x):
            return torch.where(torch.isneginf(x), 0.0, x)  # aten::isneginf has no ONNX translation

    with pytest.raises(rankfold.RankfoldError, match=r"cannot be written as ONNX \(opset \d+\): torch.onnx says"):
        rankfold.export_onnx(Unexportable(), tmp_path / "out.onnx", example_input=torch.zeros(2, 3))
    assert list(tmp_path.iterdir()) == []
