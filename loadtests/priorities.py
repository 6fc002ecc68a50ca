"""Interactive requests beside a batch flood, with priorities (preemption at the encoder boundary) on and off.

    python -m loadtests.priorities [--seconds 40] [--slots 8] [--out docs/priorities.md]

One real server per arm (DUALRATE_PRIORITIES=true / false), the shipped checkpoint on ONNX Runtime. First the
capacity (images/s of closed-loop default requests) and the latency of a lone interactive request on the idle
service. Then, for each arm: Poisson arrivals of batch requests (2 images, the card's steps and K) at 1.5x capacity
and of interactive single-image requests at 10% of capacity for `--seconds`; then arrivals stop and the backlog is
run to the end, so that every accepted request finishes. Reports the interactive p50/p99 latency (and its ratio to
the idle latency), the batch goodput (batch images finished inside the window per second), preemptions per second,
and the work done per image: encoder and light-network rows over the run against what the finished requests need
without any recomputation (equal = no work lost).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import platform
import random
import time
from pathlib import Path

import httpx

from dualrate.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from dualrate.provenance import command_line, provenance, publish, utc_stamp
from loadtests.clients import closed_loop, pct
from loadtests.process import ServerProcess, metric

log = logging.getLogger("loadtests.priorities")


def rows_needed(n_images: int, steps: int, k: int) -> tuple[int, int]:
    """(encoder rows, light-network rows) of n guided images run without recomputation: two rows each."""
    return 2 * n_images * math.ceil(steps / k), 2 * n_images * steps


async def arm(url: str, seconds: float, capacity: float, batch: dict, inter: dict, seed: int) -> dict:
    rng = random.Random(seed)
    lat: dict[str, list[float]] = {"batch": [], "interactive": []}
    done_in_window = {"batch": 0, "interactive": 0}
    finished = {"batch": 0, "interactive": 0}  # images, window and backlog
    refused: dict[int, int] = {}
    t_start = time.monotonic()
    stop = t_start + seconds

    async def one(c: httpx.AsyncClient, kind: str, body: dict) -> None:
        t0 = time.monotonic()
        r = await c.post("/generate", json=body)
        if r.status_code != 200:
            refused[r.status_code] = refused.get(r.status_code, 0) + 1
            return
        t1 = time.monotonic()
        lat[kind].append(t1 - t0)
        finished[kind] += body["num_images"]
        if t1 <= stop:
            done_in_window[kind] += body["num_images"]

    async def arrivals(c: httpx.AsyncClient, kind: str, body: dict, images_per_s: float, tasks: list) -> None:
        rate = images_per_s / body["num_images"]  # requests per second
        while (now := time.monotonic()) < stop:
            tasks.append(asyncio.create_task(one(c, kind, {**body, "seed": rng.randrange(2**31)})))
            await asyncio.sleep(min(rng.expovariate(rate), max(0.0, stop - now)))

    tasks: list[asyncio.Task] = []
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=httpx.Limits(max_connections=None)) as c:
        before = (await c.get("/metrics")).text
        await asyncio.gather(arrivals(c, "batch", batch, 1.5 * capacity, tasks),
                             arrivals(c, "interactive", inter, 0.1 * capacity, tasks))
        window = time.monotonic() - t_start
        at_stop = (await c.get("/metrics")).text
        await asyncio.gather(*tasks)
        backlog_s = time.monotonic() - t_start - window
        after = (await c.get("/metrics")).text
    enc_need = sum(rows_needed(finished[k], b["steps"], b["encoder_interval"])[0] for k, b in
                   (("batch", batch), ("interactive", inter)))
    den_need = sum(rows_needed(finished[k], b["steps"], b["encoder_interval"])[1] for k, b in
                   (("batch", batch), ("interactive", inter)))

    def delta(name: str, labels: str = "", end: str = after) -> float:
        return metric(end, name, labels) - metric(before, name, labels)

    return {
        "window_s": window, "backlog_s": backlog_s, "requests_refused": refused,
        "interactive_requests": len(lat["interactive"]), "batch_requests": len(lat["batch"]),
        "interactive_p50_s": pct(lat["interactive"], 0.5), "interactive_p99_s": pct(lat["interactive"], 0.99),
        "batch_p50_s": pct(lat["batch"], 0.5),
        "batch_goodput_images_per_s": done_in_window["batch"] / window,
        "interactive_images_per_s": done_in_window["interactive"] / window,
        "preemptions": delta("dualrate_preemptions_total"),
        "preemptions_per_s": delta("dualrate_preemptions_total", end=at_stop) / window,
        "encoder_rows": delta("dualrate_network_rows_total", 'network="encoder"'), "encoder_rows_needed": enc_need,
        "denoiser_rows": delta("dualrate_network_rows_total", 'network="denoiser"'), "denoiser_rows_needed": den_need,
        "interactive_latencies_s": lat["interactive"],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.priorities", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--seconds", type=float, default=40.0, help="arrivals per arm (the backlog then runs out)")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--interactive-images", type=int, default=1,
                   help="images per interactive request (1 is a small request, which the reserved slots already "
                   "favour; more makes it a large one)")
    p.add_argument("--out", type=Path, default=None, help="append the report here (raw JSON beside it)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request would cost the load generator CPU
    d = load_checkpoint(a.checkpoint).defaults
    batch = {"class_label": 3, "num_images": 2, "steps": d.steps, "encoder_interval": d.encoder_interval,
             "priority": "batch"}
    inter = {"class_label": 5, "num_images": a.interactive_images, "steps": d.steps, "encoder_interval": d.encoder_interval,
             "priority": "interactive"}
    settings = {"max_active_images": a.slots, "max_images_per_request": a.slots, "queue_size": 4096,
                "max_timeout_s": 900, "default_timeout_s": 900}
    results: dict = {}
    for name, on in (("priorities on", True), ("priorities off", False)):
        srv = ServerProcess(a.checkpoint, Path(f"/tmp/dualrate-priorities-{on}.log"), priorities=on, **settings)
        try:
            srv.wait_ready()
            if "capacity" not in results:
                body = {k: v for k, v in inter.items() if k != "priority"} | {"num_images": 1}
                results["capacity"], _ = asyncio.run(closed_loop(srv.url, 2 * a.slots, 15, body))
                idle = []
                for i in range(10):
                    t0 = time.monotonic()
                    httpx.post(f"{srv.url}/generate", json={**inter, "seed": i}, timeout=60).raise_for_status()
                    idle.append(time.monotonic() - t0)
                results["idle_interactive_p50_s"], results["idle_interactive_max_s"] = pct(idle, 0.5), max(idle)
                log.info("capacity %.2f images/s; idle interactive latency p50 %.3f s", results["capacity"],
                         results["idle_interactive_p50_s"])
            results[name] = asyncio.run(arm(srv.url, a.seconds, results["capacity"], batch, inter, seed=1))
            log.info("%s: %s", name, {k: v for k, v in results[name].items() if k != "interactive_latencies_s"})
        finally:
            srv.terminate()
    idle = results["idle_interactive_p50_s"]
    on, off = results["priorities on"], results["priorities off"]
    command = command_line("python -m loadtests.priorities", argv)
    lines = [f"### Priorities and preemption, {utc_stamp()}, {platform.machine()} CPU, onnxruntime", "",
             f"Command: `{command}`", "",
             f"{a.slots} slots; capacity {results['capacity']:.2f} images/s (closed loop, 1-image default requests); "
             f"a lone interactive request on the idle service: p50 {idle:.3f} s (10 requests). Batch: 2-image requests at 1.5x "
             f"capacity, interactive: {a.interactive_images}-image requests at 10% of capacity, Poisson, {a.seconds:.0f} s, then the "
             "backlog runs out. Rows: over the whole run, against what the finished requests need with no "
             "recomputation.", "",
             "| arm | interactive p50 | interactive p99 | p99 / idle p50 | batch goodput (images/s) | batch / off | "
             "preemptions/s | encoder rows (needed) | light rows (needed) | refused |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in (("priorities on", on), ("priorities off", off)):
        lines.append(f"| {name} | {r['interactive_p50_s']:.3f} s | {r['interactive_p99_s']:.3f} s | "
                     f"{r['interactive_p99_s'] / idle:.2f} | {r['batch_goodput_images_per_s']:.2f} | "
                     f"{r['batch_goodput_images_per_s'] / off['batch_goodput_images_per_s']:.3f} | "
                     f"{r['preemptions_per_s']:.2f} | {r['encoder_rows']:.0f} ({r['encoder_rows_needed']}) | "
                     f"{r['denoiser_rows']:.0f} ({r['denoiser_rows_needed']}) | {r['requests_refused'] or 'none'} |")
    raw = {**provenance(a.checkpoint, command), "slots": a.slots, "seconds": a.seconds, "batch_request": batch,
           "interactive_request": inter, **results}
    publish(lines, a.out, raw)


if __name__ == "__main__":
    main()
