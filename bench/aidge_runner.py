"""Run Eclipse Aidge's compression module on one ONNX file. Runs inside the Aidge environment
(bench/aidge_env.py), not rankfold's, and imports nothing from rankfold.

    python aidge_runner.py IN.onnx OUT.onnx --factor 0.25 --method tucker2|svd --input-shape 1,1,32,32

Prints one JSON line: {"seconds": ..., "replaced": ...} or {"error": ...}.
"""

import argparse
import json
import sys
import time
import traceback

# Aidge's Compressor.compress(graph, type): 0 is Tucker-2, 1 is weight SVD (the library's enum order).
METHODS = {"tucker2": 0, "svd": 1}


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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("output")
    parser.add_argument("--factor", type=float, required=True)
    parser.add_argument("--method", choices=sorted(METHODS), default="tucker2")
    parser.add_argument("--input-shape", required=True)
    args = parser.parse_args()
    try:
        import aidge_backend_cpu  # noqa: F401  (registers the CPU kernels)
        import aidge_compression
        import aidge_onnx

        t0 = time.perf_counter()
        graph = aidge_onnx.load_onnx(args.model)
        replaced = aidge_compression.Compressor(args.factor).compress(graph, METHODS[args.method])
        seconds = time.perf_counter() - t0
        # After compression the graph's data input has no tensor; the export needs its shape.
        first = graph.get_ordered_inputs()[0][0]
        graph.set_ordered_inputs([(first, 0)])
        graph.set_backend("cpu")
        graph.forward_dims([[int(d) for d in args.input_shape.split(",")]])
        aidge_onnx.export_onnx(graph, args.output)
        make_batch_dynamic(args.output)
        print(json.dumps({"seconds": seconds, "replaced": int(replaced)}))
        return 0
    except Exception as exc:  # report any failure of the library as data, not as a crash of the bench
        last = traceback.format_exc().strip().splitlines()[-1]
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300], "where": last[:300]}))
        return 1


if __name__ == "__main__":
    sys.exit(main())
