"""One interface for every backend, on torch tensors: build/load -> warmup -> run -> close.

`encode(z, tau, label) -> features` runs the heavy context encoder; `denoise(z, t, tau, label, features) -> v`
runs the light network. `encode_async` enqueues the encoder off the caller's path (a dedicated CUDA stream on GPU,
a dedicated worker thread on CPU) so the light network can run other rows meanwhile.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from export.card import ModelCard

Features = tuple[Tensor, ...]


class EngineError(RuntimeError):
    """A backend failed to build, load or run; the message says what to do."""


class BackendUnavailable(EngineError):
    """The requested backend cannot run here (library or device missing)."""


class Precision(StrEnum):
    FP32 = "fp32"  # fp32 everywhere (on CUDA with TF32 off: the same images as the CPU)
    TF32 = "tf32"  # CUDA: TF32 matmuls and convolutions
    BF16 = "bf16"  # torch autocast
    FP16 = "fp16"  # torch autocast; TensorRT: the FP16 graphs, built strongly typed


class Backend(StrEnum):
    AUTO = "auto"
    ONNXRUNTIME = "onnxruntime"
    TORCH = "torch"
    TENSORRT = "tensorrt"


@dataclass(frozen=True)
class EngineInfo:
    backend: Backend  # the concrete one (AUTO only before an engine is known)
    device: str  # "cpu" | "cuda:0" ...
    precision: Precision
    providers: tuple[str, ...] = ()  # ONNX Runtime execution providers, if any
    max_batch: int = 0  # rows per network call (a guided image takes 2 rows)

    def __post_init__(self) -> None:  # plain strings where it crossed a process boundary
        object.__setattr__(self, "backend", Backend(self.backend))
        object.__setattr__(self, "precision", Precision(self.precision))


class FeatureHandle(Protocol):
    def result(self) -> Features: ...


class CudaFeatures:
    """Features enqueued on the encoder stream; `result()` makes the current stream wait on the event (no host sync)."""

    def __init__(self, feats: Features, event: Any) -> None:
        self._feats, self._event = feats, event

    def result(self) -> Features:
        torch.cuda.current_stream().wait_event(self._event)
        for f in self._feats:  # the caller's stream now uses memory allocated on the encoder stream
            f.record_stream(torch.cuda.current_stream())
        return self._feats


class Engine(ABC):
    """Base class of the backends. Subclasses implement `encode`, `denoise`, `info`; the rest has defaults."""

    spec: ModelCard  # the model's serving contract: geometry, classes, diffusion, the networks' I/O names
    feature_shapes: list[tuple[int, ...]]  # per feature tensor, without the batch axis
    sample_shape: tuple[int, int, int]  # (C, H, W) of z and the prediction, from the model card
    max_batch: int
    feature_dtype: torch.dtype = torch.float32  # what `encode` returns (a feature cache is kept in it)
    PRECISIONS: ClassVar[frozenset[Precision]] = frozenset({Precision.FP32})  # what the backend honours

    def __init__(self) -> None:
        self._encoder_worker: ThreadPoolExecutor | None = None
        self._encoder_stream: Any = None  # a CUDA stream for the encoder, set by GPU backends
        self._lock = threading.Lock()

    @abstractmethod
    def encode(self, z: Tensor, tau: Tensor, label: Tensor) -> Features:
        """z (B, C, H, W) float, tau (B,) float time, label (B,) int64 -> the features, in the card's order."""

    @abstractmethod
    def denoise(self, z: Tensor, t: Tensor, tau: Tensor, label: Tensor, features: Features) -> Tensor:
        """-> the prediction (B, C, H, W): v, eps or x0 as the card's `diffusion.prediction` says."""

    @property
    @abstractmethod
    def info(self) -> EngineInfo: ...

    def encode_async(self, z: Tensor, tau: Tensor, label: Tensor) -> FeatureHandle:
        """Run the encoder off the caller's path: on the backend's encoder CUDA stream where it has one (the caller's
        stream waits on an event only where it uses the features), else on a worker thread."""
        stream = self._encoder_stream
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())  # the inputs were written on the caller's stream
            for x in (z, tau, label):
                if x.is_cuda:
                    # The encoder stream reads these; without this the caching allocator could hand their memory to
                    # the caller's stream (once the caller drops them) while the encoder still reads it.
                    x.record_stream(stream)
            with torch.cuda.stream(stream):
                feats = self.encode(z, tau, label)
                ev = torch.cuda.Event()
                ev.record(stream)
            return CudaFeatures(feats, ev)
        with self._lock:
            if self._encoder_worker is None:
                self._encoder_worker = ThreadPoolExecutor(1, thread_name_prefix="encoder")
        fut: Future[Features] = self._encoder_worker.submit(self.encode, z, tau, label)
        return fut

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 8), progress: Callable[[str], None] | None = None) -> None:
        """Run both networks once per batch size (first-call allocations, kernel selection, graph capture).
        `progress` receives a line per finished stage where a backend has stages worth reporting (compilation)."""
        for b in batch_sizes:
            b = min(b, self.max_batch)
            z = torch.zeros(b, *self.sample_shape, device=self.device)
            t = torch.full((b,), 0.5, device=self.device)
            y = torch.zeros(b, dtype=torch.long, device=self.device)
            self.denoise(z, t, t, y, self.encode_async(z, t, y).result())
        self.synchronize()

    @property
    def device(self) -> str:
        return "cpu"

    def synchronize(self) -> None:  # noqa: B027 - deliberately a no-op on CPU; GPU backends override
        """Wait for all enqueued work (a no-op on CPU)."""

    def close(self) -> None:
        if self._encoder_worker is not None:
            self._encoder_worker.shutdown(wait=True)
            self._encoder_worker = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def encoder_feeds(self, z: Tensor, tau: Tensor, label: Tensor) -> dict[str, Tensor]:
        """The encoder's inputs named as the model card names them (times as its `time_input` says; no label for an
        unconditional model). Backends that run graphs feed by these names."""
        values = (z.float(), self.spec.time_feed(tau.float()), label.long())
        return {n: v for n, v in zip(self.spec.encoder.inputs(), values, strict=True) if n is not None}

    def denoiser_feeds(self, z: Tensor, t: Tensor, tau: Tensor, label: Tensor, features: Features) -> dict[str, Tensor]:
        io, time = self.spec.denoiser, self.spec.time_feed
        if len(features) != len(io.features):
            raise EngineError(f"{len(features)} feature tensors for the denoiser's {len(io.features)} ({io.features})")
        values = (z.float(), time(t.float()), time(tau.float()), label.long(), *(f.float() for f in features))
        return {n: v for n, v in zip(io.inputs(), values, strict=True) if n is not None}

    def probe_feature_shapes(self) -> list[tuple[int, ...]]:
        """The encoder's feature shapes (without the batch axis), from one call at batch 1."""
        z = torch.zeros(1, *self.sample_shape, device=self.device)
        t = torch.full((1,), 0.5, device=self.device)
        y = torch.full((1,), self.spec.null_label, dtype=torch.long, device=self.device)
        return [tuple(f.shape[1:]) for f in self.encode(z, t, y)]

    def check_batch(self, n: int) -> None:
        if not 1 <= n <= self.max_batch:
            raise EngineError(f"batch of {n} rows outside 1..{self.max_batch} for {self.info.backend}")
