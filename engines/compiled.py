"""Batch buckets and `torch.compile` for the torch backend.

A network call is padded up to the next bucket (`Buckets.pad`), so a compiled network sees a fixed set of static
shapes: Inductor (Triton kernels on CUDA, C++ on the CPU) compiles each once, at start-up (`TorchEngine.warmup`),
and CUDA graphs can capture each. Inductor's caches live under the same cache folder as the ONNX export
(`<DUALRATE_ONNX_CACHE or artifacts/onnx>/inductor`), so a restart with the same checkpoint, code and torch loads
the kernels instead of compiling them again.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("engines.compiled")


@dataclass(frozen=True)
class Buckets:
    """Batch sizes a network is compiled (and graph-captured) for, ascending; the largest covers max_batch."""

    sizes: tuple[int, ...]

    @classmethod
    def for_batch(cls, max_batch: int, sizes: Sequence[int] | None = None) -> Buckets:
        """`sizes` (default: powers of two) cut to <= max_batch, with max_batch itself added so every call fits."""
        wanted = sizes if sizes else [1 << i for i in range(max_batch.bit_length() + 1)]
        kept = sorted({b for b in wanted if 1 <= b < max_batch} | {max_batch})
        return cls(tuple(kept))

    def bucket(self, n: int) -> int:
        """The smallest bucket holding n rows."""
        for b in self.sizes:
            if b >= n:
                return b
        raise ValueError(f"{n} rows exceed the largest bucket {self.sizes[-1]}")

    def pad(self, x: Tensor, to: int) -> Tensor:
        """x padded along dim 0 to `to` rows by repeating its last row (valid inputs: no NaN/inf from zeros)."""
        n = x.shape[0]
        if n == to:
            return x
        return torch.cat([x, x[-1:].expand(to - n, *x.shape[1:])])


def inductor_cache_dir() -> Path:
    """<ONNX export cache root>/inductor (DUALRATE_ONNX_CACHE or artifacts/onnx): one cache folder for the service."""
    from export import onnx_cache_root

    return onnx_cache_root() / "inductor"


def configure_inductor_cache(path: Path | None = None) -> Path:
    """Point Inductor's on-disk caches (FX graphs, kernels, Triton) at `path` (default: `inductor_cache_dir()`)
    before the first compile. (Inductor writes its own default into TORCHINDUCTOR_CACHE_DIR the first time it
    looks, e.g. during an ONNX export, so that variable cannot tell an operator's choice; DUALRATE_ONNX_CACHE can.)"""
    from export import writable_folder

    path = Path(path or inductor_cache_dir())
    if not writable_folder(path):  # a read-only image with the export baked in: compile into the temp folder instead
        fallback = Path(tempfile.gettempdir()) / "dualrate-inductor"
        log.warning("inductor cache %s is not writable: using %s, so a restart compiles again unless "
                    "DUALRATE_ONNX_CACHE names a writable folder (a volume)", path, fallback)
        path = fallback
        path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    os.environ["TRITON_CACHE_DIR"] = str(path / "triton")
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    # One compiled graph per (network, bucket): raise dynamo's per-function recompile limit above the bucket count.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return path


def compile_module(module: torch.nn.Module, device: str) -> torch.nn.Module:
    """`torch.compile` with static shapes (one graph per bucket). On CUDA: diffusion-fast's flag for conv nets (1x1
    convs as matmuls); its coordinate-descent tuning is left off (it multiplies the compile time of every bucket at
    start-up; not measured here). CUDA graphs are captured by the engine and the tick runner themselves, not by
    inductor."""
    if device.startswith("cuda"):
        import torch._inductor.config as inductor_config

        inductor_config.conv_1x1_as_mm = True
    return torch.compile(module, dynamic=False, fullgraph=True)  # type: ignore[return-value]
