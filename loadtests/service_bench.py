"""Service benchmark: the HTTP service against the bare engine loop, batching gains, continuous vs request-level.

    python -m loadtests.service_bench [--seconds 20] [--out docs/runs/service_bench.md]

(Saturation alone has modules of its own: loadtests.saturation, loadtests.interleaved, loadtests.windows.)

1. Saturation: many concurrent clients keep every batch slot busy; images/s of the service against the bare engine
   loop (the reference sampler on the same batch size, no HTTP, no scheduler).
2. 16 concurrent single-image clients against one sequential client, beside the bare engine's batch-1 and batch-16
   images/s (the ceiling batching can reach on this CPU).
3. A mix of short and long requests at a fixed arrival rate: p50/p95 latency under continuous (step-level) and
   request-level batching, from one run.

What streaming clients cost the others is measured by `python -m loadtests.stream_cost` (runs 5-8 in
docs/runs/service_bench.md used an earlier `--stream-cost` mode of this module, which restarted the clients every round).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import platform
import statistics
import sys
from pathlib import Path

import torch

from dualrate.checkpoint import load_checkpoint
from dualrate.provenance import command_line, provenance, publish, utc_stamp
from loadtests.bare import bare_engine_ips, saturation_args
from loadtests.clients import (
    closed_loop,
    open_loop_mix,
    pct,
)
from loadtests.process import ServerProcess

log = logging.getLogger("loadtests.service_bench")


# The experiments this module ran before they got modules of their own: their flags forward there, so the commands in
# docs/cpu_backends.md and docs/runs/service_bench.md still run.
MOVED = {"--windows": "loadtests.windows", "--pairs": "loadtests.interleaved", "--saturation": "loadtests.saturation"}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    moved = next((module for flag, module in MOVED.items() if any(x == flag or x.startswith(flag + "=") for x in args)),
                 None)
    if moved is not None:
        log.warning("that experiment is python -m %s now: running it", moved)
        importlib.import_module(moved).main(args)
        return
    p = argparse.ArgumentParser(prog="python -m loadtests.service_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    saturation_args(p)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = load_checkpoint(a.checkpoint)
    d = model.defaults
    body = {"num_images": 1, "steps": d.steps, "encoder_interval": d.encoder_interval,
            "guidance_scale": d.guidance_scale}
    res: dict[str, float] = {}
    log.info("bare engine loop at batch 1, 16 and %d", a.slots)
    for b in sorted({1, 16, a.slots}):
        res[f"bare_b{b}"] = bare_engine_ips(a.checkpoint, b, d.steps, d.encoder_interval, d.guidance_scale, a.seconds)
        log.info("bare engine batch %d: %.2f images/s", b, res[f"bare_b{b}"])
    lat: dict[str, dict[str, list[float]]] = {}
    for policy in ("continuous", "request"):
        srv = ServerProcess(a.checkpoint, Path(f"/tmp/dualrate-bench-{policy}.log"), max_active_images=a.slots,
                            max_images_per_request=a.slots, queue_size=1024, policy=policy)
        try:
            srv.wait_ready()
            if policy == "continuous":
                res["svc_sat"], _ = asyncio.run(closed_loop(srv.url, 2 * a.slots, a.seconds, body))
                res["svc_c16"], _ = asyncio.run(closed_loop(srv.url, 16, a.seconds, body))
                res["svc_c1"], _ = asyncio.run(closed_loop(srv.url, 1, a.seconds, body))
                log.info("service: saturated %.2f, 16 clients %.2f, 1 client %.2f images/s",
                         res["svc_sat"], res["svc_c16"], res["svc_c1"])
            short = {"num_images": 1, "steps": 8, "encoder_interval": 4, "guidance_scale": d.guidance_scale}
            long = {"num_images": 4, "steps": 64, "encoder_interval": 4, "guidance_scale": d.guidance_scale}
            rate = 0.6 * res["svc_sat" if "svc_sat" in res else "bare_b16"] / (0.8 * 8 / d.steps + 0.2 * 4 * 64 / d.steps)
            lat[policy] = asyncio.run(open_loop_mix(srv.url, 2 * a.seconds, rate, short, long, 0.2,
                                                         num_classes=model.cfg.num_classes))
            log.info("%s mix: short p95 %.2f s, long p95 %.2f s", policy, pct(lat[policy]["short"], 0.95),
                     pct(lat[policy]["long"], 0.95))
        finally:
            srv.terminate()
    stamp = utc_stamp()
    sat_ratio = res["svc_sat"] / res[f"bare_b{a.slots}"]
    lines = [
        f"### Service benchmark, {stamp}, {platform.machine()} CPU ({torch.get_num_threads()} threads), onnxruntime",
        "", f"Command: `{command_line('python -m loadtests.service_bench', argv)}`", "",
        f"Requests: 1 image, N = {d.steps}, K = {d.encoder_interval}, guidance {d.guidance_scale}; "
        f"service max_active_images = {a.slots}; {a.seconds:.0f} s per measurement.", "",
        "| measurement | images/s | ratio |", "|---|---:|---:|",
        f"| bare engine loop, batch {a.slots} | {res[f'bare_b{a.slots}']:.2f} | |",
        f"| service at saturation ({2 * a.slots} clients) | {res['svc_sat']:.2f} | {sat_ratio:.2f} of bare |",
        f"| bare engine, batch 1 | {res['bare_b1']:.2f} | |",
        f"| bare engine, batch 16 | {res['bare_b16']:.2f} | {res['bare_b16'] / res['bare_b1']:.2f}x batch 1 (ceiling) |",
        f"| service, 1 sequential client | {res['svc_c1']:.2f} | |",
        f"| service, 16 concurrent clients | {res['svc_c16']:.2f} | {res['svc_c16'] / res['svc_c1']:.2f}x 1 client |",
        "", "Mixed load (80% short: 1 image, 8 steps; 20% long: 4 images, 64 steps; Poisson arrivals at ~60% of "
        "capacity), latency in seconds:", "",
        "| policy | short p50 | short p95 | long p50 | long p95 | all p95 | requests |", "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for policy, by_kind in lat.items():
        sh, lo = by_kind["short"], by_kind["long"]
        lines.append(f"| {policy} | {statistics.median(sh):.2f} | {pct(sh, 0.95):.2f} | {statistics.median(lo):.2f} | "
                     f"{pct(lo, 0.95):.2f} | {pct(sh + lo, 0.95):.2f} | {len(sh) + len(lo)} |")
    command = command_line("python -m loadtests.service_bench", argv)
    raw = {**provenance(a.checkpoint, command), "slots": a.slots, "seconds": a.seconds, "request": body,
           "images_per_s": res, "mixed_latencies_s": lat}
    publish(lines, a.out, raw)


if __name__ == "__main__":
    main()
