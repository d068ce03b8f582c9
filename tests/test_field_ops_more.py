"""The ONNX ops beyond the CNN core (rankfold/frontends/onnx_ops_field.py), each in a small graph
against onnxruntime, and through the export that writes results; and graphs older than opset 11,
read after onnx's version converter."""

import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import rankfold
from rankfold.cli import main
from rankfold.export.onnx import export_onnx

RNG = np.random.default_rng(0)
X_SHAPE = [2, 4, 6, 6]


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


C4 = _init("c4", RNG.normal(size=(4, 1, 1)).astype(np.float32))
C4B = _init("c4b", RNG.normal(size=(1, 4, 1, 1)).astype(np.float32))
INT3 = _init("int3", np.array(3, np.int64))


def _cast(src, dst):
    return helper.make_node("Cast", [src], [dst], to=TensorProto.FLOAT)


# name -> (nodes from x to y, initializers, opset[, y's shape where shape inference leaves it open]); y is float
CASES = {
    "layer-norm-over-channels-and-space-with-a-gain-per-channel": (
        [helper.make_node("LayerNormalization", ["x", "c4", "c4"], ["y"], axis=1)], [C4], 17),
    "sum-max-min-mean": (
        [
            helper.make_node("Sum", ["x", "c4", "x"], ["s"]),
            helper.make_node("Max", ["s", "c4b"], ["m"]),
            helper.make_node("Min", ["m", "c4", "x"], ["n"]),
            helper.make_node("Mean", ["n", "c4b"], ["y"]),
        ],
        [C4, C4B],
        17,
    ),
    "comparisons-logic": (
        [
            helper.make_node("Greater", ["x", "c4"], ["g"]),
            helper.make_node("Less", ["x", "c4b"], ["l"]),
            helper.make_node("GreaterOrEqual", ["x", "c4b"], ["ge"]),
            helper.make_node("LessOrEqual", ["x", "c4"], ["le"]),
            helper.make_node("And", ["g", "l"], ["a"]),
            helper.make_node("Or", ["a", "ge"], ["o"]),
            helper.make_node("Xor", ["o", "le"], ["b"]),
            _cast("b", "y"),
        ],
        [C4, C4B],
        17,
    ),
    "mod": (
        [
            helper.make_node("Mul", ["x", "ten"], ["x10"]),
            helper.make_node("Cast", ["x10"], ["xi"], to=TensorProto.INT64),
            helper.make_node("Mod", ["xi", "int3"], ["r"]),
            _cast("r", "rf"),
            helper.make_node("Mod", ["x", "c4"], ["f"], fmod=1),
            helper.make_node("Add", ["rf", "f"], ["y"]),
        ],
        [INT3, _init("ten", np.array(10.0, np.float32)), C4],
        17,
    ),
    "trigonometry": (
        [
            helper.make_node("Tanh", ["x"], ["t"]),
            helper.make_node("Mul", ["t", "half"], ["h"]),
            helper.make_node("Asin", ["h"], ["a"]),
            helper.make_node("Acos", ["h"], ["b"]),
            helper.make_node("Sin", ["a"], ["s"]),
            helper.make_node("Cos", ["b"], ["c"]),
            helper.make_node("Tan", ["h"], ["tn"]),
            helper.make_node("Atan", ["x"], ["at"]),
            helper.make_node("Sinh", ["h"], ["sh"]),
            helper.make_node("Cosh", ["h"], ["ch"]),
            helper.make_node("Sum", ["s", "c", "tn", "at", "sh", "ch"], ["y"]),
        ],
        [_init("half", np.array(0.5, np.float32))],
        17,
    ),
    "activations": (
        [
            helper.make_node("Softplus", ["x"], ["a"]),
            helper.make_node("Softsign", ["x"], ["b"]),
            helper.make_node("Mish", ["x"], ["c"]),
            helper.make_node("Selu", ["x"], ["d"]),
            helper.make_node("Celu", ["x"], ["e"], alpha=0.7),
            helper.make_node("ThresholdedRelu", ["x"], ["f"], alpha=0.3),
            helper.make_node("Shrink", ["x"], ["g"], bias=0.1, lambd=0.4),
            helper.make_node("Sign", ["x"], ["h"]),
            helper.make_node("Mul", ["x", "ten"], ["x10"]),
            helper.make_node("Round", ["x10"], ["i"]),
            helper.make_node("Concat", ["a", "b", "c", "d", "e", "f", "g", "h", "i"], ["y"], axis=1),
        ],
        [_init("ten", np.array(2.5, np.float32))],
        18,
    ),
    "nan-inf-castlike": (
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Reciprocal", ["r"], ["inv"]),
            helper.make_node("IsInf", ["inv"], ["i"]),
            helper.make_node("Sqrt", ["x"], ["sq"]),
            helper.make_node("IsNaN", ["sq"], ["n"]),
            helper.make_node("Or", ["i", "n"], ["o"]),
            helper.make_node("CastLike", ["o", "int3"], ["oi"]),
            _cast("oi", "y"),
        ],
        [INT3],
        17,
    ),
    "reductions-attribute-axes": (
        [
            helper.make_node("Abs", ["x"], ["ax"]),
            helper.make_node("Add", ["ax", "one"], ["p"]),
            *[
                helper.make_node(op, ["p"], [op], axes=[1, 3], keepdims=keep)
                for op, keep in [
                    ("ReduceMin", 0),
                    ("ReduceL1", 0),
                    ("ReduceL2", 0),
                    ("ReduceSumSquare", 0),
                    ("ReduceLogSum", 0),
                    ("ReduceLogSumExp", 0),
                    ("ReduceProd", 0),
                ]
            ],
            helper.make_node(
                "Concat",
                [
                    "ReduceMin",
                    "ReduceL1",
                    "ReduceL2",
                    "ReduceSumSquare",
                    "ReduceLogSum",
                    "ReduceLogSumExp",
                    "ReduceProd",
                ],
                ["y"],
                axis=1,
            ),
        ],
        [_init("one", np.array(1.0, np.float32))],
        17,
    ),
    "reductions-input-axes": (
        [
            helper.make_node("Abs", ["x"], ["p"]),
            *[helper.make_node(op, ["p", "axes"], [op], keepdims=1) for op in ("ReduceMin", "ReduceL2", "ReduceProd")],
            helper.make_node("Concat", ["ReduceMin", "ReduceL2", "ReduceProd"], ["y"], axis=2),
        ],
        [_init("axes", np.array([2], np.int64))],
        18,
    ),
    "argmax-hardmax-onehot": (
        [
            helper.make_node("Round", ["x"], ["r"]),
            helper.make_node("ArgMax", ["x"], ["a"], axis=1, keepdims=1),
            helper.make_node("ArgMin", ["r"], ["b"], axis=2, keepdims=0, select_last_index=1),
            helper.make_node("Hardmax", ["x"], ["h"], axis=1),
            helper.make_node("ArgMax", ["x"], ["c"], axis=1, keepdims=0),
            helper.make_node("OneHot", ["c", "depth", "values"], ["oh"], axis=1),
            _cast("a", "af"),
            _cast("b", "bf"),
            helper.make_node("Unsqueeze", ["bf", "ax2"], ["bu"]),
            helper.make_node("Concat", ["af", "h", "oh"], ["hh"], axis=1),
            helper.make_node("ReduceSum", ["hh", "ax23"], ["hs"], keepdims=1),
            helper.make_node("ReduceSum", ["bu", "ax23"], ["bs"], keepdims=1),
            helper.make_node("Concat", ["hs", "bs"], ["y"], axis=1),
        ],
        [
            _init("depth", np.array(4, np.int64)),
            _init("values", np.array([-1.0, 2.0], np.float32)),
            _init("ax2", np.array([1], np.int64)),
            _init("ax23", np.array([2, 3], np.int64)),
        ],
        17,
    ),
    "cumsum-topk": (
        [
            helper.make_node("CumSum", ["x", "axis"], ["c"], exclusive=1, reverse=1),
            helper.make_node("TopK", ["c", "k"], ["v", "i"], axis=3),
            _cast("i", "if"),
            helper.make_node("Concat", ["v", "if"], ["y"], axis=3),
        ],
        [_init("axis", np.array(3, np.int64)), _init("k", np.array([3], np.int64))],
        17,
    ),
    "lrn": (
        [
            helper.make_node("LRN", ["x"], ["a"], size=3, alpha=0.3, beta=0.7, bias=1.5),  # onnxruntime: odd sizes
            helper.make_node("LRN", ["x"], ["b"], size=5, alpha=0.5),
            helper.make_node("Concat", ["a", "b"], ["y"], axis=1),
        ],
        [],
        17,
    ),
    "instance-group-lp-norms": (
        [
            helper.make_node("InstanceNormalization", ["x", "s4", "b4"], ["a"], epsilon=1e-3),
            helper.make_node("GroupNormalization", ["x", "s4", "b4"], ["b"], num_groups=2),
            helper.make_node("LpNormalization", ["x"], ["c"], axis=1, p=2),
            helper.make_node("LpNormalization", ["x"], ["d"], axis=-1, p=1),
            helper.make_node("Concat", ["a", "b", "c", "d"], ["y"], axis=1),
        ],
        [_init("s4", RNG.normal(size=4).astype(np.float32)), _init("b4", RNG.normal(size=4).astype(np.float32))],
        21,
        [2, 16, 6, 6],
    ),
    "depth-space-trilu-einsum": (
        [
            helper.make_node("DepthToSpace", ["x"], ["d"], blocksize=2, mode="DCR"),
            helper.make_node("DepthToSpace", ["x"], ["c"], blocksize=2, mode="CRD"),
            helper.make_node("Add", ["d", "c"], ["dc"]),
            helper.make_node("SpaceToDepth", ["dc"], ["s"], blocksize=2),
            helper.make_node("Trilu", ["s", "kk"], ["t"], upper=0),
            helper.make_node("Einsum", ["t", "w"], ["y"], equation="nchw, dc -> ndhw"),
        ],
        [_init("kk", np.array(1, np.int64)), _init("w", RNG.normal(size=(3, 4)).astype(np.float32))],
        17,
    ),
    "gather-scatter-elements": (
        [
            helper.make_node("GatherElements", ["x", "gi"], ["g"], axis=2),
            helper.make_node("ScatterElements", ["g", "si", "g"], ["s"], axis=3),
            helper.make_node("ScatterElements", ["s", "si", "g"], ["y"], axis=3, reduction="add"),
        ],
        [
            _init("gi", RNG.integers(-6, 6, size=(2, 4, 3, 6)).astype(np.int64)),
            _init("si", np.tile(np.array([5, 0, -3, 1, 2, 4], np.int64), (2, 4, 3, 1))),
        ],
        18,
    ),
    "gather-scatter-nd": (
        [
            helper.make_node("GatherND", ["x", "ni"], ["g"]),
            helper.make_node("GatherND", ["x", "bi"], ["b"], batch_dims=1),
            helper.make_node("ScatterND", ["x", "si", "upd"], ["s"]),
            helper.make_node("ReduceSum", ["g"], ["gs"], keepdims=0),
            helper.make_node("ReduceSum", ["b"], ["bs"], keepdims=0),
            helper.make_node("Add", ["gs", "bs"], ["gb"]),
            helper.make_node("Add", ["s", "gb"], ["y"]),
        ],
        [
            _init("ni", np.array([[1, -1], [0, 2], [1, 0]], np.int64)),
            _init("bi", np.array([[[3], [0]], [[1], [2]]], np.int64)),
            _init("si", np.array([[0, 3], [1, 1]], np.int64)),
            _init("upd", RNG.normal(size=(2, 6, 6)).astype(np.float32)),
        ],
        17,
    ),
    "average-pool-asymmetric-pads": (
        [
            helper.make_node("AveragePool", ["x"], ["a"], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1]),
            helper.make_node(
                "AveragePool", ["x"], ["b"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 2, 1], ceil_mode=1
            ),
            helper.make_node("Concat", ["a", "b"], ["y"], axis=2),
        ],
        [],
        17,
    ),
    "pad-modes-on-trailing-axes": (  # silero VAD reflects the last axis of a 4-D tensor
        [
            helper.make_node("Pad", ["x", "p1"], ["a"], mode="reflect"),
            helper.make_node("Pad", ["x", "p2"], ["b"], mode="edge"),
            helper.make_node("Pad", ["x", "p3"], ["c"], mode="wrap"),
            helper.make_node("Flatten", ["a"], ["sa"]),
            helper.make_node("Flatten", ["b"], ["sb"]),
            helper.make_node("Flatten", ["c"], ["sc"]),
            helper.make_node("Concat", ["sa", "sb", "sc"], ["y"], axis=1),
        ],
        [
            _init("p1", np.array([0, 0, 0, 2, 0, 0, 0, 3], np.int64)),
            _init("p2", np.array([0, 0, 1, 1, 0, 0, 2, 0], np.int64)),
            _init("p3", np.array([0, 1, 1, 1, 0, 2, 1, 1], np.int64)),
        ],
        19,
    ),
    "resize-nearest-modes": (  # every coordinate mode and rounding as onnxruntime computes them
        [
            helper.make_node("Resize", ["x", "", "s1"], ["a"], mode="nearest", nearest_mode="round_prefer_ceil"),
            helper.make_node(
                "Resize", ["x", "", "s2"], ["b"], mode="nearest", coordinate_transformation_mode="align_corners"
            ),
            helper.make_node(
                "Resize", ["x", "", "s1"], ["c"], mode="nearest", coordinate_transformation_mode="tf_half_pixel_for_nn",
                nearest_mode="ceil",
            ),
            helper.make_node(
                "Resize", ["x", "", "s2"], ["d"], mode="nearest", coordinate_transformation_mode="asymmetric",
                nearest_mode="round_prefer_floor",
            ),
            helper.make_node("Resize", ["x", "", "s3"], ["e"], mode="nearest"),
            *[helper.make_node("Flatten", [v], [v + "f"]) for v in "abcde"],
            helper.make_node("Concat", [v + "f" for v in "abcde"], ["y"], axis=1),
        ],
        [
            _init("s1", np.array([1, 1, 1.6, 2.4], np.float32)),
            _init("s2", np.array([1, 1, 0.5, 3], np.float32)),
            _init("s3", np.array([1, 1, 3, 1], np.float32)),
        ],
        17,
    ),
    "grid-sample": (  # deformable attention (RT-DETR) and spatial transformers sample so
        [
            helper.make_node("GridSample", ["x", "grid"], ["a"]),
            helper.make_node("GridSample", ["x", "grid"], ["b"], mode="nearest", padding_mode="border",
                             align_corners=1),
            helper.make_node("GridSample", ["x", "grid"], ["c"], mode="bicubic", padding_mode="reflection"),
            helper.make_node("Concat", ["a", "b", "c"], ["y"], axis=1),
        ],
        [_init("grid", RNG.uniform(-1.2, 1.2, size=(2, 5, 7, 2)).astype(np.float32))],
        16,
    ),
    "eyelike": (
        [
            helper.make_node("Reshape", ["x", "shape"], ["r"]),
            helper.make_node("EyeLike", ["r"], ["e"], k=3),
            helper.make_node("Add", ["r", "e"], ["y"]),
        ],
        [_init("shape", np.array([8, 36], np.int64))],
        17,
    ),
    "resize-linear": (
        [
            helper.make_node("Resize", ["x", "", "sc"], ["a"], mode="linear"),
            helper.make_node(
                "Resize", ["x", "", "", "sz"], ["b"], mode="linear", coordinate_transformation_mode="align_corners"
            ),
            helper.make_node(
                "Resize", ["b", "", "", "sz"], ["c"], mode="linear", coordinate_transformation_mode="pytorch_half_pixel"
            ),
            helper.make_node(
                "Resize", ["x", "", "sc"], ["d"], mode="linear", coordinate_transformation_mode="asymmetric"
            ),
            helper.make_node(
                "Resize", ["d", "", "", "sz9"], ["e"], mode="linear", coordinate_transformation_mode="asymmetric"
            ),
            helper.make_node(
                "Resize", ["e", "", "", "sz"], ["f"], mode="linear", coordinate_transformation_mode="asymmetric"
            ),
            helper.make_node("Resize", ["x", "", "sc"], ["g"], mode="cubic"),
            helper.make_node(
                "Resize", ["x", "", "", "sz"], ["h"], mode="cubic", coordinate_transformation_mode="align_corners"
            ),
            helper.make_node("Sum", ["a", "c", "f", "g", "h"], ["y"]),
        ],
        [
            _init("sc", np.array([1, 1, 2, 2], np.float32)),
            _init("sz", np.array([2, 4, 12, 12], np.int64)),
            _init("sz9", np.array([2, 4, 9, 7], np.int64)),
        ],
        17,
    ),
}


# A range over a size read from the input's shape, its bounds Constant nodes (as torch's exporter
# writes a BERT's position ids): all Python ints once folded, traced again on export.
CASES["range-of-a-size"] = (
    [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Constant", [], ["last"], value=_init("last_v", np.array(3, np.int64))),
        helper.make_node("Gather", ["shape", "last"], ["width"], axis=0),
        helper.make_node("Constant", [], ["start"], value=_init("start_v", np.array(0, np.int64))),
        helper.make_node("Constant", [], ["step"], value=_init("step_v", np.array(1, np.int64))),
        helper.make_node("Range", ["start", "width", "step"], ["positions"]),
        _cast("positions", "offsets"),
        helper.make_node("Add", ["x", "offsets"], ["y"]),
    ],
    [],
    17,
)


# A range over the batch size (as a BERT export indexes its flattened mask by sample): an open
# batch, so it must stay a Range of the batch in the export (`open_batch` below).
CASES["range-of-the-batch"] = (
    [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Constant", [], ["first"], value=_init("first_v", np.array(0, np.int64))),
        helper.make_node("Gather", ["shape", "first"], ["batch"], axis=0),
        helper.make_node("Constant", [], ["start"], value=_init("start_v", np.array(0, np.int64))),
        helper.make_node("Constant", [], ["step"], value=_init("step_v", np.array(1, np.int64))),
        helper.make_node("Range", ["start", "batch", "step"], ["samples"]),
        _cast("samples", "offsets"),
        helper.make_node("Constant", [], ["column"], value=_init("column_v", np.array([-1, 1, 1, 1], np.int64))),
        helper.make_node("Reshape", ["offsets", "column"], ["offset"]),
        helper.make_node("Add", ["x", "offset"], ["y"]),
    ],
    [],
    17,
)


def _case_file(tmp_path, name, batch=X_SHAPE[0]):
    nodes, inits, opset, *shape = CASES[name]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, *X_SHAPE[1:]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape[0] if shape else None)],
        initializer=inits,
    )
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("name", sorted(CASES))
def test_field_ops_match_onnxruntime_and_export(tmp_path, name):
    path = _case_file(tmp_path, name)
    x = RNG.normal(size=X_SHAPE).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x})[0]
    module = rankfold.load_onnx(path)
    got = module(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    with warnings.catch_warnings():  # the written form of a result: the TorchScript exporter, checked in onnxruntime
        warnings.simplefilter("ignore")
        export_onnx(module, tmp_path / "written.onnx", example_input=torch.from_numpy(x), verify=True)


def test_a_range_over_the_batch_size_stays_open_in_the_export(tmp_path):
    path = _case_file(tmp_path, "range-of-the-batch", batch="N")
    x = RNG.normal(size=X_SHAPE).astype(np.float32)
    module = rankfold.load_onnx(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(module, tmp_path / "written.onnx", example_input=torch.from_numpy(x), verify=True)
    session = ort.InferenceSession(str(tmp_path / "written.onnx"), providers=["CPUExecutionProvider"])
    three = np.concatenate([x, x[:1]])
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: three})[0],
                               three + np.arange(3, dtype=np.float32).reshape(-1, 1, 1, 1), rtol=1e-6)


def _opset9_model(tmp_path):
    """A Caffe2-era graph: opset 9, IR 3 (initializers listed as inputs too), LRN, Sum, Upsample,
    opset-9 BatchNormalization, Dropout and Gemm."""
    w = RNG.normal(size=(8, 3, 3, 3)).astype(np.float32) * 0.3
    inits = {
        "w": w,
        "b": np.zeros(8, np.float32),
        "scale": np.ones(8, np.float32) * 1.5,
        "shift": RNG.normal(size=8).astype(np.float32),
        "mean": RNG.normal(size=8).astype(np.float32) * 0.1,
        "var": np.ones(8, np.float32),
        "up": np.array([1, 1, 2, 2], np.float32),
        "fc": RNG.normal(size=(5, 8 * 8 * 8)).astype(np.float32) * 0.05,
        "fcb": np.zeros(5, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("LRN", ["r"], ["l"], size=5),
        helper.make_node("Sum", ["l", "r", "bn"], ["s"]),
        helper.make_node("Dropout", ["s"], ["d"]),
        helper.make_node("Upsample", ["d", "up"], ["u"], mode="nearest"),
        helper.make_node("MaxPool", ["u"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], transB=1),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])]
    inputs += [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape)) for k, v in inits.items()]
    graph = helper.make_graph(
        nodes,
        "caffe2",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        initializer=[_init(k, v) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=3)
    path = tmp_path / "old.onnx"
    onnx.save(model, path)
    return path


def test_a_graph_older_than_opset_11_is_read_through_the_version_converter(tmp_path, capsys):
    path = _opset9_model(tmp_path)
    before = path.read_bytes()
    x = RNG.normal(size=(1, 3, 16, 16)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    module = rankfold.load_onnx(path)
    np.testing.assert_allclose(
        module(torch.from_numpy(x)).detach().numpy(), session.run(None, {"x": x})[0], rtol=1e-4, atol=1e-5
    )
    assert "opset 9" in module.opset_note
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=RNG.normal(size=(48, 3, 16, 16)).astype(np.float32))
    out = tmp_path / "small.onnx"
    code = main(
        [
            "compress",
            str(path),
            "--calib",
            str(calib),
            "--keep",
            "0.6",
            "--method",
            "svd",
            "--max-output-error",
            "1",
            "-o",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "the file's ONNX opset 9 was read as opset 11" in captured.err
    assert path.read_bytes() == before  # the user's file is not rewritten
    written = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert written.run(None, {written.get_inputs()[0].name: x})[0].shape == (1, 5)


def test_a_graph_too_old_for_the_version_converter_is_refused_by_opset(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    path = tmp_path / "o.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 6)], ir_version=3), path)
    with pytest.raises(rankfold.RankfoldError, match="opset 6 is not supported .*7 to 25"):
        rankfold.load_onnx(path)


def _float16_model(tmp_path, form: str):
    """A float16 graph as exporters write one: float16 throughout ("half-io"), or float32 in and
    out with casts around a float16 body ("cast-inside")."""
    rng = np.random.default_rng(3)
    inits = [_init("w", (rng.normal(size=(8, 3, 3, 3)) * 0.3).astype(np.float16)),
             _init("b", np.zeros(8, np.float16)),
             _init("fc", (rng.normal(size=(8 * 6 * 6, 5)) * 0.1).astype(np.float16))]
    nodes, first, elem = [], "x", TensorProto.FLOAT16
    if form == "cast-inside":
        nodes.append(helper.make_node("Cast", ["x"], ["xh"], to=TensorProto.FLOAT16))
        first, elem = "xh", TensorProto.FLOAT
    nodes += [helper.make_node("Conv", [first, "w", "b"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
              helper.make_node("Flatten", ["r"], ["f"]), helper.make_node("MatMul", ["f", "fc"], ["yh"])]
    out = "yh"
    if form == "cast-inside":
        nodes.append(helper.make_node("Cast", ["yh"], ["y"], to=TensorProto.FLOAT))
        out = "y"
    graph = helper.make_graph(nodes, "half", [helper.make_tensor_value_info("x", elem, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info(out, elem, ["N", 5])], initializer=inits)
    path = tmp_path / f"{form}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path, (np.float16 if form == "half-io" else np.float32)


@pytest.mark.parametrize("form", ["half-io", "cast-inside"])
def test_a_float16_graph_is_read_in_float32_and_budgeted_in_its_files_bytes(tmp_path, capsys, form):
    from rankfold.evaluate import onnx_size

    path, dtype = _float16_model(tmp_path, form)
    before = path.read_bytes()
    x = RNG.normal(size=(96, 3, 8, 8)).astype(dtype)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x[:8]})[0].astype(np.float32)
    module = rankfold.load_onnx(path)
    got = module(torch.from_numpy(x[:8].astype(np.float32))).detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=2e-2, atol=2e-2)  # float16 arithmetic against float32
    assert "float16 weights read in float32" in module.widened_note
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=x)
    out = tmp_path / "small.onnx"
    code = main(["compress", str(path), "--calib", str(calib), "--max-weight-bytes", "60%", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "float16 weights read in float32" in err and "(float16)" in err
    assert onnx_size(out).weight_bytes <= 0.6 * onnx_size(path).weight_bytes  # of the file's bytes, not float32's
    assert path.read_bytes() == before
    written = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert written.run(None, {written.get_inputs()[0].name: x[:4].astype(np.float32)})[0].shape == (4, 5)


def test_an_op_that_refuses_its_attributes_ends_in_one_line_naming_the_node(tmp_path, capsys):
    nodes = [helper.make_node("Resize", ["x", "", "sc"], ["y"], mode="cubic", exclude_outside=1)]
    graph = helper.make_graph(nodes, "cubic", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              initializer=[_init("sc", np.array([1, 1, 2, 2], np.float32))])
    path = tmp_path / "cubic.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=RNG.normal(size=(80, 3, 4, 4)).astype(np.float32))
    code = main(["compress", str(path), "--calib", str(calib), "--keep", "0.5", "-o", str(tmp_path / "out.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "the ONNX node that writes 'y' (Resize) cannot run: Resize mode 'cubic' is supported on 4-D tensors" in err
    assert not (tmp_path / "out.onnx").exists()


def test_the_joined_file_is_checked_on_its_final_outputs_not_only_at_the_cut(tmp_path, capsys):
    """A head whose own check passes (relative error 0.06 at the cut) and a tail that thresholds it
    (LpPool, which rankfold cannot run, then Sign): the joined file is 0.42 away from the original
    on its final output, so it is refused and nothing is written."""
    rng = np.random.default_rng(0)
    low = rng.normal(size=(32, 6)) @ rng.normal(size=(6, 16)) / 3 + 0.1 * rng.normal(size=(32, 16))
    inits = [_init("w", low.astype(np.float32)), _init("level", np.array(1.0, np.float32)),
             _init("axis", np.array([2], np.int64))]
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], transB=1),
             helper.make_node("Unsqueeze", ["h", "axis"], ["h3"]),
             helper.make_node("LpPool", ["h3"], ["magnitude3"], kernel_shape=[1], p=2),
             helper.make_node("Squeeze", ["magnitude3", "axis"], ["magnitude"]),
             helper.make_node("Sub", ["magnitude", "level"], ["above"]), helper.make_node("Sign", ["above"], ["y"])]
    graph = helper.make_graph(nodes, "thresholded", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])], inits)
    path, calib, out = tmp_path / "thresholded.onnx", tmp_path / "calib.npz", tmp_path / "out.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    np.savez(calib, x=rng.normal(size=(128, 16)).astype(np.float32))
    common = ["compress", str(path), "--calib", str(calib), "--keep", "0.75", "--min-rank", "1", "-o", str(out)]
    assert main([*common, "--check", "relerr:0.2"]) == 2
    said = capsys.readouterr()
    assert "relative output error 0.059" in said.out  # the head passed its own check
    assert "self-check failed" in said.err and "relerr 0.42" in said.err and "Traceback" not in said.err
    assert not out.exists()
    assert main([*common, "--check", "relerr:0.5"]) == 0
    assert "self-check (the joined file against the original, both in onnxruntime)" in capsys.readouterr().out


def test_a_size_both_halves_reshape_by_stays_in_the_head_and_the_tail_gets_a_copy(tmp_path, capsys):
    """SLANet's head and its Loop both read a size taken from a Shape: moving its nodes to the
    tail left the head reading what it no longer made (an invalid graph); the tail gets a copy."""
    rng = np.random.default_rng(1)
    inits = [_init("w", rng.normal(size=(32, 16)).astype(np.float32)), _init("one", np.array([1], np.int64)),
             _init("two", np.array([2], np.int64)), _init("minus1", np.array([-1], np.int64)),
             _init("axis", np.array([2], np.int64))]
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], transB=1),
             helper.make_node("Shape", ["h"], ["s"]), helper.make_node("Slice", ["s", "one", "two"], ["width"]),
             helper.make_node("Concat", ["minus1", "width"], ["flat_shape"], axis=0),
             helper.make_node("Reshape", ["h", "flat_shape"], ["r"]), helper.make_node("Relu", ["r"], ["a"]),
             helper.make_node("Unsqueeze", ["a", "axis"], ["a3"]),
             helper.make_node("LpPool", ["a3"], ["m3"], kernel_shape=[1], p=2),  # rankfold cannot run it
             helper.make_node("Concat", ["minus1", "width"], ["tail_shape"], axis=0),
             helper.make_node("Reshape", ["m3", "tail_shape"], ["y"])]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])], inits)
    path, calib, out = tmp_path / "shared.onnx", tmp_path / "calib.npz", tmp_path / "out.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    x = rng.normal(size=(96, 16)).astype(np.float32)
    np.savez(calib, x=x)
    assert main(["compress", str(path), "--calib", str(calib), "--keep", "0.9", "--check", "relerr:0.5", "-o",
                 str(out)]) == 0, \
        capsys.readouterr().err
    original, small = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (path, out))
    wanted, got = original.run(None, {"x": x[:5]})[0], small.run(None, {"x": x[:5]})[0]
    assert got.shape == wanted.shape and np.linalg.norm(got - wanted) / np.linalg.norm(wanted) < 0.5  # as checked


def _detector_with_nms(tmp_path):
    """Two convolutions, boxes and scores, then NonMaxSuppression (which rankfold cannot run) and
    a Gather of the boxes it keeps: a detector exported with its post-processing."""
    rng = np.random.default_rng(5)
    inits = [_init("w1", (rng.normal(size=(32, 3, 3, 3)) * 0.3).astype(np.float32)),
             _init("wm", (rng.normal(size=(32, 32, 1, 1)) * 0.2).astype(np.float32)),
             _init("w2", (rng.normal(size=(5, 32, 1, 1)) * 0.3).astype(np.float32)),
             _init("shape", np.array([1, 5, 64], np.int64)), _init("zero", np.array([0], np.int64)),
             _init("four", np.array([4], np.int64)), _init("five", np.array([5], np.int64)),
             _init("two", np.array([2], np.int64)), _init("keep", np.array([10], np.int64)),
             _init("iou", np.array([0.5], np.float32)), _init("col", np.array(2, np.int64))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"]), helper.make_node("Conv", ["r1", "wm"], ["cm"]),
             helper.make_node("Relu", ["cm"], ["rm"]), helper.make_node("Conv", ["rm", "w2"], ["c2"]),
             helper.make_node("Reshape", ["c2", "shape"], ["flat"]),
             helper.make_node("Transpose", ["flat"], ["rows"], perm=[0, 2, 1]),
             helper.make_node("Slice", ["rows", "zero", "four", "two"], ["boxes"]),
             helper.make_node("Slice", ["rows", "four", "five", "two"], ["logit"]),
             helper.make_node("Sigmoid", ["logit"], ["prob"]),
             helper.make_node("Transpose", ["prob"], ["scores"], perm=[0, 2, 1]),
             helper.make_node("NonMaxSuppression", ["boxes", "scores", "keep", "iou"], ["picked"]),
             helper.make_node("Gather", ["picked", "col"], ["index"], axis=1),
             helper.make_node("Squeeze", ["boxes", "zero"], ["box_rows"]),
             helper.make_node("Gather", ["box_rows", "index"], ["kept_boxes"], axis=0)]
    graph = helper.make_graph(nodes, "det", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("kept_boxes", TensorProto.FLOAT, ["K", 4]),
                               helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 1, 64])],
                              initializer=inits)
    path = tmp_path / "det.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


@pytest.mark.parametrize("budget", [["--keep", "0.5", "--method", "svd"], ["--max-weight-bytes", "40%"]])
def test_a_graph_with_ops_rankfold_cannot_run_is_compressed_up_to_them(tmp_path, capsys, budget):
    from rankfold.evaluate import onnx_size

    path = _detector_with_nms(tmp_path)
    before = path.read_bytes()
    x = RNG.normal(size=(96, 3, 16, 16)).astype(np.float32)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=x)
    out, report = tmp_path / "small.onnx", tmp_path / "report.json"
    code = main(["compress", str(path), "--calib", str(calib), *budget, "--max-output-error", "1",
                 "--min-agreement", "0", "-o", str(out), "--report", str(report)])
    err = capsys.readouterr()
    assert code == 0, err.err
    assert "rankfold-head-" not in err.out  # the scratch head is not named as if it were the result
    written_report = json.loads(report.read_text())
    assert written_report["output"] == str(out) and written_report["model"] == str(path)
    assert written_report["cut"]["unsupported"] == {"NonMaxSuppression": 1}
    assert "rankfold cannot run NonMaxSuppression x1" in err.err and "kept as the file has them" in err.err
    assert f"wrote {out}: the compressed head joined to the 3 node(s) kept after it" in err.out
    assert path.read_bytes() == before
    written, original = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (out, path))
    assert [o.name for o in written.get_outputs()] == ["kept_boxes", "scores"]
    assert "NonMaxSuppression" in {n.op_type for n in onnx.load(str(out)).graph.node}
    assert onnx_size(out).weight_bytes < onnx_size(path).weight_bytes
    for sample in x[:4]:
        got, want = (s.run(None, {"x": sample[None]}) for s in (written, original))
        assert got[0].shape[1] == 4  # boxes picked by the kept NonMaxSuppression
        assert np.linalg.norm(got[1] - want[1]) < np.linalg.norm(want[1])  # the scores the head computes, kept


def test_a_plan_for_the_head_of_a_graph_with_ops_rankfold_cannot_run_applies_to_the_whole_file(tmp_path, capsys):
    """compress --plan-out on such a graph writes the head's plan; apply cuts the graph the same
    way, applies the plan to the head and joins the rest: the same weights as compress wrote."""
    path = _detector_with_nms(tmp_path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=RNG.normal(size=(96, 3, 16, 16)).astype(np.float32))
    loose = ["--max-output-error", "1", "--min-agreement", "0"]
    plan, compressed, applied = tmp_path / "plan.json", tmp_path / "compressed.onnx", tmp_path / "applied.onnx"
    assert main(["compress", str(path), "--calib", str(calib), "--max-params", "60%", "--plan-out", str(plan),
                 *loose, "-o", str(compressed)]) == 0
    capsys.readouterr()
    assert main(["apply", str(plan), str(path), "--calib", str(calib), *loose, "-o", str(applied)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {applied}: the compressed head joined to the 3 node(s) kept after it" in out
    weights = [{t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(p)).graph.initializer}
               for p in (compressed, applied)]
    assert weights[0].keys() == weights[1].keys()
    assert all(np.allclose(weights[0][k], weights[1][k], atol=1e-6) for k in weights[0])
    assert "NonMaxSuppression" in {n.op_type for n in onnx.load(str(applied)).graph.node}


def test_a_graph_with_nothing_to_compress_before_its_unsupported_ops_is_refused_naming_them(tmp_path, capsys):
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Bernoulli", ["a"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 4])])
    path = tmp_path / "b.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=RNG.normal(size=(80, 4, 4)).astype(np.float32))
    code = main(["compress", str(path), "--calib", str(calib), "--keep", "0.5", "-o", str(tmp_path / "o.onnx")])
    assert code == 2 and "unsupported ONNX op: Bernoulli x1" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


def test_a_conversion_that_differs_from_onnxruntime_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """The graph as rankfold reads it is run beside onnxruntime's run of the file: an op converted
    wrong (here Sigmoid made Tanh on purpose) is refused, not compressed into a result."""
    from rankfold.frontends import onnx_ops

    rng = np.random.default_rng(7)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Sigmoid", ["c"], ["s"]),
             helper.make_node("Flatten", ["s"], ["f"]), helper.make_node("MatMul", ["f", "fc"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              initializer=[_init("w", rng.normal(size=(16, 3, 3, 3)).astype(np.float32)),
                                           _init("fc", rng.normal(size=(16 * 36, 4)).astype(np.float32))])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=RNG.normal(size=(80, 3, 6, 6)).astype(np.float32))
    args = ["compress", str(path), "--calib", str(calib), "--keep", "0.7", "--max-output-error", "1", "-o"]
    assert main([*args, str(tmp_path / "good.onnx")]) == 0
    assert "read as onnxruntime runs the file" in capsys.readouterr().err
    monkeypatch.setitem(onnx_ops.OPS, "Sigmoid", lambda vals, attrs: [torch.tanh(vals[0])])
    assert main([*args, str(tmp_path / "bad.onnx")]) == 2
    err = capsys.readouterr().err
    assert "differs from onnxruntime's run of the file" in err and "output 'y'" in err
    assert not (tmp_path / "bad.onnx").exists()


def test_an_if_on_the_inputs_values_is_kept_after_the_compressed_head(tmp_path, capsys):
    """openWakeWord's models run a verifier only where their first score reaches 0.5: an If on the
    input's values, which rankfold cannot inline. The layers before it are compressed; the If (the
    verifier inside it) is kept as the file has it."""
    rng = np.random.default_rng(9)
    then_out = helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N", 1])
    else_out = helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", 1])
    verifier = helper.make_graph([helper.make_node("Gemm", ["x", "wv"], ["tv"], transB=1),
                                  helper.make_node("Sigmoid", ["tv"], ["t"])], "then", [], [then_out])
    passthrough = helper.make_graph([helper.make_node("Identity", ["p"], ["e"])], "else", [], [else_out])
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2"], ["z"], transB=1), helper.make_node("Sigmoid", ["z"], ["p"]),
             helper.make_node("ReduceMax", ["p"], ["m"], keepdims=0),
             helper.make_node("GreaterOrEqual", ["m", "half"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=verifier, else_branch=passthrough)]
    graph = helper.make_graph(nodes, "wake", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
                              initializer=[_init("w1", (rng.normal(size=(64, 32)) * 0.2).astype(np.float32)),
                                           _init("w2", (rng.normal(size=(1, 64)) * 0.2).astype(np.float32)),
                                           _init("wv", (rng.normal(size=(1, 32)) * 0.2).astype(np.float32)),
                                           _init("half", np.array(0.5, np.float32))])
    path = tmp_path / "wake.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(rankfold.RankfoldError, match="If whose condition depends on the input"):
        rankfold.load_onnx(path)
    x = RNG.normal(size=(96, 32)).astype(np.float32)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=x)
    out = tmp_path / "small.onnx"
    code = main(["compress", str(path), "--calib", str(calib), "--keep", "0.5", "--method", "svd",
                 "--max-output-error", "1", "--min-agreement", "0", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "rankfold cannot run If (on the input's values) x1" in captured.err
    assert "the 3 node(s) from there on" in captured.err  # ReduceMax, GreaterOrEqual (a bool) and the If
    written = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert "If" in {n.op_type for n in onnx.load(str(out)).graph.node}
    assert written.run(None, {"x": x[:1]})[0].shape == (1, 1)


@pytest.mark.parametrize("budget", [["--keep", "0.5"], ["--max-weight-bytes", "30%"]])
def test_integer_and_0d_outputs_are_checked_not_a_traceback(tmp_path, capsys, budget):
    """A classifier exported with its label (ArgMax, int64) and a confidence reduced over every
    axis (0-d) beside its probabilities: the planner's metric and the self-check died on them."""
    rng = np.random.default_rng(11)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]), helper.make_node("Gemm", ["f", "fc"], ["z"]),
             helper.make_node("Softmax", ["z"], ["prob"], axis=1),
             helper.make_node("ArgMax", ["z"], ["label"], axis=1, keepdims=0),
             helper.make_node("ReduceMax", ["prob"], ["confidence"], keepdims=0)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 10]),
         helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
         helper.make_tensor_value_info("confidence", TensorProto.FLOAT, [])],
        initializer=[_init("w", (rng.normal(size=(16, 3, 3, 3)) * 0.3).astype(np.float32)),
                     _init("fc", (rng.normal(size=(16 * 64, 10)) * 0.05).astype(np.float32))])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    calib, report = tmp_path / "calib.npz", tmp_path / "report.json"
    np.savez(calib, x=rng.normal(size=(96, 3, 8, 8)).astype(np.float32))
    code = main(["compress", str(path), "--calib", str(calib), *budget, "-o", str(tmp_path / "o.onnx"),
                 "--report", str(report)])
    err = capsys.readouterr().err
    assert code == 0, err
    kinds = {o["name"]: o["kind"] for o in json.loads(report.read_text())["self_check"]["outputs"]}
    assert kinds["label"] == "labels"


def test_eval_measures_a_detector_on_data_without_labels(tmp_path, capsys):
    path = _detector_with_nms(tmp_path)
    data = tmp_path / "scenes.npz"
    np.savez(data, x=RNG.normal(size=(8, 3, 16, 16)).astype(np.float32))
    assert main(["eval", str(path), "--data", str(data), "--no-latency"]) == 0
    out = capsys.readouterr().out
    assert "accuracy        not measured" in out and "MACs" in out and "parameters      2,049" in out
    assert main(["eval", str(path), "--data", str(data), "--attack", "fgsm"]) == 2
    assert "it needs labels y" in capsys.readouterr().err


def test_a_shape_built_from_the_inputs_batch_and_constants_stays_open_in_the_export(tmp_path):
    """tf2onnx writes Reshape(x, Cast(Concat(Cast(Shape(x))[0:1], [32]))) (Magika: 8 such shapes): the Concat
    of the traced batch with a constant vector went through torch.cat, which baked the trace's
    batch into the export, and no trace ran at every batch. The written file must run at any batch."""
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array([32], np.int32), "width"),  # int32, cast after, as tf2onnx does
             numpy_helper.from_array(rng.normal(size=(32, 16)).astype(np.float32), "w")]
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Cast", ["s"], ["s32"], to=TensorProto.INT32),
             helper.make_node("Slice", ["s32", "zero", "one"], ["batch"]),
             helper.make_node("Concat", ["batch", "width"], ["shape32"], axis=0),
             helper.make_node("Cast", ["shape32"], ["shape"], to=TensorProto.INT64),
             helper.make_node("Reshape", ["x", "shape"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["y"])]
    graph = helper.make_graph(nodes, "flat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "flat.onnx")
    model = rankfold.load_onnx(str(tmp_path / "flat.onnx"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(model, tmp_path / "out.onnx", example_input=torch.randn(2, 8, 4))
    x = rng.normal(size=(5, 8, 4)).astype(np.float32)
    want, got = (ort.InferenceSession(str(tmp_path / p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
                 for p in ("flat.onnx", "out.onnx"))
    assert got.shape == (5, 16) and np.allclose(want, got, atol=1e-4)


def test_nodes_sharing_weights_call_one_layer_compressed_and_stored_once(tmp_path):
    """An LSTM unrolled by its exporter runs one Gemm per time step on the same weights
    (captcha-whisperer's CRNN: 4 weights, 80 Gemms). Each node became a layer of its own: 20
    copies counted, planned and factorized apart, the export 20 times the size. Shared weights
    are one layer, called by each node, compressed once."""
    rng = np.random.default_rng(9)
    w = (rng.normal(size=(64, 6)) @ rng.normal(size=(6, 48)) / 4 + rng.normal(size=(64, 48)) / 50).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(64, np.float32), "b"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([48], np.int64), "width"),
             numpy_helper.from_array(np.array([1], np.int64), "one")]
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h1"], transB=1), helper.make_node("Tanh", ["h1"], ["t1"]),
             helper.make_node("Slice", ["t1", "zero", "width", "one"], ["s1"]),  # a step's state, fed back
             helper.make_node("Gemm", ["s1", "w", "b"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "twice", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 48])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "twice.onnx")
    model = rankfold.load_onnx(str(tmp_path / "twice.onnx"))
    assert sum(p.numel() for p in model.parameters()) == w.size + 64
    x = rng.normal(size=(128, 48)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    assert main(["compress", str(tmp_path / "twice.onnx"), "--calib", str(tmp_path / "calib.npz"), "--keep", "0.5",
                 "-o", str(tmp_path / "small.onnx"), "-q"]) == 0
    small = onnx.load(str(tmp_path / "small.onnx"))
    stored = sum(int(np.prod(i.dims)) for i in small.graph.initializer if i.data_type == TensorProto.FLOAT)
    assert stored < 0.75 * (w.size + 64)  # one factorized copy, not two
    want, got = (ort.InferenceSession(str(tmp_path / p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
                 for p in ("twice.onnx", "small.onnx"))
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.05


def test_a_graph_declaring_an_open_batch_that_runs_only_at_one_is_read_at_one(tmp_path, capsys):
    """khmersm (a dynamo export) declares 'batch' but reshapes to a shape with 1 baked in, so
    onnxruntime runs it at 1 sample only; and it reshapes a size read from Shape, a Python int
    here, which failed ('int' object has no attribute 'reshape'). It loads, calibrates, and the
    result declares the batch of 1 it runs at."""
    rng = np.random.default_rng(11)
    inits = [numpy_helper.from_array(np.array(1, np.int64), "axis1"),
             numpy_helper.from_array(np.array([1], np.int64), "vector"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(rng.normal(size=(16, 24)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=(24, 5)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "axis1"], ["width"]),
             helper.make_node("Reshape", ["width", "vector"], ["width1"]),
             helper.make_node("Concat", ["one", "width1"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["flat"]),  # [1, 16]: the batch baked at 1
             helper.make_node("MatMul", ["flat", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "baked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "baked.onnx")
    x = rng.normal(size=(128, 16)).astype(np.float32)
    model = rankfold.load_onnx(str(tmp_path / "baked.onnx"), probe=torch.from_numpy(x[:2]))
    assert model.fixed_batch == 1 and "runs one sample at a time" in model.size_note
    np.savez(tmp_path / "calib.npz", x=x)
    code = main(["compress", str(tmp_path / "baked.onnx"), "--calib", str(tmp_path / "calib.npz"), "--keep", "0.5",
                 "-o", str(tmp_path / "small.onnx")])
    assert code == 0, capsys.readouterr().err
    small = onnx.load(str(tmp_path / "small.onnx"))
    assert small.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


def test_the_relative_error_of_two_runs_sees_values_that_are_not_finite():
    """An attention mask's -inf in both runs is left out (inf - inf made the error NaN, and a NaN
    passed every threshold: `nan > 1e-4` is False); a NaN or an infinity where the other run has a
    number makes the error infinite."""
    from rankfold.export.onnx import relative_error

    wanted = np.array([[1.0, -np.inf], [2.0, 3.0]], np.float32)
    assert relative_error(wanted.copy(), wanted) == 0.0
    assert 0 < relative_error(wanted + np.float32(1e-3), wanted) < 1e-3
    for bad in (np.nan, np.inf, -np.inf):
        got = wanted.copy()
        got[1, 0] = bad
        assert relative_error(got, wanted) == float("inf")
    got = wanted.copy()
    got[0, 1] = 0.0  # a number where the model has -inf
    assert relative_error(got, wanted) == float("inf")


def _selecting_detector_file(path) -> None:
    """Two convolutions, a box and a score head, and NonMaxSuppression: its output, the selected
    (sample, class, box) rows, has as many rows as the scores ask for."""
    rng = np.random.default_rng(3)

    def weights(name, *shape):
        values = rng.normal(size=shape) / np.sqrt(np.prod(shape[1:]))
        return numpy_helper.from_array(values.astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "wb"], ["box_map"]),
             helper.make_node("Conv", ["r2", "ws"], ["score_map"]),
             helper.make_node("Sigmoid", ["score_map"], ["sig"]),
             helper.make_node("Reshape", ["box_map", "box_shape"], ["b"]),
             helper.make_node("Transpose", ["b"], ["boxes"], perm=[0, 2, 1]),
             helper.make_node("Reshape", ["sig", "score_shape"], ["scores"]),
             helper.make_node("NonMaxSuppression", ["boxes", "scores", "top", "iou", "floor"], ["selected"])]
    inits = [weights("w1", 16, 3, 3, 3), weights("w2", 16, 16, 3, 3), weights("wb", 4, 16, 1, 1),
             weights("ws", 2, 16, 1, 1), numpy_helper.from_array(np.array([0, 4, -1]), "box_shape"),
             numpy_helper.from_array(np.array([0, 2, -1]), "score_shape"),
             numpy_helper.from_array(np.array([10]), "top"),
             numpy_helper.from_array(np.array([0.5], np.float32), "iou"),
             numpy_helper.from_array(np.array([0.6], np.float32), "floor")]
    graph = helper.make_graph(nodes, "detector",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])],
                              [helper.make_tensor_value_info("selected", TensorProto.INT64, [None, 3])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_a_detector_ending_in_non_max_suppression_is_checked_on_the_rows_it_selects(tmp_path):
    """NonMaxSuppression selects as many rows as the scores ask for: the compressed graph's count
    differs from the original's. The self-check compares them as sets of rows (before, the
    differing shapes ended every run in an error, so such a detector could not be compressed)."""
    from rankfold.selfcheck import SessionModule, agreement

    original, calib, out = tmp_path / "det.onnx", tmp_path / "calib.npz", tmp_path / "small.onnx"
    _selecting_detector_file(original)
    x = np.random.default_rng(4).normal(size=(64, 3, 16, 16)).astype(np.float32)
    np.savez(calib, x=x)
    assert main(["compress", str(original), "--calib", str(calib), "--keep", "0.7", "--max-output-error", "1",
                 "--min-agreement", "0", "-o", str(out), "-q"]) == 0
    before, after = (SessionModule(ort.InferenceSession(str(p))) for p in (original, out))
    same = agreement(before, before, torch.from_numpy(x), batch_size=16).outputs[0]
    moved = agreement(before, after, torch.from_numpy(x), batch_size=16).outputs[0]
    assert moved.kind == "selected" and same.top1_agreement == 1.0
    assert moved.top1_agreement < 1.0  # the kept rows counted, not positions
    assert main(["compress", str(original), "--calib", str(calib), "--keep", "0.7", "--max-output-error", "1",
                 "--min-agreement", "0.99", "-o", str(tmp_path / "strict.onnx"), "-q"]) == 2
    assert not (tmp_path / "strict.onnx").exists()
