"""Run Eclipse Aidge's compression module on one ONNX file. Runs inside the Aidge environment
(bench/aidge_env.py), not rankfold's, and imports nothing from rankfold.

    python aidge_runner.py IN.onnx OUT.onnx --factor 0.25 --method tucker2|svd --input-shape 1,1,32,32
    python aidge_runner.py IN.onnx OUT.onnx --method ptq --calib CALIB.npz --input-shape 1,1,32,32

Prints one JSON line: {"seconds": ..., "replaced": ...} or {"error": ...}.
"""

import argparse
import json
import sys
import time
import traceback

# Aidge's Compressor.compress(graph, type): 0 is Tucker-2, 1 is weight SVD (the library's enum order).
METHODS = {"tucker2": 0, "svd": 1}
STAGE = ["loading"]  # the step running when a failure is reported


def make_batch_dynamic(path: str) -> None:
    """Aidge exports with the batch fixed at the shape it was given; give the batch back its name."""
    import onnx

    model = onnx.load(path)
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "N"
    del model.graph.value_info[:]
    onnx.save(model, path)


def quantize(model: str, output: str, calib_path: str) -> float:
    """aidge-quantization's int8 PTQ, as aidge_core's own export flow calls it (per-tensor MAX
    clipping, single-shift scaling), calibrated on the harness's images; exported as QDQ ONNX."""
    import aidge_backend_cpu  # noqa: F401
    import aidge_core
    import aidge_onnx
    import aidge_quantization as aq
    import numpy as np

    images = np.load(calib_path)["x"].astype(np.float32)
    batches = [np.ascontiguousarray(images[i : i + 32]) for i in range(0, len(images), 32)]
    t0 = time.perf_counter()
    graph = aidge_onnx.load_onnx(model)
    first = graph.get_ordered_inputs()[0][0]
    graph.set_ordered_inputs([(first, 0)])
    aidge_core.expand_metaops(graph, name_format="{0}_{1}_{2}")
    graph.set_backend("cpu")
    tensors = [aidge_core.Tensor(b) for b in batches]
    for tensor in tensors:
        tensor.set_backend("cpu")
    graph.forward_dims([list(tensors[0].dims)])
    aq.auto_assign_node_precision(graph, aidge_core.dtype.int8, aidge_core.dtype.int8, aidge_core.dtype.int32)
    STAGE[0] = "quantize_network"
    aq.quantize_network(network=graph, calibration_set=tensors, clipping_mode=aq.Clipping.MAX, single_shift=True)
    seconds = time.perf_counter() - t0
    STAGE[0] = "set_to_qdq"
    aq.set_to_qdq(graph)
    graph.forward_dims([[1, *tensors[0].dims[1:]]])
    STAGE[0] = "export_onnx"
    aidge_onnx.export_onnx(graph, output)
    make_batch_dynamic(output)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("output")
    parser.add_argument("--factor", type=float, default=1.0)
    parser.add_argument("--method", choices=[*sorted(METHODS), "ptq"], default="tucker2")
    parser.add_argument("--calib", help="calibration images (.npz with x), for --method ptq")
    parser.add_argument("--input-shape", required=True)
    args = parser.parse_args()
    try:
        import aidge_backend_cpu  # noqa: F401  (registers the CPU kernels)
        import aidge_compression
        import aidge_onnx

        if args.method == "ptq":
            print(json.dumps({"seconds": quantize(args.model, args.output, args.calib), "replaced": 0}))
            return 0
        t0 = time.perf_counter()
        graph = aidge_onnx.load_onnx(args.model)
        STAGE[0] = "Compressor.compress"
        replaced = aidge_compression.Compressor(args.factor).compress(graph, METHODS[args.method])
        seconds = time.perf_counter() - t0
        # After compression the graph's data input has no tensor; the export needs its shape.
        first = graph.get_ordered_inputs()[0][0]
        graph.set_ordered_inputs([(first, 0)])
        graph.set_backend("cpu")
        graph.forward_dims([[int(d) for d in args.input_shape.split(",")]])
        STAGE[0] = "export_onnx"
        aidge_onnx.export_onnx(graph, args.output)
        make_batch_dynamic(args.output)
        print(json.dumps({"seconds": seconds, "replaced": int(replaced)}))
        return 0
    except Exception as exc:  # report any failure of the library as data, not as a crash of the bench
        last = traceback.format_exc().strip().splitlines()[-1]
        error = f"in {STAGE[0]}: {type(exc).__name__}: {exc}".splitlines()[0][:300]
        print(json.dumps({"error": error, "where": last[:300]}))
        return 1


if __name__ == "__main__":
    sys.exit(main())
