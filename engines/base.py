"""One interface for every backend, on torch tensors: build/load -> warmup -> run -> close.

`encode(z, tau, label) -> features` runs the heavy context encoder; `denoise(z, t, tau, label, features) -> v`
runs the light network. `encode_async` enqueues the encoder off the caller's path (a dedicated CUDA stream on GPU,
a dedicated worker thread on CPU) so the light network can run other rows meanwhile.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

Features = tuple[Tensor, ...]


class EngineError(RuntimeError):
    """A backend failed to build, load or run; the message says what to do."""


class BackendUnavailable(EngineError):
    """The requested backend cannot run here (library or device missing)."""


@dataclass(frozen=True)
class EngineInfo:
    backend: str  # "onnxruntime" | "torch" | "tensorrt"
    device: str  # "cpu" | "cuda:0" ...
    precision: str  # "fp32" | "tf32" | "fp16" | "bf16"
    providers: tuple[str, ...] = ()  # ONNX Runtime execution providers, if any
    max_batch: int = 0  # rows per network call (a guided image takes 2 rows)


class FeatureHandle(Protocol):
    def result(self) -> Features: ...


class Engine(ABC):
    """Base class of the backends. Subclasses implement `encode`, `denoise`, `info`; the rest has defaults."""

    feature_shapes: list[tuple[int, int, int]]
    sample_shape: tuple[int, int, int]  # (C, S, S) of z and v, from the export contract / model config
    max_batch: int

    def __init__(self) -> None:
        self._encoder_worker: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    @abstractmethod
    def encode(self, z: Tensor, tau: Tensor, label: Tensor) -> Features:
        """z (B, C, S, S) float, tau (B,) float, label (B,) int64 -> features [(B, C_l, H_l, W_l)]."""

    @abstractmethod
    def denoise(self, z: Tensor, t: Tensor, tau: Tensor, label: Tensor, features: Features) -> Tensor:
        """-> v (B, C, S, S)."""

    @property
    @abstractmethod
    def info(self) -> EngineInfo: ...

    def encode_async(self, z: Tensor, tau: Tensor, label: Tensor) -> FeatureHandle:
        """Run the encoder on its own worker thread (CPU); GPU backends override this with a CUDA stream."""
        with self._lock:
            if self._encoder_worker is None:
                self._encoder_worker = ThreadPoolExecutor(1, thread_name_prefix="encoder")
        fut: Future[Features] = self._encoder_worker.submit(self.encode, z, tau, label)
        return fut

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 8)) -> None:
        """Run both networks once per batch size (first-call allocations, kernel selection, graph capture)."""
        import torch

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

    def check_batch(self, n: int) -> None:
        if not 1 <= n <= self.max_batch:
            raise EngineError(f"batch of {n} rows outside 1..{self.max_batch} for {self.info.backend}")
