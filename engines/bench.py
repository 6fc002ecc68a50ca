"""CPU benchmark of the engines: images/s per backend at several batch sizes for K = 1 and K = 4, side by side.

    python -m engines.bench [--batches 1 8 32] [--steps 32] [--out docs/engine_bench.md]

Each cell runs the reference dual-rate sampler (default guidance, so two rows per image) over whole images and
reports images/s and the achieved model FLOP/s, against this machine's measured fp32 and bf16 matmul peak.
"""

from __future__ import annotations

import argparse
import logging
import platform
import time
from pathlib import Path

import torch

from dualrate.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from dualrate.diffusion import CosineSchedule
from dualrate.nets import per_image_flops
from dualrate.provenance import command_line, provenance, publish, utc_stamp
from dualrate.sampler import dual_rate_sample
from engines.factory import create_engine

log = logging.getLogger("engines.bench")


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """Measured GFLOP/s of a square matmul on this machine."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def bench_cell(engine, model, batch: int, steps: int, k: int, g: float, min_seconds: float) -> float:
    """images/s of the reference sampler over whole images of `batch`, with z on the engine's device (no host copy
    per step), labels over the model's classes."""
    sched = CosineSchedule(model.cfg.logsnr_min, model.cfg.logsnr_max)
    labels = torch.arange(batch) % model.cfg.num_classes

    def run() -> None:
        dual_rate_sample(engine.encode, engine.denoise, labels, list(range(batch)), steps, k, g, sched,
                         model.cfg.null_label, sample_shape=model.cfg.sample_shape, device=engine.device)
        engine.synchronize()

    run()  # warm
    n, t0 = 0, time.perf_counter()
    while True:
        run()
        n += batch
        if time.perf_counter() - t0 >= min_seconds:
            return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m engines.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--intervals", type=int, nargs="+", default=[1, 4])
    p.add_argument("--steps", type=int, default=None, help="default: the model card's")
    p.add_argument("--backends", nargs="+", default=["onnxruntime", "torch", "torch-bf16"],
                   help="backend[+compile][-precision]: e.g. onnxruntime, torch, torch+compile, torch+compile-bf16")
    p.add_argument("--min-seconds", type=float, default=3.0, help="time per cell")
    p.add_argument("--out", type=Path, default=None, help="append the markdown table to this file")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model = load_checkpoint(a.checkpoint)
    steps = a.steps or model.defaults.steps
    g = model.defaults.guidance_scale
    enc_f, den_f = per_image_flops(model.cfg)
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    rows = []
    for name in a.backends:
        backend, precision = [*name.split("-"), "fp32"][:2]
        backend, _, flag = backend.partition("+")
        # Compiled: one bucket per measured batch (a guided image takes two rows), each compiled before it is timed.
        engine = create_engine(a.checkpoint, backend=backend, device="cpu", max_batch=2 * max(a.batches),
                               precision=precision, compile=flag == "compile",
                               buckets=tuple(sorted({2 * b for b in a.batches})))
        t0 = time.perf_counter()
        engine.warmup()
        log.info("%s: warm-up (compilation where compiled) %.1f s", name, time.perf_counter() - t0)
        for b in a.batches:
            for k in a.intervals:
                ips = bench_cell(engine, model, b, steps, k, g, a.min_seconds)
                calls = -(-steps // k)
                flops = 2 * (calls * enc_f + steps * den_f)  # guided: two rows per image
                rows.append((name, b, k, ips, ips * flops / 1e9))
                log.info("%s batch %d K=%d: %.2f images/s (%.1f GFLOP/s)", name, b, k, ips, ips * flops / 1e9)
        engine.close()
    stamp = utc_stamp()
    lines = [f"### Engine benchmark, {stamp}, {platform.machine()} CPU, {torch.get_num_threads()} threads",
             "", f"Command: `{command_line('python -m engines.bench', argv)}`", "",
             f"Reference sampler, N = {steps} steps, guidance {g} (2 rows per image). Measured matmul peak: "
             f"fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s.", "",
             "| backend | batch | K | images/s | K=4 / K=1 | model GFLOP/s | % of fp32 peak |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    base = {(r[0], r[1]): r[3] for r in rows if r[2] == 1}
    for name, b, k, ips, gf in rows:
        speedup = f"{ips / base[(name, b)]:.2f}x" if (name, b) in base and k != 1 else ""
        lines.append(f"| {name} | {b} | {k} | {ips:.2f} | {speedup} | {gf:.1f} | {100 * gf / peak32:.0f}% |")
    command = command_line("python -m engines.bench", argv)
    raw = {**provenance(a.checkpoint, command), "threads": torch.get_num_threads(), "steps": steps,
           "guidance_scale": g, "matmul_peak_gflops": {"fp32": peak32, "bf16": peak16},
           "cells": [{"backend": n, "batch": b, "k": k, "images_per_s": ips, "model_gflops": gf}
                     for n, b, k, ips, gf in rows]}
    publish(lines, a.out, raw)


if __name__ == "__main__":
    main()
