"""ONNX export and onnxruntime verification: the only place onnx and onnxruntime are used."""

from .onnx_export import export_float, export_qdq
from .runtime import VerifyReport, run_onnx, verify

__all__ = ["VerifyReport", "export_float", "export_qdq", "run_onnx", "verify"]
