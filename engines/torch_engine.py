"""Eager PyTorch backend on CPU or CUDA.

On CUDA the encoder is enqueued on a dedicated stream; the denoiser, on the caller's stream, waits on a CUDA event
recorded after the encoder, so only the rows that need fresh features wait for them. Optional CUDA graphs capture
both networks per fixed batch bucket (inputs are padded up to the bucket).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from torch import Tensor

from dualrate.checkpoint import load_checkpoint
from engines.base import BackendUnavailable, Engine, EngineInfo, Features, Precision

log = logging.getLogger("engines.torch")


class _GraphRunner:
    """One CUDA graph per batch bucket for a module with fixed-shape static inputs."""

    def __init__(self, module: torch.nn.Module, buckets: tuple[int, ...]) -> None:
        self.module, self.buckets = module, buckets
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, list[Tensor], Tensor | tuple[Tensor, ...]]] = {}

    def __call__(self, *args: Tensor):
        b = args[0].shape[0]
        bucket = next((x for x in self.buckets if x >= b), None)
        if bucket is None:
            return self.module(*args)
        if bucket not in self.graphs:
            static = [torch.zeros((bucket, *a.shape[1:]), dtype=a.dtype, device=a.device) for a in args]
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                self.module(*static)  # warm up outside the graph
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = self.module(*static)
            self.graphs[bucket] = (g, static, out)
        g, static, out = self.graphs[bucket]
        for s_in, a in zip(static, args, strict=True):
            s_in[:b].copy_(a)
        g.replay()
        if isinstance(out, tuple | list):
            return tuple(o[:b].clone() for o in out)
        return out[:b].clone()


class TorchEngine(Engine):
    PRECISIONS = frozenset(Precision)  # tf32 only on CUDA (checked below)

    def __init__(
        self, checkpoint: Path, device: str = "cpu", max_batch: int = 64, cuda_graphs: bool = False,
        graph_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512), precision: Precision = Precision.FP32,
    ) -> None:
        super().__init__()
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable(f"device {device} asked for, but torch sees no CUDA GPU")
        model = load_checkpoint(checkpoint)
        self.cfg = model.cfg
        self.feature_shapes = list(model.cfg.feature_shapes)
        self.sample_shape = model.cfg.sample_shape
        self.max_batch = max_batch
        self._device = device
        precision = Precision(precision)
        if precision is Precision.TF32 and not device.startswith("cuda"):
            raise BackendUnavailable("precision tf32 needs a CUDA device (TF32 is a GPU tensor-core format)")
        self.precision = precision
        # bf16/fp16 run under autocast: weights stay fp32, matmuls and convs run in the low precision.
        self._autocast = getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[precision]) if precision in ("bf16", "fp16") else None
        if device.startswith("cuda"):
            # cuDNN convolutions default to TF32 on Ampere and later; fp32 means fp32 (the first H100 run measured 4/255
            # pixel differences against ONNX Runtime with TF32 on). Process-wide flags: one engine per process.
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        self.encoder = model.encoder.to(device).eval()
        self.denoiser = model.denoiser.to(device).eval()
        self._encoder_stream = torch.cuda.Stream(device=device) if device.startswith("cuda") else None
        self._cuda_graphs = cuda_graphs and self._encoder_stream is not None
        buckets = tuple(b for b in graph_buckets if b <= max_batch)
        self._enc_fn = _GraphRunner(self.encoder, buckets) if self._cuda_graphs else self.encoder
        self._den_fn = _GraphRunner(self.denoiser, buckets) if self._cuda_graphs else self.denoiser

    @property
    def info(self) -> EngineInfo:
        return EngineInfo("torch", self._device, self.precision.value, (), self.max_batch)

    @property
    def device(self) -> str:
        return self._device

    def synchronize(self) -> None:
        if self._encoder_stream is not None:
            torch.cuda.synchronize(self._device)

    @torch.inference_mode()
    def encode(self, z: Tensor, tau: Tensor, label: Tensor) -> Features:
        self.check_batch(z.shape[0])
        d = self._device
        with self._amp():
            out = self._enc_fn(z.to(d).float(), tau.to(d).float(), label.to(d).long())
        return tuple(o.float() for o in out)

    def _amp(self):
        if self._autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self._device).type, dtype=self._autocast)

    @torch.inference_mode()
    def denoise(self, z: Tensor, t: Tensor, tau: Tensor, label: Tensor, features: Features) -> Tensor:
        self.check_batch(z.shape[0])
        d = self._device
        with self._amp():
            v = self._den_fn(z.to(d).float(), t.to(d).float(), tau.to(d).float(), label.to(d).long(),
                             *(f.to(d) for f in features))
        return v.float()
