"""Every CUDA check and benchmark in one go, for a machine with an NVIDIA GPU.

    python scripts/gpu_check.py [--out DIR]

1. torch backend on CUDA vs the CPU result (parity), with and without CUDA graphs;
2. the encoder-stream overlap at batch 32 and 256, measured with CUDA events: how much of the encoder's time hides behind the light
   network when the encoder runs on its own stream;
3. images/s at several batch sizes for K = 1 and K = 4, CUDA graphs off and on;
4. whole images: 16 images through the reference sampler on CUDA (graphs off and on) against ONNX Runtime on CPU,
   max pixel difference of 255;
5. the service on CUDA (torch backend, encoder on its stream; aligned admission on and off; CUDA graphs): the same seed
   alone and under concurrent load (max pixel difference), encoder_calls = ceil(steps / K), images/s at saturation
   against the bare engine loop on the same batch (graphs off and on);
6. the TensorRT path (build, parity, images/s) where `tensorrt` is importable;
7. scale / scale-rgb64: the service against the bare loop on the same batch, 64 and 256 slots, eager and CUDA graphs,
   for the shipped checkpoint and a random `rgb64` one (3x64x64), each figure with the checkpoint hash and commit.
Prints a short table at the end and writes it (plus json) under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualrate.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from dualrate.data import to_uint8
from dualrate.diffusion import CosineSchedule
from dualrate.sampler import dual_rate_sample
from engines import create_engine
from engines.bench import bench_cell


def rows(b: int, device: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    z, t = torch.randn(b, 1, 32, 32, generator=g), torch.rand(b, generator=g)
    tau, y = (t + 0.1).clamp(max=1), torch.randint(0, 11, (b,), generator=g)
    return tuple(x.to(device) for x in (z, t, tau, y))


def parity(ck: Path, results: dict) -> None:
    cpu = create_engine(ck, backend="torch", device="cpu", max_batch=64)
    z, t, tau, y = rows(16, "cpu")
    ref = cpu.denoise(z, t, tau, y, cpu.encode(z, tau, y))
    for graphs in (False, True):
        gpu = create_engine(ck, backend="torch", device="cuda:0", max_batch=64, cuda_graphs=graphs)
        zc, tc, tauc, yc = rows(16, "cuda:0")
        v = gpu.denoise(zc, tc, tauc, yc, gpu.encode_async(zc, tauc, yc).result()).cpu()
        results[f"parity_max_abs_err_graphs_{graphs}"] = float((v - ref).abs().max())


def overlap(ck: Path, results: dict, batch: int, reps: int = 50) -> None:
    """The encoder on its stream for `batch` rows while the light network runs two calls of `batch` rows."""
    e = create_engine(ck, backend="torch", device="cuda:0", max_batch=2 * batch)
    z, t, tau, y = rows(batch, "cuda:0")
    feats = e.encode(z, tau, y)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]

    def timed(fn) -> float:
        fn()
        torch.cuda.synchronize()
        ev[0].record()
        for _ in range(reps):
            fn()
        ev[1].record()
        torch.cuda.synchronize()
        return ev[0].elapsed_time(ev[1]) / reps

    t_enc = timed(lambda: e.encode(z, tau, y))
    t_den = timed(lambda: e.denoise(z, t, tau, y, feats))
    t_seq = timed(lambda: (e.encode(z, tau, y), e.denoise(z, t, tau, y, feats)))

    def concurrent() -> None:
        h = e.encode_async(z, tau, y)
        e.denoise(z, t, tau, y, feats)
        e.denoise(z, t, tau, y, h.result())

    t_par = timed(concurrent)
    hidden = max(0.0, (t_enc + 2 * t_den) - t_par) / t_enc
    results.update({f"b{batch}_encoder_ms": t_enc, f"b{batch}_denoiser_ms": t_den, f"b{batch}_enc_then_den_ms": t_seq,
                    f"b{batch}_enc_plus_2den_overlapped_ms": t_par, f"b{batch}_encoder_time_hidden": hidden})


def throughput(ck: Path, results: dict, backend: str = "torch", graphs: bool = False) -> None:
    """Whole images through the reference sampler (each step copies v to the host, which synchronizes)."""
    model = load_checkpoint(ck)
    steps, g = model.defaults.steps, model.defaults.guidance_scale
    e = create_engine(ck, backend=backend, device="cuda:0", max_batch=512, cuda_graphs=graphs)
    for b in (1, 16, 64, 256):
        for k in (1, 4):
            ips = bench_cell(e, model, b, steps, k, g, min_seconds=2.0)
            results[f"{backend}{'+graphs' if graphs else ''}_b{b}_k{k}_images_per_s"] = ips


def images(ck: Path, results: dict, n: int = 16) -> None:
    """Whole images, same seeds: torch on CUDA (graphs off/on, TF32) against ONNX Runtime on CPU, in pixels of 255.
    CUDA images are drawn twice: with the synchronous `encode`, and with the encoder on its own stream
    (`encode_async`, as the service calls it), so the stream path is checked on whole images too."""
    model = load_checkpoint(ck)
    d = model.defaults
    sched = CosineSchedule(model.cfg.logsnr_min, model.cfg.logsnr_max)
    labels = torch.arange(n) % 10

    def draw(engine, stream: bool = False) -> torch.Tensor:
        encode = (lambda z, tau, y: engine.encode_async(z, tau, y).result()) if stream else engine.encode
        x, _ = dual_rate_sample(encode, engine.denoise, labels, list(range(n)), d.steps, d.encoder_interval,
                                d.guidance_scale, sched, model.cfg.null_label)
        return torch.from_numpy(to_uint8(x)).int()

    ref = draw(create_engine(ck, backend="onnxruntime", device="cpu", max_batch=2 * n))
    for graphs, precision in ((False, "fp32"), (True, "fp32"), (False, "tf32")):
        engine = create_engine(ck, backend="torch", device="cuda:0", max_batch=2 * n, cuda_graphs=graphs,
                               precision=precision)
        for stream in (False, True):
            got = draw(engine, stream)
            key = f"images_{precision}_graphs_{graphs}{'_encoder_stream' if stream else ''}_max_pixel_diff_vs_ort_cpu"
            results[key] = int((got - ref).abs().max())
        engine.close()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # back to fp32 for what follows


def _png_diff(a: str, b: str) -> int:
    import base64
    import io

    import numpy as np
    from PIL import Image

    x, y = (np.asarray(Image.open(io.BytesIO(base64.b64decode(p)))).astype(int) for p in (a, b))
    return int(np.abs(x - y).max())


def service(ck: Path, results: dict, out: Path, name: str, settings: dict, slots: int = 64, seconds: float = 10.0) -> None:
    """The HTTP service on CUDA: determinism under load, encoder call count, images/s at saturation."""
    import asyncio
    import math

    import httpx

    from loadtests.service_bench import closed_loop, tick_breakdown
    from service.process import ServerProcess

    d = load_checkpoint(ck).defaults
    body = {"num_images": 1, "steps": d.steps, "encoder_interval": d.encoder_interval, "guidance_scale": d.guidance_scale}
    probe = {**body, "class_label": 3, "seed": 7}
    srv = ServerProcess(ck, out / f"service-{name.replace('+', '-')}.log", backend="torch", device="cuda:0", max_active_images=slots,
                        max_images_per_request=slots, queue_size=4096, **settings)
    try:
        srv.wait_ready(300)
        alone = httpx.post(f"{srv.url}/generate", json=probe, timeout=120).json()
        results[f"{name}_encoder_calls_ok"] = alone["encoder_calls"] == math.ceil(d.steps / d.encoder_interval)

        async def crowd() -> list[dict]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=300, limits=httpx.Limits(max_connections=None)) as c:
                rs = await asyncio.gather(*[c.post("/generate", json={**body, "class_label": i % 10, "seed": 1000 + i})
                                            for i in range(2 * slots)], c.post("/generate", json=probe))
            return [r.json() for r in rs]

        loaded = asyncio.run(crowd())
        # Bit-identical on CPU (tested); on CUDA the kernels chosen can depend on the batch size.
        results[f"{name}_alone_vs_under_load_max_pixel_diff"] = _png_diff(loaded[-1]["images"][0]["png_base64"],
                                                                           alone["images"][0]["png_base64"])
        (ips, lat), br = tick_breakdown(srv.url, lambda: asyncio.run(closed_loop(srv.url, 2 * slots, seconds, body)))
        results.update({f"{name}_{k}": v for k, v in br.items()})
        lat.sort()
        results[f"{name}_images_per_s"], results[f"{name}_p95_latency_s"] = ips, lat[int(0.95 * (len(lat) - 1))]
        results[f"{name}_exit_code"] = srv.terminate()
    finally:
        srv.terminate()


def bare_loop(ck: Path, results: dict, graphs: bool, slots: int = 64, seconds: float = 10.0, prefix: str = "") -> float:
    """The reference sampler on the same batch as the service's slots: the ceiling for the service."""
    model = load_checkpoint(ck)
    d = model.defaults
    engine = create_engine(ck, backend="torch", device="cuda:0", max_batch=2 * slots, cuda_graphs=graphs)
    ips = bench_cell(engine, model, slots, d.steps, d.encoder_interval, d.guidance_scale, min_seconds=seconds)
    results[f"{prefix}bare_engine{'+graphs' if graphs else ''}_b{slots}_images_per_s"] = ips
    engine.close()
    return ips


def scale(ck: Path, name: str, results: dict, out: Path, seconds: float = 8.0) -> None:
    """Service vs bare engine loop on the same batch, at 64 and 256 slots, eager and CUDA graphs, for one checkpoint:
    the service's share of the bare loop is the figure that says how much the serving machinery costs."""
    from dualrate.checkpoint import checkpoint_hash

    results[f"{name}_checkpoint_sha256"] = checkpoint_hash(ck)
    for slots in (64, 256):
        for graphs in (False, True):
            tag = f"{name}_b{slots}{'+graphs' if graphs else ''}"
            bare = bare_loop(ck, results, graphs, slots, seconds, prefix=f"{name}_")
            service(ck, results, out, tag, {"cuda_graphs": graphs}, slots=slots, seconds=seconds)
            results[f"{tag}_service_vs_bare"] = results[f"{tag}_images_per_s"] / bare


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--out", type=Path, default=Path("artifacts/gpu_check"))
    p.add_argument("--only", default="", help="comma-separated check names to run (default: all), e.g. bare,service")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU visible to torch: nothing to check")
        return 2
    from dualrate.init import init_checkpoint
    from dualrate.provenance import git_commit

    res: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "git_commit": git_commit()}
    ck = a.checkpoint
    steps = [("parity", lambda: parity(ck, res)), ("overlap32", lambda: overlap(ck, res, 32)),
             ("overlap256", lambda: overlap(ck, res, 256)),
             ("throughput", lambda: throughput(ck, res)), ("throughput+graphs", lambda: throughput(ck, res, graphs=True)),
             ("images", lambda: images(ck, res)),
             ("bare", lambda: bare_loop(ck, res, False)), ("bare+graphs", lambda: bare_loop(ck, res, True)),
             ("service", lambda: service(ck, res, a.out, "service", {})),
             ("service_unaligned", lambda: service(ck, res, a.out, "service_unaligned", {"align_encoder": False})),
             ("service+graphs", lambda: service(ck, res, a.out, "service+graphs", {"cuda_graphs": True})),
             ("scale", lambda: scale(ck, "mnist-small", res, a.out)),
             ("scale-rgb64", lambda: scale(init_checkpoint("rgb64", a.out / "rgb64-random"), "rgb64", res, a.out))]
    try:
        import tensorrt  # noqa: F401

        steps.append(("tensorrt", lambda: throughput(ck, res, backend="tensorrt")))
    except ImportError:
        res["tensorrt"] = "not installed"
    a.out.mkdir(parents=True, exist_ok=True)
    only = {x for x in a.only.split(",") if x}
    for name, fn in steps:
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # report and go on: one failed check must not hide the others
            res[f"{name}_error"] = repr(e)
            traceback.print_exc()
        print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
        (a.out / "gpu_check.json").write_text(json.dumps(res, indent=2))  # partial results survive a time-out
    (a.out / "gpu_check.json").write_text(json.dumps(res, indent=2))  # also when --only selected nothing
    table = "\n".join(["| check | value |", "|---|---|"] +
                      [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in res.items()])
    (a.out / "gpu_check.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
