"""Exporters: ONNX for runtimes."""
