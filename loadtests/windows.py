"""Saturation in short alternating windows: the bare loop and one warm service take turns over the same images.

    python -m loadtests.windows --windows 30 [--window-batches 4] [--core] [--client lean] [--client-nice 19]

This machine's speed drifts by 10-25% over tens of seconds (docs/cpu_backends.md); windows of a few seconds put both
sides of each pair in the same drift. `--core` adds the service's own scheduler and engine driven in this process
without HTTP, in the same windows. (Runs before 2026-12-06 ran this as `python -m loadtests.service_bench --windows`,
which still forwards here.)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import httpx
import torch

from dualrate.checkpoint import load_checkpoint
from dualrate.diffusion import CosineSchedule
from dualrate.provenance import command_line, provenance, publish, utc_stamp
from dualrate.sampler import dual_rate_sample
from engines import create_engine
from loadtests.bare import log_progress, saturation_args, saturation_body
from loadtests.clients import core_requests, fixed_requests, httpx_post, lean_post
from loadtests.lean_http import LeanConnection
from loadtests.process import ServerProcess

log = logging.getLogger("loadtests.windows")


def alternating(a: argparse.Namespace, argv: list[str] | None) -> None:
    """Saturation in short alternating windows: the bare loop and one warm service (its defaults) take turns over the
    same number of images (`a.window_batches` batches of `a.slots`), `a.windows` times, with nothing restarted in
    between. This machine's speed drifts by 10-25% over tens of seconds (docs/cpu_backends.md); windows of a few
    seconds put both sides of each pair in the same drift, which 20 s rounds with a restart in between did not."""
    model = load_checkpoint(a.checkpoint)
    d, cfg = model.defaults, model.cfg
    body = saturation_body(a.checkpoint)
    engine = create_engine(a.checkpoint, backend="onnxruntime", device="cpu", max_batch=2 * a.slots)
    sched = CosineSchedule(cfg.logsnr_min, cfg.logsnr_max)
    labels = torch.arange(a.slots) % cfg.num_classes
    images = a.window_batches * a.slots

    def bare() -> float:
        t0 = time.perf_counter()
        for _ in range(a.window_batches):
            dual_rate_sample(engine.encode, engine.denoise, labels, list(range(a.slots)), d.steps, d.encoder_interval,
                             d.guidance_scale, sched, cfg.null_label, sample_shape=cfg.sample_shape)
        return images / (time.perf_counter() - t0)

    srv = ServerProcess(a.checkpoint, Path("/tmp/dualrate-bench-alternating.log"), max_active_images=a.slots,
                        max_images_per_request=a.slots, queue_size=1024)
    core = None
    if a.core:  # the service's own engine and scheduler, built as the server builds them, in this process
        from service.core import CoreStats, build_core
        from service.settings import Settings

        settings = Settings(checkpoint=a.checkpoint, max_active_images=a.slots, max_images_per_request=a.slots,
                            queue_size=1024)
        core = build_core(settings.core_config(settings.model_card()), CoreStats())
    pairs: list[dict[str, float]] = []

    async def run() -> None:
        async with httpx.AsyncClient(base_url=srv.url, timeout=300, limits=httpx.Limits(max_connections=None)) as c:
            conns = [LeanConnection(srv.url) for _ in range(2 * a.slots)] if a.client == "lean" else []
            post = lean_post(conns) if a.client == "lean" else httpx_post(c)
            bare()
            await fixed_requests(post, images, 2 * a.slots, body, cfg.num_classes)  # warm-up of all, not counted
            if core is not None:
                core_requests(core.loop, images, 2 * a.slots, body, cfg.num_classes)
            for i in range(a.windows):
                b = bare()  # blocks the event loop: no request is in flight meanwhile
                row = {"window": i + 1, "bare_images_per_s": b}
                if core is not None and i % 2:  # the core before the service in odd windows, after it in even ones
                    row["core_images_per_s"] = core_requests(core.loop, images, 2 * a.slots, body, cfg.num_classes)
                svc = await fixed_requests(post, images, 2 * a.slots, body, cfg.num_classes)
                if core is not None and not i % 2:
                    row["core_images_per_s"] = core_requests(core.loop, images, 2 * a.slots, body, cfg.num_classes)
                row.update(service_images_per_s=svc, ratio=svc / b)
                if core is not None:
                    row["core_ratio"] = row["core_images_per_s"] / b
                pairs.append(row)
                log.info("window %d: bare %.2f, service %.2f images/s (%.3f)%s", i + 1, b, svc, svc / b,
                         f"; core in-process {row['core_ratio']:.3f}" if core is not None else "")
            for conn in conns:
                await conn.close()

    try:
        srv.wait_ready()
        if a.client_nice:
            os.nice(a.client_nice)  # after the server started: it keeps the default priority
        asyncio.run(run())
    finally:
        srv.terminate()
        engine.close()
        if core is not None:
            core.loop.shutdown(10)
            core.engine.close()
    ratios = sorted(p["ratio"] for p in pairs)
    median = statistics.median(ratios)
    q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
    command = command_line("python -m loadtests.windows", argv)
    lines = [f"### Saturation in alternating windows, bare loop and service, {utc_stamp()}, {platform.machine()} CPU, "
             "onnxruntime", "", f"Command: `{command}`", "",
             f"Requests: 1 image, N = {d.steps}, K = {d.encoder_interval}, guidance {d.guidance_scale}; {a.slots} slots "
             f"({2 * a.slots} closed-loop clients), bare loop on the same batch; each window {images} images (bare: "
             f"{a.window_batches} batches; service: {images} requests), in turn {a.windows} times, all warm; "
             f"load generator ({a.client} client; it and the bare loop at nice {a.client_nice}). "
             f"**Median service / bare: {median:.3f}** (quartiles {q1:.3f}-{q3:.3f}, windows {ratios[0]:.3f}-"
             f"{ratios[-1]:.3f}).", ""]
    raw = {**provenance(a.checkpoint, command), "slots": a.slots, "window_images": images, "request": body,
           "client_nice": a.client_nice, "client": a.client, "windows": pairs, "median_ratio": median}
    if core is not None:
        cr = sorted(p["core_ratio"] for p in pairs)
        raw["median_core_ratio"] = statistics.median(cr)
        lines[-2] += (f" The same scheduler and engine driven in this process without HTTP (`--core`: the same "
                      f"closed loop straight into `Scheduler.submit`, in the same windows): **median core / bare "
                      f"{raw['median_core_ratio']:.3f}** (quartiles {cr[len(cr) // 4]:.3f}-{cr[(3 * len(cr)) // 4]:.3f}).")
        lines += ["| window | bare engine images/s | core in-process images/s | service images/s | core / bare | "
                  "service / bare |", "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {p['window']} | {p['bare_images_per_s']:.2f} | {p['core_images_per_s']:.2f} | "
                  f"{p['service_images_per_s']:.2f} | {p['core_ratio']:.3f} | {p['ratio']:.3f} |" for p in pairs]
    else:
        lines += ["| window | bare engine images/s | service images/s | service / bare |", "|---:|---:|---:|---:|"]
        lines += [f"| {p['window']} | {p['bare_images_per_s']:.2f} | {p['service_images_per_s']:.2f} | "
                  f"{p['ratio']:.3f} |" for p in pairs]
    publish(lines, a.out, raw)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.windows", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    saturation_args(p)
    p.add_argument("--windows", type=int, required=True,
                   help="bare loop and one warm service alternately in this many short windows of the same images "
                        "(median ratio; drift of the machine cancels within a pair)")
    p.add_argument("--window-batches", type=int, default=4, help="batches of --slots per window")
    p.add_argument("--core", action="store_true",
                   help="also the service's scheduler and engine in this process without HTTP, in the same windows "
                   "(what of the gap is the scheduler, what the HTTP side)")
    p.add_argument("--client", choices=("httpx", "lean"), default="httpx",
                   help="the load generator's HTTP client: httpx, or loadtests.lean_http (one kept-alive socket per "
                   "client, less CPU per request on the cores the service shares)")
    p.add_argument("--client-nice", type=int, default=0,
                   help="niceness of this process (the load generator, and the bare loop, which runs alone) after the "
                   "server has started; 19 makes the load generator take mostly the cores the service leaves idle, a "
                   "stand-in for clients on other machines (default 0: as the service)")
    a = p.parse_args(argv)
    log_progress()
    alternating(a, argv)


if __name__ == "__main__":
    main()
