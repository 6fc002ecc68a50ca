"""The GPU checks of the serving core, in one go (scripts/gpu_run.sh runs it; docs/gpu.md has the results).

    python scripts/gpu_check.py --out DIR [--only a,b] [--dry-run]

Each check writes its figures into DIR/gpu_check.json as it finishes (a time-out keeps what was measured), each with
the commit and the checkpoint hash:

1. quality: 16 whole images of the shipped checkpoint, compiled bf16 (and compiled fp32) against eager fp32, max
   pixel difference of 255;
2. bare-rgb64: the reference sampler's loop (z on the device, no host copy per step) at 256 images, N = 32, on a
   random 3x64x64 checkpoint: compiled bf16 + CUDA graphs, K = 4 and K = 1; also bf16 with weights cast
   (low_precision=weights) against autocast, to pick the faster;
3. service-rgb64: the HTTP service on the same checkpoint, 256 slots, compiled bf16, one captured graph per tick, the
   engine core in its own process; closed-loop clients in several load-generator processes; images/s against the
   bare loop of check 2;
4. bare-mnist / service-mnist: the same for the shipped checkpoint (fp32, CUDA graphs), 256 slots;
5. foreign: a pair that is not this project's (tests/export/foreign.py: eps, two features, 8x12 samples) as a
   torch.export program on the torch backend, compiled on the GPU, against the same weights as ONNX on ONNX Runtime
   (CPU): the largest pixel difference of 255 over 16 images.

`--dry-run` runs the same code paths on the CPU at the `tiny` preset (eager networks: compiling on two CPU cores
takes minutes; tests/engines cover compilation), 8 slots, short windows: a harness bug shows here, not on the GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualrate.checkpoint import DEFAULT_CHECKPOINT, checkpoint_hash, load_checkpoint
from dualrate.data import to_uint8
from dualrate.diffusion import CosineSchedule
from dualrate.init import init_checkpoint
from dualrate.provenance import git_commit
from dualrate.sampler import dual_rate_sample
from engines import create_engine
from engines.bench import bench_cell


class Run:
    """What one run measures with: device, sizes, windows (GPU or dry run)."""

    def __init__(self, dry: bool, out: Path) -> None:
        self.dry, self.out = dry, out
        self.device = "cpu" if dry else "cuda:0"
        self.slots = 8 if dry else 256
        self.seconds = 1.0 if dry else 8.0  # a dry run checks the harness, not the figures
        self.compile = not dry
        self.low = "fp32" if dry else "bf16"
        self.steps = 8 if dry else 32
        self.load_procs = 1 if dry else 4
        self.buckets = "4,8,16" if dry else "128,256,512"  # rows: a full batch is 2 x slots (guided)


def _loadgen(args: tuple[str, int, float, dict, int, int]) -> tuple[float, list[float]]:
    from loadtests.clients import closed_loop

    url, clients, seconds, body, num_classes, offset = args
    return asyncio.run(closed_loop(url, clients, seconds, body, num_classes, offset))


def load(url: str, clients: int, seconds: float, body: dict, num_classes: int, procs: int) -> tuple[float, float]:
    """Closed-loop clients split over `procs` load-generator processes (one Python process could not send enough
    requests at GPU rates). -> (images/s, p95 latency)."""
    share = [clients // procs + (i < clients % procs) for i in range(procs)]
    jobs = [(url, n, seconds, body, num_classes, sum(share[:i])) for i, n in enumerate(share)]
    if procs == 1:
        results = [_loadgen(jobs[0])]
    else:
        with mp.get_context("spawn").Pool(procs) as pool:
            results = pool.map(_loadgen, jobs)
    lat = sorted(x for _, ls in results for x in ls)
    return sum(ips for ips, _ in results), lat[int(0.95 * (len(lat) - 1))] if lat else float("nan")


def bare(run: Run, ck: Path, res: dict, name: str, ks: tuple[int, ...], precision: str, graphs: bool, compile: bool,
         low_precision: str = "autocast", buckets: str | None = None) -> None:
    """The bare loop at each K in `ks` on one engine (compiled once): res[f"{name}_k{K}_images_per_s"]."""
    model = load_checkpoint(ck)
    e = create_engine(ck, backend="torch", device=run.device, max_batch=2 * run.slots, precision=precision,
                      cuda_graphs=graphs and not run.dry, compile=compile,
                      buckets=tuple(int(b) for b in (buckets or run.buckets).split(",")), low_precision=low_precision)
    t0 = time.perf_counter()
    e.warmup()
    res[f"{name}_warmup_s"] = time.perf_counter() - t0  # compilation (and capture) of every bucket
    for k in ks:
        res[f"{name}_k{k}_images_per_s"] = bench_cell(e, model, run.slots, run.steps, k, model.defaults.guidance_scale,
                                                      run.seconds)
    e.close()


def service(run: Run, ck: Path, res: dict, name: str, settings: dict[str, Any], images_per_request: int = 4) -> float:
    from loadtests.process import ServerProcess

    model = load_checkpoint(ck)
    srv = ServerProcess(ck, run.out / f"service-{name}.log", backend="torch", device=run.device,
                        max_active_images=run.slots, max_images_per_request=images_per_request, queue_size=4096,
                        max_steps=max(256, run.steps), buckets=run.buckets, **settings)
    try:
        t0 = time.perf_counter()
        srv.wait_ready(600)
        res[f"{name}_start_s"] = time.perf_counter() - t0
        body = {"num_images": images_per_request, "steps": run.steps, "encoder_interval": 4,
                "guidance_scale": model.defaults.guidance_scale, "seed": 1}
        clients = 2 * run.slots // images_per_request
        load(srv.url, max(1, clients // 4), 1.0 if run.dry else 3.0, body, model.cfg.num_classes, 1)  # warm
        ips, p95 = load(srv.url, clients, run.seconds, body, model.cfg.num_classes, run.load_procs)
        res[f"{name}_images_per_s"], res[f"{name}_p95_latency_s"] = ips, p95
        res[f"{name}_clients"], res[f"{name}_images_per_request"] = clients, images_per_request
        res[f"{name}_exit_code"] = srv.terminate()
    finally:
        srv.terminate()
    return ips


def quality(run: Run, ck: Path, res: dict, n: int = 16) -> None:
    """Whole images: compiled bf16 / compiled fp32 against eager fp32, same seeds, max pixel difference."""
    model = load_checkpoint(ck)
    d = model.defaults
    sched = CosineSchedule(model.cfg.logsnr_min, model.cfg.logsnr_max)
    labels = torch.arange(n) % model.cfg.num_classes

    def draw(**opts: Any) -> torch.Tensor:
        e = create_engine(ck, backend="torch", device=run.device, max_batch=2 * n, buckets=(2 * n,), **opts)
        x, _ = dual_rate_sample(e.encode, e.denoise, labels, list(range(n)), d.steps, d.encoder_interval,
                                d.guidance_scale, sched, model.cfg.null_label, sample_shape=model.cfg.sample_shape,
                                device=e.device)
        return torch.from_numpy(to_uint8(x.cpu(), model.cfg.output_size)).int()

    ref = draw(precision="fp32")
    for tag, opts in (("compiled_fp32", {"precision": "fp32", "compile": run.compile}),
                      ("compiled_bf16", {"precision": "bf16", "compile": run.compile})):
        got = draw(**opts)
        res[f"quality_{tag}_max_pixel_diff_vs_eager_fp32"] = int((got - ref).abs().max())
        res[f"quality_{tag}_mean_pixel_diff_vs_eager_fp32"] = float((got - ref).abs().float().mean())


def foreign(run: Run, res: dict, n: int = 16) -> None:
    """A foreign torch.export pair, compiled, against its ONNX twin on ONNX Runtime: max pixel difference."""
    from export.card import read_spec
    from tests.export.foreign import write_model

    folders = {fmt: write_model(run.out / f"foreign-{fmt}", fmt) for fmt in ("onnx", "torch-export")}
    spec = read_spec(folders["onnx"])
    d = spec.defaults
    labels = torch.arange(n) % spec.num_classes

    def draw(fmt: str, **opts: Any) -> torch.Tensor:
        e = create_engine(folders[fmt], max_batch=2 * n, **opts)
        t0 = time.perf_counter()
        x, _ = dual_rate_sample(e.encode, e.denoise, labels, list(range(n)), d.steps, d.encoder_interval,
                                d.guidance_scale, spec.schedule(), spec.null_label, sample_shape=spec.sample_shape,
                                device=e.device, prediction=spec.diffusion.prediction)
        res[f"foreign_{fmt}_sample_seconds"] = time.perf_counter() - t0
        return torch.from_numpy(to_uint8(x.cpu(), spec.output_hw)).int()

    ref = draw("onnx", backend="onnxruntime", device="cpu")
    got = draw("torch-export", backend="torch", device=run.device, compile=run.compile, buckets=(2 * n,))
    res["foreign_torch_export_compiled" if run.compile else "foreign_torch_export_eager"] = True
    res["foreign_max_pixel_diff_vs_onnxruntime"] = int((got - ref).abs().max())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="the trained checkpoint (mnist)")
    p.add_argument("--out", type=Path, default=Path("artifacts/gpu_check"))
    p.add_argument("--only", default="", help="comma-separated checks (default: all): quality, bare-rgb64, "
                   "service-rgb64, bare-mnist, service-mnist, foreign")
    p.add_argument("--dry-run", action="store_true", help="the same code paths on the CPU at the tiny preset")
    a = p.parse_args()
    run = Run(a.dry_run, a.out)
    if not run.dry and not torch.cuda.is_available():
        print("no CUDA GPU visible to torch: nothing to check (--dry-run runs the harness on the CPU)")
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if not run.dry else "cpu (dry run)",
                           "torch": torch.__version__, "git_commit": git_commit(), "dry_run": run.dry,
                           "slots": run.slots, "steps": run.steps, "buckets": run.buckets}
    big = init_checkpoint("tiny" if run.dry else "rgb64", a.out / ("tiny-random" if run.dry else "rgb64-random"))
    small = init_checkpoint("tiny", a.out / "tiny-random") if run.dry else a.checkpoint
    res["rgb64_checkpoint_sha256"], res["mnist_checkpoint_sha256"] = checkpoint_hash(big), checkpoint_hash(small)
    fast = {"compile": "on" if run.compile else "off", "fused_tick": "on", "engine_process": "on"}

    def bare_big() -> None:
        bare(run, big, res, f"bare_rgb64_{run.low}", (4, 1), run.low, True, run.compile)
        res["bare_rgb64_k4_over_k1"] = res[f"bare_rgb64_{run.low}_k4_images_per_s"] / res[f"bare_rgb64_{run.low}_k1_images_per_s"]
        if not run.dry:  # weights cast to bf16 against autocast, one bucket (the full batch) to spare compile time
            bare(run, big, res, "bare_rgb64_bf16_weights", (4,), "bf16", True, True, low_precision="weights",
                 buckets=str(2 * run.slots))

    def service_big() -> None:
        ips = service(run, big, res, "service_rgb64", {**fast, "precision": run.low})
        if f"bare_rgb64_{run.low}_k4_images_per_s" in res:
            res["service_rgb64_vs_bare"] = ips / res[f"bare_rgb64_{run.low}_k4_images_per_s"]

    def bare_small() -> None:
        bare(run, small, res, "bare_mnist_fp32_graphs", (4,), "fp32", True, run.compile)

    def service_small() -> None:
        ips = service(run, small, res, "service_mnist", {**fast, "precision": "fp32"})
        if "bare_mnist_fp32_graphs_k4_images_per_s" in res:
            res["service_mnist_vs_bare"] = ips / res["bare_mnist_fp32_graphs_k4_images_per_s"]

    # The must-shows first: a time-out loses the last ones (quality is also measured on the CPU).
    checks = [("bare-rgb64", bare_big), ("service-rgb64", service_big), ("bare-mnist", bare_small),
              ("service-mnist", service_small), ("quality", lambda: quality(run, small, res)),
              ("foreign", lambda: foreign(run, res))]
    only = {x for x in a.only.split(",") if x}
    failed = False
    for name, fn in checks:
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # report and go on: one failed check must not hide the others
            res[f"{name}_error"] = repr(e)
            failed = True
            traceback.print_exc()
        res[f"{name}_seconds"] = time.perf_counter() - t0
        print(f"{name}: {res[f'{name}_seconds']:.1f} s", flush=True)
        (a.out / "gpu_check.json").write_text(json.dumps(res, indent=2))  # partial results survive a time-out
    (a.out / "gpu_check.json").write_text(json.dumps(res, indent=2))
    table = "\n".join(["| check | value |", "|---|---|"] +
                      [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in res.items()])
    (a.out / "gpu_check.md").write_text(table + "\n")
    print(table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
