"""rankfold: shrink trained neural networks for edge hardware."""

from rankfold.compress import CompressionReport, LayerRecord, compress, compress_with_report
from rankfold.config import AutoConfig, CPConfig, SkipConfig, SpatialSVDConfig, SVDConfig, Tucker2Config
from rankfold.errors import RankfoldError
from rankfold.export.onnx import export_onnx
from rankfold.frontends.onnx import load_onnx
from rankfold.stats import ModelCost, model_cost

__all__ = [
    "AutoConfig",
    "CPConfig",
    "CompressionReport",
    "LayerRecord",
    "ModelCost",
    "RankfoldError",
    "SVDConfig",
    "SkipConfig",
    "SpatialSVDConfig",
    "Tucker2Config",
    "compress",
    "compress_with_report",
    "export_onnx",
    "load_onnx",
    "model_cost",
]
__version__ = "0.1.0"
