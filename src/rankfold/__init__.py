"""rankfold: shrink trained neural networks for edge hardware."""

from rankfold.compress import CompressionReport, LayerRecord, compress, compress_with_report
from rankfold.config import AutoConfig, CPConfig, SkipConfig, SpatialSVDConfig, SVDConfig, Tucker2Config
from rankfold.errors import RankfoldError
from rankfold.export.onnx import export_onnx
from rankfold.frontends.onnx import load_onnx
from rankfold.planner.plan import Plan, apply_plan, load_plan, make_plan
from rankfold.quantize.export import export_quantized
from rankfold.stats import ModelCost, model_cost
from rankfold.target import Target, load_target

__all__ = [
    "AutoConfig",
    "CPConfig",
    "CompressionReport",
    "LayerRecord",
    "ModelCost",
    "Plan",
    "RankfoldError",
    "SVDConfig",
    "SkipConfig",
    "SpatialSVDConfig",
    "Target",
    "Tucker2Config",
    "apply_plan",
    "compress",
    "compress_with_report",
    "export_onnx",
    "export_quantized",
    "load_onnx",
    "load_plan",
    "load_target",
    "make_plan",
    "model_cost",
]
__version__ = "0.1.0"
