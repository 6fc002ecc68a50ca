"""The backends in one table (`REGISTRY`: class, precisions, options honoured, capabilities), and how one is picked:
by name, or `auto`: tensorrt if importable with a GPU and fp16, else torch on CUDA, else onnxruntime."""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from dualrate.checkpoint import DEFAULT_CHECKPOINT
from engines.base import Backend, BackendUnavailable, Engine, EngineError, Precision
from export.card import ModelCard, read_spec

log = logging.getLogger("engines")


def resolve_backend(name: str | Backend, device: str | None = None, precision: Precision = Precision.FP32,
                    fmt: str = "dualrate") -> tuple[Backend, str]:
    """-> (concrete backend, device). `device=None` means the best available. `auto` on a GPU takes TensorRT where it
    is importable, the precision is one it runs (fp16) and it runs the model's format, else torch; on the CPU ONNX
    Runtime, or torch for a torch-export model. `fmt`: the model card's format."""
    backend = Backend(name)
    has_cuda = torch.cuda.is_available()
    if device is None or device == "auto":
        device = "cuda:0" if has_cuda else "cpu"
    if backend is Backend.AUTO:
        if device.startswith("cuda") and has_cuda:
            trt = (importlib.util.find_spec("tensorrt") is not None and precision is Precision.FP16
                   and fmt in REGISTRY[Backend.TENSORRT].formats)
            backend = Backend.TENSORRT if trt else Backend.TORCH if fmt in REGISTRY[Backend.TORCH].formats \
                else Backend.ONNXRUNTIME
        else:
            backend = Backend.ONNXRUNTIME if fmt in REGISTRY[Backend.ONNXRUNTIME].formats else Backend.TORCH
    if REGISTRY[backend].cuda_only and not device.startswith("cuda"):
        raise BackendUnavailable("the tensorrt backend needs a CUDA device")
    if fmt not in REGISTRY[backend].formats:
        runs = [str(b) for b, spec in REGISTRY.items() if fmt in spec.formats]
        raise BackendUnavailable(f"the {backend} backend does not run format {fmt!r} models: pick {' or '.join(runs)} "
                                 "(DUALRATE_BACKEND) or leave it auto")
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


@dataclass(frozen=True)
class Option:
    """An EngineConfig field that only some backends honour: `off` is its value when unused, `what` says what it is."""

    name: str
    what: str

    def set_in(self, cfg: EngineConfig) -> bool:
        value = getattr(cfg, self.name)
        return value != getattr(EngineConfig, self.name) if self.name != "buckets" else bool(value)


OPTIONS = {o.name: o for o in (
    Option("compile", "torch.compile; ONNX Runtime and TensorRT optimise their own graphs"),
    Option("cuda_graphs", "torch's CUDA graph capture"),
    Option("buckets", "the torch backend's compiled batch buckets"),
    Option("low_precision", "how torch runs bf16/fp16"),
    Option("threads", "CPU threads per network; TensorRT runs on the GPU"),
)}


@dataclass(frozen=True)
class BackendSpec:
    """One backend, in one row: where its class lives, the precisions it runs, the EngineConfig options it honours
    (all others must stay at their defaults), and what it can do beyond the common interface."""

    backend: Backend
    module: str  # imported only when the backend is used
    cls: str
    precisions: frozenset[Precision]
    options: frozenset[str]
    formats: frozenset[str]  # the model card formats it serves (export/card.py)
    fused_tick: bool = False  # the engine exposes its raw network calls and buckets (service.core.fused)
    cuda_graphs: bool = False  # can capture CUDA graphs per bucket
    compiles: bool = False  # has an optional compile step (torch.compile)
    cuda_only: bool = False
    cuda_devices: tuple[str, ...] = ()  # the CUDA device names it accepts (empty: any)
    title: str = ""  # its name in messages

    def engine_class(self) -> type[Engine]:
        return getattr(importlib.import_module(self.module), self.cls)

    def unhonoured(self, cfg: EngineConfig, device: str) -> list[str]:
        """The fields of `cfg` this backend would ignore, each with why (empty: it honours them all)."""
        out = [f"{o.name} ({o.what})" for o in OPTIONS.values() if o.name not in self.options and o.set_in(cfg)]
        if self.cuda_devices and device not in self.cuda_devices:
            out.append(f"device {device} (the {self.title} engines run on {self.cuda_devices[-1]}: select the GPU "
                       "with CUDA_VISIBLE_DEVICES)")
        return out


REGISTRY: dict[Backend, BackendSpec] = {spec.backend: spec for spec in (
    BackendSpec(Backend.ONNXRUNTIME, "engines.onnxruntime_engine", "OnnxRuntimeEngine", frozenset({Precision.FP32}),
                frozenset({"threads"}), frozenset({"onnx", "dualrate"}), title="ONNX Runtime"),
    BackendSpec(Backend.TORCH, "engines.torch_engine", "TorchEngine", frozenset(Precision),
                frozenset({"compile", "cuda_graphs", "buckets", "low_precision", "threads"}),
                frozenset({"torch-export", "dualrate"}), fused_tick=True,
                cuda_graphs=True, compiles=True, title="torch"),
    BackendSpec(Backend.TENSORRT, "engines.tensorrt_engine", "TensorRTEngine", frozenset({Precision.FP16}),
                frozenset(), frozenset({"dualrate"}), cuda_only=True, cuda_devices=("cuda", "cuda:0"), title="TensorRT"),
)}


@dataclass(frozen=True)
class Resolved:
    """A backend resolved once, at start: its row and the device; every `auto` switch derives from it."""

    spec: BackendSpec
    device: str

    @property
    def backend(self) -> Backend:
        return self.spec.backend

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")


def resolve(backend: str | Backend, device: str | None = None, precision: Precision = Precision.FP32,
            fmt: str = "dualrate") -> Resolved:
    kind, dev = resolve_backend(backend, device, precision, fmt)
    return Resolved(REGISTRY[kind], dev)


def create_engine(checkpoint: Path | str = DEFAULT_CHECKPOINT, config: EngineConfig | None = None, **options) -> Engine:
    """Build a ready engine (ONNX export / TensorRT build happen here if their caches are stale). `options` are
    EngineConfig fields that replace those of `config` (`create_engine(ck, backend="torch", device="cpu")`)."""
    cfg = replace(config or EngineConfig(), **options)
    checkpoint = Path(checkpoint)
    model = read_spec(checkpoint)
    res = resolve(cfg.backend, None if cfg.device == "auto" else cfg.device, cfg.precision, model.format)
    kind, device, spec = res.backend, res.device, res.spec
    log.info("engine: backend=%s device=%s precision=%s model=%s (format %s)", kind, device, cfg.precision, checkpoint,
             model.format)
    if cfg.precision not in spec.precisions:
        raise EngineError(f"the {kind} backend runs precision {', '.join(sorted(spec.precisions))}, not {cfg.precision}")
    refused = spec.unhonoured(cfg, device)
    if refused:
        raise EngineError(f"the {kind} backend does not honour {'; '.join(refused)}: leave them at their defaults or "
                          "pick the torch backend")
    return _BUILDERS[kind](checkpoint, model, cfg, device)


def _build_torch(checkpoint: Path, model: ModelCard, cfg: EngineConfig, device: str) -> Engine:
    from engines.torch_engine import TorchEngine

    if cfg.threads and device == "cpu":
        torch.set_num_threads(cfg.threads)
    return TorchEngine(checkpoint, model, device, cfg.max_batch, cuda_graphs=cfg.cuda_graphs, precision=cfg.precision,
                       compile=cfg.compile, graph_buckets=cfg.buckets or None, low_precision=cfg.low_precision)


def _build_onnxruntime(checkpoint: Path, model: ModelCard, cfg: EngineConfig, device: str) -> Engine:
    """An "onnx" model runs its own graphs in place; this project's checkpoints are exported first (cached)."""
    from engines.onnxruntime_engine import OnnxRuntimeEngine
    from export import export_onnx

    graphs = checkpoint if model.format == "onnx" else export_onnx(checkpoint).directory
    return OnnxRuntimeEngine(graphs, model, device, cfg.max_batch, intra_op_threads=cfg.threads)


def _build_tensorrt(checkpoint: Path, model: ModelCard, cfg: EngineConfig, device: str) -> Engine:
    from engines.build import build_engines
    from engines.tensorrt_engine import TensorRTEngine, _import_trt
    from export import export_onnx

    _import_trt()
    art = export_onnx(checkpoint, fp16=True)
    engine_dir = build_engines(art.directory, max_batch=cfg.max_batch, opt_batch=min(16, cfg.max_batch))
    return TensorRTEngine(engine_dir, art.sidecar, model, cfg.max_batch)


_BUILDERS = {Backend.TORCH: _build_torch, Backend.ONNXRUNTIME: _build_onnxruntime, Backend.TENSORRT: _build_tensorrt}


def unhonoured(cfg: EngineConfig, kind: Backend, device: str) -> list[str]:
    """The fields of `cfg` that backend `kind` would ignore, each with why (empty: it honours them all). An engine
    takes its config whole: a field it cannot honour is refused, never silently dropped."""
    return REGISTRY[kind].unhonoured(cfg, device)
