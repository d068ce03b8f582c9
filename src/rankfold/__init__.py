"""rankfold: shrink trained neural networks for edge hardware.

The public names load on first use (PEP 562), so `import rankfold.errors` or the CLI's `--help`
does not pay for importing torch and onnxruntime.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "AttackConfig": "rankfold.robustness",
    "AutoConfig": "rankfold.config",
    "CPConfig": "rankfold.config",
    "Compressed": "rankfold.result",
    "CompressionReport": "rankfold.apply",
    "LayerRecord": "rankfold.apply",
    "ModelCost": "rankfold.stats",
    "Plan": "rankfold.planner.plan",
    "RankfoldError": "rankfold.errors",
    "SVDConfig": "rankfold.config",
    "SkipConfig": "rankfold.config",
    "SpatialSVDConfig": "rankfold.config",
    "Target": "rankfold.target",
    "Tucker2Config": "rankfold.config",
    "apply_and_check": "rankfold.planner.pipeline",
    "apply_plan": "rankfold.planner.plan",
    "evaluate_onnx": ("rankfold.evaluate", "evaluate"),  # not "evaluate": that is a submodule's name
    "FinetuneConfig": "rankfold.training.config",
    "export_c": "rankfold.cexport.run",
    "finetune": ("rankfold.training.loop", "finetune"),  # the package is rankfold.training: no name clash
    "finetune_result": "rankfold.training",
    "robust_accuracy": "rankfold.robustness",
    "run_c": "rankfold.cexport.run",
    "run_pareto": "rankfold.planner.pareto",
    "save_compressed": "rankfold.saved",
    "compress": "rankfold.compress",
    "declare_embeddings": "rankfold.selfcheck",
    "compress_to_budget": "rankfold.planner.pipeline",
    "compress_uniform": "rankfold.uniform",
    "compress_with_report": "rankfold.apply",
    "export_onnx": "rankfold.export.onnx",
    "export_quantized": "rankfold.quantize.export",
    "load_onnx": "rankfold.frontends.onnx",
    "load_compressed": "rankfold.saved",
    "load_plan": "rankfold.planner.plan",
    "load_target": "rankfold.target",
    "make_plan": "rankfold.planner.pricing",
    "model_cost": "rankfold.stats",
}
__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'rankfold' has no attribute {name!r}")
    where = _PUBLIC[name]
    module, attribute = where if isinstance(where, tuple) else (where, name)
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
