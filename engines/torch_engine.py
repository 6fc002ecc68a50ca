"""PyTorch backend on CPU or CUDA: eager, or compiled per batch bucket (`torch.compile`), with optional CUDA graphs.

On CUDA the encoder is enqueued on a dedicated stream; the denoiser, on the caller's stream, waits on a CUDA event
recorded after the encoder, so only the rows that need fresh features wait for them. With `compile` (Inductor) or
`cuda_graphs`, a call is padded up to the next batch bucket (engines.compiled.Buckets): one compiled graph and one
captured CUDA graph per bucket, all built by `warmup` at start-up.

Precision: fp32 (TF32 off on CUDA: the CPU's images), tf32 (CUDA), bf16/fp16 either under autocast (weights stay
fp32) or with the weights cast to the low precision (`low_precision="weights"`: inputs and features in that dtype
too; the time embedding's sinusoid stays fp32). The network callables the fused tick runner captures are
`network_calls()`: fixed-shape device tensors in, no padding, no host work.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dualrate.checkpoint import load_checkpoint
from engines.base import Backend, BackendUnavailable, Engine, EngineError, EngineInfo, Features, Precision
from engines.compiled import Buckets, compile_module, configure_inductor_cache
from export.card import ModelCard
from export.programs import ExportedNetwork, ProgramError

log = logging.getLogger("engines.torch")

NetCall = Callable[..., Any]


class LowPrecision(StrEnum):
    AUTOCAST = "autocast"  # torch.autocast: fp32 weights, matmuls and convs in bf16/fp16
    WEIGHTS = "weights"  # weights, inputs and features cast to bf16/fp16 (the time sinusoid stays fp32)


class _Padded:
    """Pads a call up to its batch bucket and cuts the result back: a compiled network sees only bucket shapes."""

    def __init__(self, fn: NetCall, buckets: Buckets) -> None:
        self.fn, self.buckets = fn, buckets

    def __call__(self, *args: Tensor):
        b = args[0].shape[0]
        n = self.buckets.bucket(b)
        out = self.fn(*(self.buckets.pad(a, n) for a in args))
        return tuple(o[:b] for o in out) if isinstance(out, tuple | list) else out[:b]


class _GraphRunner:
    """One CUDA graph per batch bucket for a network call with fixed-shape static inputs."""

    def __init__(self, fn: NetCall, buckets: Buckets) -> None:
        self.fn, self.buckets = fn, buckets
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, list[Tensor], Tensor | tuple[Tensor, ...]]] = {}

    def capture(self, bucket: int, like: tuple[Tensor, ...]) -> None:
        static = [torch.zeros((bucket, *a.shape[1:]), dtype=a.dtype, device=a.device) for a in like]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            self.fn(*static)  # warm up (and compile) outside the graph
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = self.fn(*static)
        self.graphs[bucket] = (g, static, out)

    def __call__(self, *args: Tensor):
        b = args[0].shape[0]
        bucket = self.buckets.bucket(b)
        if bucket not in self.graphs:
            self.capture(bucket, args)
        g, static, out = self.graphs[bucket]
        for s_in, a in zip(static, args, strict=True):
            s_in[:b].copy_(a)
        g.replay()
        if isinstance(out, tuple | list):
            return tuple(o[:b].clone() for o in out)
        return out[:b].clone()


def load_networks(folder: Path, spec: ModelCard) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The model folder's two networks as torch modules called in the contract's order."""
    if spec.format == "dualrate":
        model = load_checkpoint(folder)
        return model.encoder, model.denoiser
    if spec.format == "torch-export":
        try:
            return (ExportedNetwork(Path(folder) / "encoder.pt2", spec, "encoder"),
                    ExportedNetwork(Path(folder) / "denoiser.pt2", spec, "denoiser"))
        except ProgramError as e:
            raise EngineError(str(e)) from e
    raise EngineError(f"the torch backend runs formats dualrate and torch-export, not {spec.format!r}: serve an onnx "
                      "model with the onnxruntime backend")


class TorchEngine(Engine):
    PRECISIONS = frozenset(Precision)  # tf32 only on CUDA (checked below)

    def __init__(
        self, checkpoint: Path, spec: ModelCard, device: str = "cpu", max_batch: int = 64, cuda_graphs: bool = False,
        graph_buckets: tuple[int, ...] | None = None, precision: Precision = Precision.FP32, compile: bool = False,
        low_precision: LowPrecision | str = LowPrecision.AUTOCAST,
    ) -> None:
        super().__init__()
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable(f"device {device} asked for, but torch sees no CUDA GPU")
        encoder, denoiser = load_networks(checkpoint, spec)
        self.spec = spec
        self.sample_shape = spec.sample_shape
        self.max_batch = max_batch
        self._device = device
        precision = Precision(precision)
        if precision is Precision.TF32 and not device.startswith("cuda"):
            raise BackendUnavailable("precision tf32 needs a CUDA device (TF32 is a GPU tensor-core format)")
        self.precision = precision
        self.low_precision = LowPrecision(low_precision)
        low = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}.get(precision)
        # autocast: weights stay fp32, matmuls and convs run in the low precision; weights: everything in it.
        self._autocast = low if low is not None and self.low_precision is LowPrecision.AUTOCAST else None
        self.input_dtype = low if low is not None and self.low_precision is LowPrecision.WEIGHTS else torch.float32
        self.feature_dtype = self.input_dtype
        if device.startswith("cuda"):
            # cuDNN convolutions default to TF32 on Ampere and later; fp32 means fp32 (the first H100 run measured 4/255
            # pixel differences against ONNX Runtime with TF32 on). Process-wide flags: one engine per process.
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        self.encoder = encoder.to(device, self.input_dtype).eval()
        self.denoiser = denoiser.to(device, self.input_dtype).eval()
        self._encoder_stream = torch.cuda.Stream(device=device) if device.startswith("cuda") else None
        self.compiled = compile
        self.buckets = Buckets.for_batch(max_batch, graph_buckets)
        enc_net: NetCall = self.encoder
        den_net: NetCall = self.denoiser
        if compile:
            cache = configure_inductor_cache()
            log.info("compiling both networks with torch.compile for batch buckets %s (inductor cache %s)",
                     list(self.buckets.sizes), cache)
            enc_net, den_net = compile_module(self.encoder, device), compile_module(self.denoiser, device)
        self._enc_net, self._den_net = enc_net, den_net
        self._cuda_graphs = cuda_graphs and self._encoder_stream is not None
        wrap: Callable[[NetCall, Buckets], NetCall] | None = (
            _GraphRunner if self._cuda_graphs else _Padded if compile else None)
        enc_call, den_call = self.network_calls()
        self._enc_fn = wrap(enc_call, self.buckets) if wrap else enc_call
        self._den_fn = wrap(den_call, self.buckets) if wrap else den_call
        with torch.inference_mode():  # eager, at batch 1: no bucket is compiled or captured for it
            z = torch.zeros(1, *self.sample_shape, device=device, dtype=self.input_dtype)
            t = torch.full((1,), 0.5, device=device)
            y = torch.full((1,), spec.null_label, dtype=torch.long, device=device)
            self.feature_shapes = [tuple(f.shape[1:]) for f in self.encoder(z, t, y)]

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(Backend.TORCH, self._device, self.precision, (), self.max_batch)

    @property
    def device(self) -> str:
        return self._device

    def synchronize(self) -> None:
        if self._encoder_stream is not None:
            torch.cuda.synchronize(self._device)

    def _amp(self):
        if self._autocast is None:
            return contextlib.nullcontext()
        kind = torch.device(self._device).type
        # On CUDA the calls may be captured into CUDA graphs (per bucket, per tick), where autocast's cache of cast
        # weights must stay off (PyTorch's CUDA-graph notes); a compiled network casts inside its own graph anyway.
        return torch.autocast(kind, dtype=self._autocast, cache_enabled=kind != "cuda")

    def network_calls(self) -> tuple[NetCall, NetCall]:
        """(encode, denoise) on device tensors of any batch, in the engine's precision, nothing else: what the
        fused tick runner (service.core.fused) calls inside its captured graphs. encode(z, tau, label) -> features in
        `feature_dtype`; denoise(z, t, tau, label, *features) -> v (float32)."""

        def encode(z: Tensor, tau: Tensor, label: Tensor) -> Features:
            with self._amp():
                out = self._enc_net(z.to(self.input_dtype), tau, label)
            return tuple(o.to(self.feature_dtype) for o in out)

        def denoise(z: Tensor, t: Tensor, tau: Tensor, label: Tensor, *features: Tensor) -> Tensor:
            with self._amp():
                v = self._den_net(z.to(self.input_dtype), t, tau, label, *(f.to(self.input_dtype) for f in features))
            return v.float()

        return encode, denoise

    @torch.inference_mode()
    def encode(self, z: Tensor, tau: Tensor, label: Tensor) -> Features:
        self.check_batch(z.shape[0])
        d = self._device
        return tuple(self._enc_fn(z.to(d).float(), tau.to(d).float(), label.to(d).long()))

    @torch.inference_mode()
    def denoise(self, z: Tensor, t: Tensor, tau: Tensor, label: Tensor, features: Features) -> Tensor:
        self.check_batch(z.shape[0])
        d = self._device
        return self._den_fn(z.to(d).float(), t.to(d).float(), tau.to(d).float(), label.to(d).long(),
                            *(f.to(d) for f in features))

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 8), progress: Callable[[str], None] | None = None) -> None:
        """Eager: both networks once per batch size. Compiled or with CUDA graphs: every bucket, so that nothing is
        compiled or captured while serving; each bucket's time is logged (and passed to `progress`)."""
        if not (self.compiled or self._cuda_graphs):
            super().warmup(batch_sizes)
            return
        t_all = time.perf_counter()
        for i, b in enumerate(self.buckets.sizes):
            t0 = time.perf_counter()
            super().warmup((b,))
            msg = f"bucket {b} ({i + 1} of {len(self.buckets.sizes)}) ready in {time.perf_counter() - t0:.1f} s"
            log.info("%s networks: %s", "compiled" if self.compiled else "captured", msg)
            if progress is not None:
                progress(msg)
        log.info("all %d buckets ready in %.1f s", len(self.buckets.sizes), time.perf_counter() - t_all)
