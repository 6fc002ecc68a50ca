"""PyTorch checkpoint -> ONNX graphs (dynamic batch, named I/O, json sidecar), checked against PyTorch."""

from export.onnx_export import ExportParityError, OnnxArtifacts, export_key, export_onnx, onnx_cache_root, onnx_dir_for, writable_folder

__all__ = ["ExportParityError", "OnnxArtifacts", "export_key", "export_onnx", "onnx_cache_root", "onnx_dir_for", "writable_folder"]
