"""Two models in one service, one of them flooded: does the other keep its latency?

    python -m loadtests.models [--seconds 30] [--out docs/runs/models.md]

One real server serves two shipped models from one repository (checkpoints/: DUALRATE_MODELS=FLOODED,PROBED), each
with its own engine core and 8 slots. First the probed model's single-image requests alone (one after another: its
idle latency), then the flooded model's capacity (8 closed-loop clients of single-image requests), then Poisson
arrivals at 1.5x that capacity to the flooded model while single-image requests to the probed model go one after
another. Reports the probed model's p50 / p99 latency idle and under the flood, and what the flooded model answered.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from pathlib import Path

import httpx

from dualrate.provenance import command_line, provenance, publish, utc_stamp
from loadtests.bare import log_progress
from loadtests.clients import closed_loop, pct
from loadtests.process import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"max_active_images": 8, "max_images_per_request": 4, "queue_size": 64}


async def classes(c: httpx.AsyncClient, model: str) -> int:
    return (await c.get(f"/v1/models/{model}")).json()["image"]["num_classes"]


async def probe(c: httpx.AsyncClient, model: str, stop: float, latencies: list[float]) -> None:
    """Single-image requests to `model`, one after another (class i mod its classes), until `stop`."""
    i, n = 0, await classes(c, model)
    while time.perf_counter() < stop:
        t0 = time.perf_counter()
        r = await c.post("/generate", json={"model": model, "class_label": i % n, "seed": i})
        r.raise_for_status()
        latencies.append(time.perf_counter() - t0)
        i += 1


async def flood(c: httpx.AsyncClient, model: str, rate: float, stop: float, statuses: list[int]) -> None:
    """Poisson arrivals of single-image requests to `model` at `rate` per second until `stop`."""
    rng = random.Random(0)
    n = await classes(c, model)

    async def one(i: int) -> None:
        r = await c.post("/generate", json={"model": model, "class_label": i % n, "seed": i})
        statuses.append(r.status_code)

    tasks, i = [], 0
    while time.perf_counter() < stop:
        tasks.append(asyncio.create_task(one(i)))
        i += 1
        await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)


async def scenario(url: str, flooded: str, probed: str, seconds: float, overload: float) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=None)) as c:
        for m in (flooded, probed):  # warm both
            (await c.post("/generate", json={"model": m, "num_images": 2})).raise_for_status()
        flooded_classes = await classes(c, flooded)
        idle: list[float] = []
        await probe(c, probed, time.perf_counter() + seconds / 2, idle)
    capacity, _ = await closed_loop(url, 8, seconds / 2, {"model": flooded, "num_images": 1}, flooded_classes)
    under: list[float] = []
    statuses: list[int] = []
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=None)) as c:
        stop = time.perf_counter() + seconds
        await asyncio.gather(flood(c, flooded, overload * capacity, stop, statuses),
                             probe(c, probed, stop, under))
    return {"idle_latencies_s": idle, "flood_latencies_s": under, "capacity_rps": capacity,
            "offered_rps": overload * capacity, "flooded_statuses": statuses}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.models", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=ROOT / "checkpoints")
    p.add_argument("--flooded", default="mnist-dualrate")
    p.add_argument("--probed", default="fashion-dualrate")
    p.add_argument("--seconds", type=float, default=30.0, help="length of the flood (the idle and capacity phases "
                   "take half as long each)")
    p.add_argument("--overload", type=float, default=1.5, help="the flood's rate as a multiple of the capacity")
    p.add_argument("--threads", type=int, default=0, help="DUALRATE_THREADS: CPU threads per network (0: the library's "
                   "default, every core)")
    p.add_argument("--out", type=Path, default=None, help="append the report to this markdown file (raw JSON beside)")
    a = p.parse_args(argv)
    log_progress()
    srv = ServerProcess(a.repository / a.flooded, Path("/tmp/dualrate-models.log"), model_repository=a.repository,
                        models=f"{a.flooded},{a.probed}", threads=a.threads, **SETTINGS)
    try:
        srv.wait_ready()
        res = asyncio.run(scenario(srv.url, a.flooded, a.probed, a.seconds, a.overload))
    finally:
        srv.terminate()
    idle, under, codes = res["idle_latencies_s"], res["flood_latencies_s"], res["flooded_statuses"]
    summary = {"idle_p50_s": pct(idle, 0.5), "idle_p99_s": pct(idle, 0.99), "flood_p50_s": pct(under, 0.5),
               "flood_p99_s": pct(under, 0.99), "probed_requests_idle": len(idle), "probed_requests_flood": len(under),
               "flooded_200": codes.count(200), "flooded_429": codes.count(429), "flooded_sent": len(codes)}
    summary["p99_flood_over_idle"] = summary["flood_p99_s"] / summary["idle_p99_s"]
    command = command_line("python -m loadtests.models", argv)
    lines = [f"### Two models, one flooded at {a.overload:g}x its capacity, {utc_stamp()}", "",
             f"Command: `{command}`", "",
             f"One service, models {a.flooded} (flooded) and {a.probed} (probed), 8 slots each, "
             f"DUALRATE_THREADS={a.threads}. {a.flooded}'s "
             f"capacity: {res['capacity_rps']:.2f} requests/s (8 closed-loop clients, 1 image each); the flood: "
             f"Poisson arrivals at {res['offered_rps']:.2f}/s for {a.seconds:.0f} s.", "",
             "| figure | idle | under the flood |", "|---|---:|---:|",
             f"| {a.probed}: single-image requests, one after another | {len(idle)} | {len(under)} |",
             f"| {a.probed}: latency p50 | {summary['idle_p50_s']:.3f} s | {summary['flood_p50_s']:.3f} s |",
             f"| {a.probed}: latency p99 | {summary['idle_p99_s']:.3f} s | {summary['flood_p99_s']:.3f} s |",
             f"| p99 under the flood / idle p99 | | {summary['p99_flood_over_idle']:.2f} |",
             f"| {a.flooded}: answered 200 / 429 / sent | | {summary['flooded_200']} / {summary['flooded_429']} / "
             f"{summary['flooded_sent']} |"]
    publish(lines, a.out, {**provenance(a.repository / a.probed, command), "summary": summary, **res})


if __name__ == "__main__":
    main()
