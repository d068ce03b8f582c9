"""Post-training quantization: pure arithmetic (core), observers, weight preparation, QDQ ONNX."""
