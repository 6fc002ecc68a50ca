"""Pick a backend by name or `auto`: tensorrt if importable with a GPU, else torch on CUDA, else onnxruntime."""

from __future__ import annotations

import importlib.util
import logging
from enum import StrEnum
from pathlib import Path

import torch

from dualrate.checkpoint import DEFAULT_CHECKPOINT
from engines.base import BackendUnavailable, Engine

log = logging.getLogger("engines")


class Backend(StrEnum):
    AUTO = "auto"
    ONNXRUNTIME = "onnxruntime"
    TORCH = "torch"
    TENSORRT = "tensorrt"


def resolve_backend(name: str | Backend, device: str | None = None) -> tuple[Backend, str]:
    """-> (concrete backend, device). `device=None` means the best available."""
    backend = Backend(name)
    has_cuda = torch.cuda.is_available()
    if device is None or device == "auto":
        device = "cuda:0" if has_cuda else "cpu"
    if backend is Backend.AUTO:
        if device.startswith("cuda") and has_cuda:
            backend = Backend.TENSORRT if importlib.util.find_spec("tensorrt") else Backend.TORCH
        else:
            backend = Backend.ONNXRUNTIME
    if backend is Backend.TENSORRT and not device.startswith("cuda"):
        raise BackendUnavailable("the tensorrt backend needs a CUDA device")
    return backend, device


def create_engine(
    backend: str | Backend = Backend.AUTO,
    checkpoint: Path | str = DEFAULT_CHECKPOINT,
    device: str | None = None,
    max_batch: int = 64,
    threads: int = 0,
    cuda_graphs: bool = False,
    precision: str = "fp32",  # torch backend only: fp32 | tf32 (CUDA) | bf16 | fp16 (autocast)
) -> Engine:
    """Build a ready engine (ONNX export / TensorRT build happen here if their caches are stale)."""
    kind, device = resolve_backend(backend, device)
    checkpoint = Path(checkpoint)
    log.info("engine: backend=%s device=%s checkpoint=%s", kind, device, checkpoint)
    if kind is Backend.TORCH:
        from engines.torch_engine import TorchEngine

        if threads and device == "cpu":
            torch.set_num_threads(threads)
        return TorchEngine(checkpoint, device, max_batch, cuda_graphs=cuda_graphs, precision=precision)
    from export import export_onnx

    if kind is Backend.ONNXRUNTIME:
        from engines.onnxruntime_engine import OnnxRuntimeEngine

        art = export_onnx(checkpoint)
        return OnnxRuntimeEngine(art.directory, device, max_batch, intra_op_threads=threads)
    from engines.build import build_engines
    from engines.tensorrt_engine import TensorRTEngine, _import_trt

    _import_trt()
    art = export_onnx(checkpoint, fp16=True)
    engine_dir = build_engines(art.directory, max_batch=max_batch, opt_batch=min(16, max_batch))
    return TensorRTEngine(engine_dir, art.sidecar, max_batch)
