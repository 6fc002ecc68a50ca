"""Compile the ONNX graphs into two TensorRT engines (one per network).

    python -m engines.build --checkpoint checkpoints/mnist-dualrate [--max-batch 64] [--opt-batch 16]

FP16 comes from the FP16 ONNX graphs built strongly typed (TensorRT 11 removed the FP16 builder flag). One
optimization profile over batch 1..max with an opt point, a timing cache, and an engine cache keyed by ONNX hash +
TensorRT version + GPU name (engines are specific to both).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

from engines.base import EngineError
from export.atomic import staged_folder, write_atomically

log = logging.getLogger("engines.build")
# Engines are specific to the GPU and TensorRT version: containers point this at a persistent volume.
ENGINE_ROOT = Path(os.environ.get("DUALRATE_ENGINE_CACHE", Path(__file__).resolve().parent.parent / "artifacts" / "engines"))


def engine_cache_key(onnx_paths: list[Path], trt_version: str, gpu_name: str, max_batch: int, opt_batch: int) -> str:
    """Engines depend on the graphs, the TensorRT version, the GPU and the profile: all go into the key."""
    h = hashlib.sha256()
    for p in onnx_paths:
        h.update(p.read_bytes())
        data = p.with_name(p.name + ".data")
        if data.exists():
            h.update(data.read_bytes())
    h.update(f"{trt_version}|{gpu_name}|{max_batch}|{opt_batch}".encode())
    return h.hexdigest()[:16]


def profile_shapes(inputs: list[dict], max_batch: int, opt_batch: int) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) per input from the sidecar's contract; only the batch axis is dynamic."""
    return {i["name"]: tuple((b, *i["shape"]) for b in (1, opt_batch, max_batch)) for i in inputs}


def build_engine(onnx_path: Path, inputs: list[dict], out: Path, max_batch: int, opt_batch: int,
                 timing_cache: Path) -> None:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise EngineError(f"TensorRT could not parse {onnx_path}: {'; '.join(errors)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 2 << 30)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes(inputs, max_batch, opt_batch).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
    config.set_timing_cache(cache, False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    out.write_bytes(bytes(serialized))
    write_atomically(timing_cache, bytes(config.get_timing_cache().serialize()))


def build_engines(onnx_dir: Path, max_batch: int = 64, opt_batch: int = 16, root: Path = ENGINE_ROOT) -> Path:
    """Build (or reuse) encoder.engine and denoiser.engine; returns their folder."""
    import tensorrt as trt
    import torch

    side = json.loads((onnx_dir / "onnx.json").read_text())
    nets = side.get("fp16") or {n: side[n] for n in ("encoder", "denoiser")}  # FP16 graphs where exported
    paths = [onnx_dir / nets[n]["file"] for n in ("encoder", "denoiser")]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "nogpu"
    key = engine_cache_key(paths, trt.__version__, gpu, max_batch, opt_batch)
    out = root / key
    if (out / "engines.json").is_file():  # written last: the engines beside it are whole
        log.info("TensorRT engines already built in %s", out)
        return out
    # Built in a staging folder and moved in, engines.json last: replicas sharing the cache volume, or a pod killed
    # mid-build, never leave a half-written engine for the next start to load.
    with staged_folder(out, "engines.json") as stage:
        for name, path in zip(("encoder", "denoiser"), paths, strict=True):
            log.info("building %s engine from %s (batch 1..%d, opt %d)", name, path.name, max_batch, opt_batch)
            build_engine(path, nets[name]["inputs"], stage / f"{name}.engine", max_batch, opt_batch,
                         root / "timing.cache")
        (stage / "engines.json").write_text(json.dumps({"tensorrt": trt.__version__, "gpu": gpu, "max_batch": max_batch,
                                                        "opt_batch": opt_batch, "onnx": str(onnx_dir)}, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    from dualrate.checkpoint import DEFAULT_CHECKPOINT
    from export import export_onnx

    p = argparse.ArgumentParser(prog="python -m engines.build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--opt-batch", type=int, default=16)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        log.error("TensorRT is not installed here; build engines in the GPU image (`docker compose up`)")
        return 3
    art = export_onnx(a.checkpoint, fp16=True)
    print(build_engines(art.directory, a.max_batch, a.opt_batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
