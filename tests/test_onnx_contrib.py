"""onnxruntime's own ops (com.microsoft: transformer fusions, fused convolutions, QOperator
quantization, MatMulNBits) read as the standard nodes they compute (rankfold/frontends/onnx_contrib.py):
each against onnxruntime on the same file, their weights as layers, and a file written from them."""

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import rankfold
from rankfold.errors import RankfoldError
from tests.helpers import ORT_QUANTIZER_RANGE

RNG = np.random.default_rng(0)
HIDDEN = 16


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _floats(name, *shape):
    return _init(name, RNG.normal(size=shape).astype(np.float32))


def _model(nodes, inits, x_shape, y_rank, opset=17):
    graph = helper.make_graph(nodes, "contrib", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * y_rank)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                   helper.make_opsetid("com.microsoft", 1)])


def _ms(op, inputs, outputs, **attrs):
    return helper.make_node(op, inputs, outputs, domain="com.microsoft", **attrs)


def _layers(module):
    return [name for name, m in module.named_modules() if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear))]


# name -> (nodes from x to y, initializers, x's shape, how many layers rankfold must make of it)
TOKENS = [3, 5, HIDDEN]
CASES = {
    "skip-layer-norm, bias-gelu, fused-matmul": (
        [helper.make_node("MatMul", ["x", "w1"], ["h"]),
         _ms("BiasGelu", ["h", "b1"], ["g"]),
         _ms("FusedMatMul", ["g", "w2t"], ["f"], transB=1, alpha=0.5),
         _ms("SkipLayerNormalization", ["f", "x", "gamma", "beta", "b2"], ["y", "", "", "sum"], epsilon=1e-5)],
        [_floats("w1", HIDDEN, 32), _floats("b1", 32), _floats("w2t", HIDDEN, 32), _floats("gamma", HIDDEN),
         _floats("beta", HIDDEN), _floats("b2", HIDDEN)], TOKENS, 2),
    "attention scores: fused-matmul of two activations, transposed and scaled": (
        [_ms("FusedMatMul", ["x", "x"], ["s"], transB=1, alpha=0.25),
         _ms("FusedMatMul", ["s", "x"], ["t"], transA=1),
         _ms("FastGelu", ["t", "b"], ["y"])],
        [_floats("b", HIDDEN)], TOKENS, 0),
    "skip-simplified-layer-norm, quick-gelu, gelu, simplified-layer-norm, rms-normalization (opset 23)": (
        [_ms("SkipSimplifiedLayerNormalization", ["x", "x", "gamma"], ["n"], epsilon=1e-6),
         _ms("QuickGelu", ["n"], ["q"], alpha=1.5),
         _ms("Gelu", ["q"], ["g"]),
         helper.make_node("SimplifiedLayerNormalization", ["g", "gamma"], ["s"], epsilon=1e-5),
         helper.make_node("RMSNormalization", ["s", "gamma"], ["y"], epsilon=1e-5)],
        [_floats("gamma", HIDDEN)], TOKENS, 0),
    "fused-conv with a sum and each activation, fused-gemm": (
        [_ms("FusedConv", ["x", "w", "b"], ["c1"], activation="Relu", pads=[1, 1, 1, 1]),
         _ms("FusedConv", ["c1", "w2", "", "c1"], ["c2"], activation="LeakyRelu", activation_params=[0.2],
             pads=[1, 1, 1, 1]),
         _ms("FusedConv", ["c2", "w3"], ["c3"], activation="Clip", activation_params=[-0.5, 0.5],
             pads=[1, 1, 1, 1]),
         _ms("FusedConv", ["c3", "w2", "b"], ["c4"], activation="HardSigmoid", activation_params=[0.3, 0.4],
             pads=[1, 1, 1, 1]),
         helper.make_node("GlobalAveragePool", ["c4"], ["p"]),
         helper.make_node("Flatten", ["p"], ["f"]),
         _ms("FusedGemm", ["f", "fc", "fcb"], ["y"], transB=1, activation="Tanh")],
        [_floats("w", 6, 3, 3, 3), _floats("w2", 6, 6, 3, 3), _floats("w3", 6, 6, 3, 3), _floats("b", 6),
         _floats("fc", 4, 6), _floats("fcb", 4)], [2, 3, 8, 8], 5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_onnxruntime_fused_ops_compute_what_onnxruntime_computes(tmp_path, case):
    nodes, inits, x_shape, layers = CASES[case]
    path = tmp_path / "contrib.onnx"
    opset = 23 if "opset 23" in case else 17
    onnx.save(_model(nodes, inits, x_shape, 2 if "gemm" in case else 3, opset), str(path))
    x = RNG.normal(size=x_shape).astype(np.float32)
    theirs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    module = rankfold.load_onnx(path)
    ours = module(torch.from_numpy(x)).detach().numpy()
    assert np.abs(ours - theirs).max() <= 1e-4 * max(1.0, np.abs(theirs).max()), case
    assert len(_layers(module)) == layers, _layers(module)  # constant weights became layers


def test_a_statistic_output_of_a_fused_layer_norm_that_is_read_is_refused_by_name(tmp_path):
    nodes = [_ms("SkipLayerNormalization", ["x", "x", "gamma", "beta"], ["n", "mean"]),
             helper.make_node("Add", ["n", "mean"], ["y"])]
    path = tmp_path / "mean.onnx"
    onnx.save(_model(nodes, [_floats("gamma", HIDDEN), _floats("beta", HIDDEN)], TOKENS, 3), str(path))
    with pytest.raises(RankfoldError, match=r"SkipLayerNormalization node .*output 1 \('mean'\) is read"):
        rankfold.load_onnx(path)


@pytest.mark.parametrize("symmetric", [True, False])
def test_matmul_n_bits_weights_load_as_onnxruntime_dequantizes_them(tmp_path, symmetric):
    """A 4-bit weight file (MatMulNBits, as onnxruntime's own quantizer writes it, K not a multiple
    of the block) is a float Linear layer computing what onnxruntime computes."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    w = RNG.normal(size=(80, 24)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "nbits",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 80])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 24])], [_init("w", w)])
    quantizer = MatMulNBitsQuantizer(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                                     block_size=32, is_symmetric=symmetric)
    quantizer.process()
    path = tmp_path / "nbits.onnx"
    onnx.save(quantizer.model.model, str(path))
    assert {n.op_type for n in quantizer.model.model.graph.node} == {"MatMulNBits"}
    x = RNG.normal(size=(5, 80)).astype(np.float32)
    theirs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    module = rankfold.load_onnx(path)
    assert len(_layers(module)) == 1
    assert np.abs(module(torch.from_numpy(x)).detach().numpy() - theirs).max() < 1e-4 * np.abs(theirs).max()
    assert np.abs(theirs - x @ w).max() > 0.01 * np.abs(theirs).max()  # the 4-bit weights, not the float ones


class _QuantizedNet(nn.Module):
    """Every op onnxruntime's QOperator format has an op of its own for."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        a = torch.relu(self.c1(x))
        b = torch.relu(self.c2(a)) + a  # QLinearAdd
        c = torch.cat([a, nn.functional.leaky_relu(b, 0.1)], dim=1)  # QLinearConcat, QLinearLeakyRelu
        d = self.c3(c)
        e = torch.sigmoid(d) * d  # QLinearSigmoid, QLinearMul
        pooled = nn.functional.adaptive_avg_pool2d(self.pool(e), 1).flatten(1)  # QLinear*Pool
        return torch.softmax(self.fc(pooled), dim=1)  # QGemm, QLinearSoftmax


class _Reader:
    def __init__(self, x):
        self.items = iter([{"x": x[i : i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self.items, None)


def _qoperator_file(tmp_path, x, weights_in_constant_nodes=False, net=None):
    """(the float file of `net` (_QuantizedNet), its copy quantized by onnxruntime in QOperator
    format). With weights in Constant nodes (as Paddle2ONNX writes them) the quantizer quantizes
    them inside the graph: a QuantizeLinear of each Constant feeds its QLinearConv."""
    from onnxruntime import quantization as q

    torch.manual_seed(0)
    net = net or _QuantizedNet
    src, out = str(tmp_path / "float.onnx"), str(tmp_path / "qop.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net().eval(), (torch.from_numpy(x[:1]),), src, dynamo=False, opset_version=13,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
        if weights_in_constant_nodes:
            model = onnx.load(src)  # the weights (not the biases, which onnxruntime's quantizer needs as such)
            weights = [t for t in model.graph.initializer if len(t.dims) >= 2]
            kept = [t for t in model.graph.initializer if len(t.dims) < 2]
            constants = [helper.make_node("Constant", [], [t.name], value=t) for t in weights]
            nodes = list(model.graph.node)
            del model.graph.initializer[:], model.graph.node[:]
            model.graph.initializer.extend(kept)
            model.graph.node.extend(constants + nodes)
            onnx.save(model, src)
        q.quantize_static(src, out, _Reader(x[:32]), quant_format=q.QuantFormat.QOperator)
    return src, out


def test_a_qoperator_file_whose_weights_are_quantized_inside_the_graph_has_its_layers(tmp_path):
    """A Paddle2ONNX file (weights in Constant nodes) quantized by onnxruntime: each QLinearConv reads
    a QuantizeLinear of a Constant, which folds at load, so its convolutions are layers (the
    rewrite had left them as integer ops: "no layer to compress")."""
    x = RNG.normal(size=(32, 3, 8, 8)).astype(np.float32)
    _src, path = _qoperator_file(tmp_path, x, weights_in_constant_nodes=True)
    graph = onnx.load(path).graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "QLinearConv"]
    assert convs and all(producers.get(n.input[3]) == "QuantizeLinear" for n in convs)
    theirs = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    module = rankfold.load_onnx(path)
    assert np.abs(module(torch.from_numpy(x)).detach().numpy() - theirs).max() <= 1e-5 * np.abs(theirs).max()
    assert len(_layers(module)) == 4


def test_a_qoperator_file_is_read_with_its_convolutions_and_gemm_as_layers_and_compresses(tmp_path):
    """onnxruntime's static quantizer in QOperator format (QLinearConv, and its own QGemm, QLinearAdd,
    QLinearConcat, ...): read as DequantizeLinear -> float op -> QuantizeLinear, exactly as
    onnxruntime computes it; its 4 weight layers are layers the planner sees (they were constants
    before, and the contrib ops refused the file); a compressed result is written and checked."""
    from rankfold.planner.sensitivity import layer_statistics
    from tests.helpers import run_cli

    x = RNG.normal(size=(96, 3, 8, 8)).astype(np.float32)
    _src, path = _qoperator_file(tmp_path, x)
    ops = {(n.domain, n.op_type) for n in onnx.load(path).graph.node}
    assert {("", "QLinearConv"), ("com.microsoft", "QGemm"), ("com.microsoft", "QLinearAdd"),
            ("com.microsoft", "QLinearConcat"), ("com.microsoft", "QLinearSigmoid"),
            ("com.microsoft", "QLinearMul"), ("com.microsoft", "QLinearAveragePool"),
            ("com.microsoft", "QLinearGlobalAveragePool"), ("com.microsoft", "QLinearLeakyRelu"),
            ("com.microsoft", "QLinearSoftmax")} <= ops, ops
    theirs = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    module = rankfold.load_onnx(path)
    ours = module(torch.from_numpy(x)).detach().numpy()
    assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()
    names = _layers(module)
    assert len(names) == 4, names
    stats = layer_statistics(module, names, torch.from_numpy(x[:32]))
    assert all(float(stats[name].sensitivity.sum()) > 0 for name in names)
    np.savez(tmp_path / "calib.npz", x=x)
    out = tmp_path / "small.onnx"
    # a toy's int8 file is 3 kB: the activations' scales and zero points are a tenth of it
    code, _stdout, stderr = run_cli("compress", path, "--calib", tmp_path / "calib.npz", "--max-params", "70%",
                                    "--max-weight-bytes", "150%", "--check", "relerr:0.5", "-o", out)
    assert code == 0, stderr
    assert "already quantized" in stderr and "QGemm x1" in stderr
    written = rankfold.load_onnx(out)
    assert sum(p.numel() for p in written.parameters()) <= 0.7 * sum(p.numel() for p in module.parameters()) + 1


@pytest.mark.parametrize("form", ["qdq", "qoperator"])
def test_the_planner_sees_the_layers_before_each_activation_quantizer(tmp_path, form):
    """A QuantizeLinear read only by DequantizeLinear (a QDQ pair) rounds straight-through: integer
    codes cut the gradient, and every layer of a statically quantized graph had sensitivity 0."""
    from onnxruntime import quantization as q

    from rankfold.planner.sensitivity import layer_statistics

    x = RNG.normal(size=(32, 3, 8, 8)).astype(np.float32)
    src, path = _qoperator_file(tmp_path, x)
    if form == "qdq":
        path = str(tmp_path / "qdq.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q.quantize_static(src, path, _Reader(x), quant_format=q.QuantFormat.QDQ)
    module = rankfold.load_onnx(path)
    names = _layers(module)
    stats = layer_statistics(module, names, torch.from_numpy(x))
    assert all(float(stats[name].sensitivity.sum()) > 0 for name in names), \
        {name: float(stats[name].sensitivity.sum()) for name in names}


def _bert_block_file(tmp_path, mask_kind: str) -> tuple[str, dict]:
    """A one-block BERT as onnxruntime's transformer optimizer fuses it: EmbedLayerNormalization
    (word, position and segment tables), Attention with packed q, k, v weights, SkipLayerNormalization.
    `mask_kind`: "lengths" (the embedding's mask index), "raw" (a 0/1 mask per key), "causal"
    (unidirectional, uneven q / k / v sizes, no mask)."""
    words, tokens, heads = 40, 6, 2
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT32, ["n", "t"]),
              helper.make_tensor_value_info("segment_ids", TensorProto.INT32, ["n", "t"]),
              helper.make_tensor_value_info("mask", TensorProto.INT32, ["n", "t"])]
    sizes = [8, 8, 12] if mask_kind == "causal" else [HIDDEN] * 3
    attention_mask = {"lengths": ["mask_index"], "raw": ["mask"], "causal": []}[mask_kind]
    nodes = [_ms("EmbedLayerNormalization", ["input_ids", "segment_ids", "word", "position", "segment", "gamma",
                                            "beta", "mask"], ["embedded", "mask_index"], epsilon=1e-12),
             _ms("Attention", ["embedded", "qkv", "qkv_bias", *attention_mask], ["attended"], num_heads=heads,
                 **({"unidirectional": 1, "qkv_hidden_sizes": sizes} if mask_kind == "causal" else {})),
             helper.make_node("MatMul", ["attended", "out"], ["projected"]),
             _ms("SkipLayerNormalization", ["projected", "embedded", "gamma", "beta"], ["y"], epsilon=1e-12)]
    inits = [_floats("word", words, HIDDEN), _floats("position", 16, HIDDEN), _floats("segment", 2, HIDDEN),
             _floats("gamma", HIDDEN), _floats("beta", HIDDEN), _floats("qkv", HIDDEN, sum(sizes)),
             _floats("qkv_bias", sum(sizes)), _floats("out", sizes[2], HIDDEN)]
    graph = helper.make_graph(nodes, "bert", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                   ["n", "t", HIDDEN])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14),
                                                    helper.make_opsetid("com.microsoft", 1)])
    path = str(tmp_path / f"bert-{mask_kind}.onnx")
    onnx.save(model, path)
    mask = np.ones((4, tokens), np.int32)
    mask[1, 4:], mask[3, 2:] = 0, 0  # padded on the right, as the mask index assumes
    feeds = {"input_ids": RNG.integers(0, words, size=(4, tokens)).astype(np.int32),
             "segment_ids": RNG.integers(0, 2, size=(4, tokens)).astype(np.int32), "mask": mask}
    return path, feeds


def _reads_as_onnxruntime_runs_it_with_layers(path: str, feeds: dict) -> np.ndarray:
    """onnxruntime's output of the BERT block file; rankfold's reading computes it, with the q, k,
    v and output projections as four Linear layers and the word table as a table layer."""
    theirs = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    module = rankfold.load_onnx(path)
    ours = module(*(torch.from_numpy(feeds[name]) for name in ("input_ids", "segment_ids", "mask")))
    assert np.abs(ours.detach().numpy() - theirs).max() < 1e-4 * np.abs(theirs).max()
    assert len([m for m in module.modules() if isinstance(m, nn.Linear)]) == 4
    assert any(isinstance(m, nn.Embedding) for m in module.modules())
    return theirs


@pytest.mark.parametrize("mask_kind", ["lengths", "raw", "causal"])
def test_fused_bert_attention_and_embeddings_compute_what_onnxruntime_computes(tmp_path, mask_kind):
    """Attention's packed weights become three layers (q, k, v) and the word table a table layer;
    padded keys are masked as onnxruntime masks them, whichever way the mask is given."""
    path, feeds = _bert_block_file(tmp_path, mask_kind)
    theirs = _reads_as_onnxruntime_runs_it_with_layers(path, feeds)
    # the mask matters: a padded key changed would change what onnxruntime computes, were it read
    if mask_kind != "causal":
        changed = dict(feeds, input_ids=feeds["input_ids"].copy())
        changed["input_ids"][3, 4] = (changed["input_ids"][3, 4] + 1) % 40
        again = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, changed)[0]
        assert np.abs(again[3, :2] - theirs[3, :2]).max() < 1e-5  # the kept tokens do not see it


@pytest.mark.parametrize("mask_kind", ["lengths", "raw"])
def test_a_fused_bert_block_dynamically_quantized_by_onnxruntime_reads_as_onnxruntime_runs_it(tmp_path, mask_kind):
    """onnxruntime's quantize_dynamic after its optimizer (its BERT tutorial's flow) writes
    QAttention (int8 q, k, v weights on DynamicQuantizeLinear's codes) and QEmbedLayerNormalization
    (8-bit tables): read as the float ops on the dequantized weights, the q, k, v projections and
    the word table are layers again, computing what onnxruntime computes."""
    from onnxruntime.quantization import quantize_dynamic

    path, feeds = _bert_block_file(tmp_path, mask_kind)
    quantized = str(tmp_path / "dynamic.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(path, quantized, extra_options={"DefaultTensorType": TensorProto.FLOAT},
                         **ORT_QUANTIZER_RANGE)
    ops = {n.op_type for n in onnx.load(quantized).graph.node}
    assert {"QAttention", "QEmbedLayerNormalization"} <= ops, ops
    _reads_as_onnxruntime_runs_it_with_layers(quantized, feeds)


def test_macs_of_onnxruntimes_fused_ops_are_counted_like_the_ops_they_fuse(tmp_path):
    """A fused file's MACs are its unfused twin's: Attention's projections and products, FusedConv,
    FusedGemm, FusedMatMul and MatMulNBits were not counted (the size line understated them)."""
    from rankfold.evaluate import onnx_macs

    path, _feeds = _bert_block_file(tmp_path, "causal")
    tokens, sizes = 6, [8, 8, 12]
    attention = tokens * HIDDEN * sum(sizes) + tokens * tokens * (sizes[0] + sizes[2])
    assert onnx_macs(onnx.load(path), {"input_ids": [tokens], "segment_ids": [tokens], "mask": [tokens]}) == \
        attention + tokens * sizes[2] * HIDDEN  # and the output projection
    nodes, inits, x_shape, _layers_made = CASES["fused-conv with a sum and each activation, fused-gemm"]
    fused = _model(nodes, inits, x_shape, 2)
    convs = 8 * 8 * 6 * (3 * 9) + 3 * 8 * 8 * 6 * (6 * 9)
    assert onnx_macs(fused, tuple(x_shape[1:])) == convs + 6 * 4


class _Upsampling(nn.Module):
    """A feature-pyramid step: codes upsampled by a nearest Resize and max-pooled, then concatenated."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.side = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        up = nn.functional.interpolate(torch.relu(self.mid(torch.relu(self.down(x)))), scale_factor=2, mode="nearest")
        pooled = nn.functional.max_pool2d(torch.relu(self.side(x)), 3, 1, 1)
        return self.head(torch.cat([up, pooled], 1))


def test_a_qoperator_file_resizing_and_pooling_its_codes_reads_as_onnxruntime_runs_it(tmp_path):
    """onnxruntime's QOperator files run a nearest Resize and a MaxPool on the int8 codes themselves;
    they ran on integer tensors here, which torch cannot upsample ("not implemented for 'Char'")."""
    x = RNG.normal(size=(32, 3, 16, 16)).astype(np.float32)
    _src, path = _qoperator_file(tmp_path, x, net=_Upsampling)
    assert {"Resize", "MaxPool", "QLinearConv"} <= {n.op_type for n in onnx.load(path).graph.node}
    theirs = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    module = rankfold.load_onnx(path)
    assert np.abs(module(torch.from_numpy(x)).detach().numpy() - theirs).max() <= 1e-5 * np.abs(theirs).max()
    assert len(_layers(module)) == 4


def _feeds_file(tmp_path, node, feeds: dict, inits=(), outputs=("y",)) -> str:
    rank = next(iter(feeds.values())).ndim
    types = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int64): TensorProto.INT64,
             np.dtype(np.int32): TensorProto.INT32}
    graph = helper.make_graph(
        [node], "contrib", [helper.make_tensor_value_info(k, types[v.dtype], list(v.shape)) for k, v in feeds.items()],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [None] * (rank if i == 0 else 4))
         for i, name in enumerate(outputs)], list(inits))
    path = str(tmp_path / "contrib.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.microsoft", 1)]), path)
    return path


def _key_mask(batch, keys):
    mask = np.ones((batch, keys), np.int32)
    mask[1, keys - 2:] = 0
    return mask


B, S, L, N, SIZE = 2, 5, 7, 2, 8
# name -> (node, feeds, constants, outputs)
ATTENTION_CASES = {
    "q, k, v with a bias, a key padding mask and an attention bias": (
        _ms("MultiHeadAttention", ["q", "k", "v", "bias", "mask", "extra"], ["y"], num_heads=N),
        dict(q=RNG.normal(size=(B, S, N * SIZE)).astype(np.float32),
             k=RNG.normal(size=(B, L, N * SIZE)).astype(np.float32),
             v=RNG.normal(size=(B, L, N * 12)).astype(np.float32), mask=_key_mask(B, L),
             extra=RNG.normal(size=(1, N, S, L)).astype(np.float32)),
        [_floats("bias", 2 * N * SIZE + N * 12)], ("y",)),
    "k, v per head (cross-attention), key lengths, a scale": (
        _ms("MultiHeadAttention", ["q", "k", "v", "", "lengths"], ["y"], num_heads=N, scale=0.2),
        dict(q=RNG.normal(size=(B, S, N * SIZE)).astype(np.float32),
             k=RNG.normal(size=(B, N, L, SIZE)).astype(np.float32),
             v=RNG.normal(size=(B, N, L, SIZE)).astype(np.float32), lengths=np.array([L, 3], np.int32)),
        [], ("y",)),
    "unidirectional after a past cache, the presents": (
        _ms("MultiHeadAttention", ["q", "k", "v", "", "", "", "past_k", "past_v"], ["y", "present_k", "present_v"],
            num_heads=N, unidirectional=1),
        dict(q=RNG.normal(size=(B, S, N * SIZE)).astype(np.float32),
             k=RNG.normal(size=(B, S, N * SIZE)).astype(np.float32),
             v=RNG.normal(size=(B, S, N * SIZE)).astype(np.float32),
             past_k=RNG.normal(size=(B, N, 3, SIZE)).astype(np.float32),
             past_v=RNG.normal(size=(B, N, 3, SIZE)).astype(np.float32)), [], ("y", "present_k", "present_v")),
    "rotary embedding, position ids": (
        _ms("RotaryEmbedding", ["x", "ids", "cos", "sin"], ["y"], num_heads=N),
        dict(x=RNG.normal(size=(B, S, N * SIZE)).astype(np.float32), ids=RNG.integers(0, 16, (B, S))),
        [_floats("cos", 16, SIZE // 2), _floats("sin", 16, SIZE // 2)], ("y",)),
    "rotary embedding, interleaved, one offset": (
        _ms("RotaryEmbedding", ["x", "offset", "cos", "sin"], ["y"], interleaved=1),
        dict(x=RNG.normal(size=(B, N, S, SIZE)).astype(np.float32), offset=np.array([4], np.int64)),
        [_floats("cos", 16, SIZE // 2), _floats("sin", 16, SIZE // 2)], ("y",)),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_multi_head_attention_and_rotary_embedding_compute_what_onnxruntime_computes(tmp_path, case):
    node, feeds, inits, outputs = ATTENTION_CASES[case]
    path = _feeds_file(tmp_path, node, feeds, inits, outputs)
    theirs = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)
    ours = rankfold.load_onnx(path)(*(torch.from_numpy(v) for v in feeds.values()))
    ours = ours if isinstance(ours, tuple) else (ours,)
    for got, wanted in zip(ours, theirs, strict=True):
        assert np.abs(got.detach().numpy() - wanted).max() <= 1e-4 * max(1.0, np.abs(wanted).max()), case


def test_the_projections_before_a_multi_head_attention_are_layers(tmp_path):
    x = RNG.normal(size=(B, S, HIDDEN)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", f"w{p}"], [p]) for p in "qkv"] + [
        _ms("MultiHeadAttention", ["q", "k", "v", "bias"], ["a"], num_heads=N),
        helper.make_node("MatMul", ["a", "wo"], ["y"])]
    inits = [_floats(f"w{p}", HIDDEN, N * SIZE) for p in "qkv"] + [_floats("bias", 3 * N * SIZE),
                                                                   _floats("wo", N * SIZE, HIDDEN)]
    path = str(tmp_path / "mha.onnx")
    onnx.save(_model(nodes, inits, ["n", S, HIDDEN], 3), path)
    module = rankfold.load_onnx(path)
    assert len(_layers(module)) == 4
    from rankfold.evaluate import onnx_macs

    projections, scores_and_mix = 4 * S * HIDDEN * N * SIZE, S * S * 2 * N * SIZE
    assert onnx_macs(onnx.load(path)) == projections + scores_and_mix
    theirs = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(module(torch.from_numpy(x)).detach().numpy() - theirs).max() < 1e-4 * np.abs(theirs).max()


def test_a_packed_multi_head_attention_is_refused_by_name(tmp_path):
    feeds = dict(qkv=RNG.normal(size=(B, S, N, 3, SIZE)).astype(np.float32))
    path = _feeds_file(tmp_path, _ms("MultiHeadAttention", ["qkv"], ["y"], num_heads=N), feeds)
    with pytest.raises(RankfoldError, match="MultiHeadAttention node .*packed in one input"):
        rankfold.load_onnx(path)


def test_a_multi_head_attention_encoder_written_again_takes_other_token_counts(tmp_path):
    """Token ids and a padding mask in (key lengths for MultiHeadAttention): the compressed file
    keeps the token axis open and computes at another length what the original does."""
    nodes = [helper.make_node("Gather", ["table", "ids"], ["x"]),
             *[helper.make_node("MatMul", ["x", f"w{p}"], [p]) for p in "qkv"],
             helper.make_node("ReduceSum", ["mask", "one"], ["count"], keepdims=0),
             helper.make_node("Cast", ["count"], ["lengths"], to=TensorProto.INT32),
             _ms("MultiHeadAttention", ["q", "k", "v", "bias", "lengths"], ["a"], num_heads=N),
             helper.make_node("MatMul", ["a", "wo"], ["o"]),
             helper.make_node("ReduceMean", ["o"], ["y"], axes=[1], keepdims=0)]
    inits = [_floats("table", 30, HIDDEN), *[_floats(f"w{p}", HIDDEN, N * SIZE) for p in "qkv"],
             _floats("bias", 3 * N * SIZE), _floats("wo", N * SIZE, HIDDEN), _init("one", np.array([1]))]
    graph = helper.make_graph(nodes, "encoder", [helper.make_tensor_value_info(name, TensorProto.INT64, ["n", "t"])
                                                 for name in ("ids", "mask")],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", HIDDEN])], inits)
    original, calib, out = tmp_path / "mha.onnx", tmp_path / "calib.npz", tmp_path / "small.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.microsoft", 1)]), str(original))

    def feeds(count, tokens):
        mask = (np.arange(tokens)[None, :] < RNG.integers(2, tokens + 1, (count, 1))).astype(np.int64)
        return {"ids": RNG.integers(0, 30, (count, tokens)) * mask, "mask": mask}

    np.savez(calib, **feeds(64, 12))
    from rankfold.cli import main

    assert main(["compress", str(original), "--calib", str(calib), "--keep", "0.9", "--max-output-error", "1",
                 "-o", str(out), "-q"]) == 0
    x = feeds(3, 7)
    got = ort.InferenceSession(str(out)).run(None, x)[0]
    wanted = ort.InferenceSession(str(original)).run(None, x)[0]
    assert got.shape == wanted.shape == (3, HIDDEN)
    assert np.abs(got - wanted).max() < 0.5 * np.abs(wanted).max()
