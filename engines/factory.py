"""Pick a backend by name or `auto`: tensorrt if importable with a GPU, else torch on CUDA, else onnxruntime."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from dualrate.checkpoint import DEFAULT_CHECKPOINT
from engines.base import Backend, BackendUnavailable, Engine, EngineError, Precision

log = logging.getLogger("engines")


def resolve_backend(name: str | Backend, device: str | None = None,
                    precision: Precision = Precision.FP32) -> tuple[Backend, str]:
    """-> (concrete backend, device). `device=None` means the best available. `auto` on a GPU takes TensorRT where it
    is importable and the precision is one it runs (fp16), else torch."""
    backend = Backend(name)
    has_cuda = torch.cuda.is_available()
    if device is None or device == "auto":
        device = "cuda:0" if has_cuda else "cpu"
    if backend is Backend.AUTO:
        if device.startswith("cuda") and has_cuda:
            trt = importlib.util.find_spec("tensorrt") is not None and precision is Precision.FP16
            backend = Backend.TENSORRT if trt else Backend.TORCH
        else:
            backend = Backend.ONNXRUNTIME
    if backend is Backend.TENSORRT and not device.startswith("cuda"):
        raise BackendUnavailable("the tensorrt backend needs a CUDA device")
    return backend, device


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine is built with, in one typed value (the service's settings map onto it)."""

    backend: Backend = Backend.AUTO
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_batch: int = 64  # rows per network call (a guided image takes two)
    precision: Precision = Precision.FP32  # each backend honours its own set (Engine.PRECISIONS) or refuses
    threads: int = 0  # CPU threads per network (0 = library default)
    cuda_graphs: bool = False  # torch on CUDA: one graph per batch bucket
    compile: bool = False  # torch: torch.compile (Inductor) per batch bucket, all compiled at warm-up
    buckets: tuple[int, ...] = ()  # batch buckets of compiled / captured calls; () = powers of two up to max_batch
    low_precision: str = "autocast"  # torch bf16/fp16: "autocast" (fp32 weights) or "weights" (cast weights)

    def __post_init__(self) -> None:
        object.__setattr__(self, "backend", Backend(self.backend))
        object.__setattr__(self, "precision", Precision(self.precision))
        if self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")


def create_engine(checkpoint: Path | str = DEFAULT_CHECKPOINT, config: EngineConfig | None = None, **options) -> Engine:
    """Build a ready engine (ONNX export / TensorRT build happen here if their caches are stale). `options` are
    EngineConfig fields that replace those of `config` (`create_engine(ck, backend="torch", device="cpu")`)."""
    cfg = replace(config or EngineConfig(), **options)
    kind, device = resolve_backend(cfg.backend, None if cfg.device == "auto" else cfg.device, cfg.precision)
    checkpoint = Path(checkpoint)
    log.info("engine: backend=%s device=%s precision=%s checkpoint=%s", kind, device, cfg.precision, checkpoint)
    cls = _backend_class(kind)
    if cfg.precision not in cls.PRECISIONS:
        raise EngineError(f"the {kind} backend runs precision {', '.join(sorted(cls.PRECISIONS))}, not {cfg.precision}")
    refused = unhonoured(cfg, kind, device)
    if refused:
        raise EngineError(f"the {kind} backend does not honour {'; '.join(refused)}: leave them at their defaults or "
                          "pick the torch backend")
    if kind is Backend.TORCH:
        from engines.torch_engine import TorchEngine

        if cfg.threads and device == "cpu":
            torch.set_num_threads(cfg.threads)
        return TorchEngine(checkpoint, device, cfg.max_batch, cuda_graphs=cfg.cuda_graphs, precision=cfg.precision,
                           compile=cfg.compile, graph_buckets=cfg.buckets or None, low_precision=cfg.low_precision)
    from export import export_onnx

    if kind is Backend.ONNXRUNTIME:
        from engines.onnxruntime_engine import OnnxRuntimeEngine

        art = export_onnx(checkpoint)
        return OnnxRuntimeEngine(art.directory, device, cfg.max_batch, intra_op_threads=cfg.threads)
    from engines.build import build_engines
    from engines.tensorrt_engine import TensorRTEngine, _import_trt

    _import_trt()
    art = export_onnx(checkpoint, fp16=True)
    engine_dir = build_engines(art.directory, max_batch=cfg.max_batch, opt_batch=min(16, cfg.max_batch))
    return TensorRTEngine(engine_dir, art.sidecar, cfg.max_batch)


def unhonoured(cfg: EngineConfig, kind: Backend, device: str) -> list[str]:
    """The fields of `cfg` that backend `kind` would ignore, each with why (empty: it honours them all). An engine
    takes its config whole: a field it cannot honour is refused, never silently dropped."""
    out = []
    if kind is not Backend.TORCH:
        out += [f"{name} ({what})" for name, on, what in (
            ("compile", cfg.compile, "torch.compile; ONNX Runtime and TensorRT optimise their own graphs"),
            ("cuda_graphs", cfg.cuda_graphs, "torch's CUDA graph capture"),
            ("buckets", bool(cfg.buckets), "the torch backend's compiled batch buckets"),
            ("low_precision", cfg.low_precision != "autocast", "how torch runs bf16/fp16"),
        ) if on]
    if kind is Backend.TENSORRT:
        if cfg.threads:
            out.append("threads (TensorRT runs on the GPU)")
        if device not in ("cuda", "cuda:0"):
            out.append(f"device {device} (the TensorRT engines run on cuda:0: select the GPU with CUDA_VISIBLE_DEVICES)")
    return out


def _backend_class(kind: Backend) -> type[Engine]:
    if kind is Backend.TORCH:
        from engines.torch_engine import TorchEngine

        return TorchEngine
    if kind is Backend.ONNXRUNTIME:
        from engines.onnxruntime_engine import OnnxRuntimeEngine

        return OnnxRuntimeEngine
    from engines.tensorrt_engine import TensorRTEngine  # imports without TensorRT; building needs it

    return TensorRTEngine
