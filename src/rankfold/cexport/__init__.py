"""QDQ ONNX -> integer program (ir.py) -> NumPy golden model (golden.py) and plain C99 (codegen.py)."""
