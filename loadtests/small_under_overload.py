"""Small requests under a flood of large ones, and how honest Retry-After is (issue 21's overload).

    python -m loadtests.small_under_overload [--seconds 60] [--out docs/overload.md]

A real server with 8 slots and a queue of 8; 48 clients loop 2-image 128-step requests (after a 429 each waits
0.2 s); one client sends a 1-image 8-step request once a second. Reports the small requests' statuses and latencies,
the active images sampled each second (are the slots full?), and the Retry-After of the 429s against the queue wait
of the large requests that were accepted (p50 / p95).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import platform
import statistics
import time
from pathlib import Path

import httpx

from dualrate.checkpoint import DEFAULT_CHECKPOINT
from dualrate.provenance import command_line, provenance, publish, utc_stamp
from loadtests.process import ServerProcess, metric

LARGE = {"class_label": 3, "num_images": 2, "steps": 128, "encoder_interval": 4}
SMALL = {"class_label": 5, "num_images": 1, "steps": 8, "encoder_interval": 4}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[int(q * (len(xs) - 1))] if xs else float("nan")


async def scenario(url: str, seconds: float, clients: int) -> dict:
    small: list[tuple[int, float]] = []
    active: list[float] = []
    retry_after: list[float] = []
    queue_wait: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=None)) as c:
        await asyncio.sleep(0)
        warm_until = time.monotonic() + 5
        stop = time.monotonic() + 5 + seconds

        async def flood() -> None:
            while time.monotonic() < stop:
                r = await c.post("/generate", json=LARGE)
                if r.status_code == 429:
                    if time.monotonic() > warm_until:
                        retry_after.append(float(r.headers["Retry-After"]))
                    await asyncio.sleep(0.2)
                elif r.status_code == 200 and time.monotonic() > warm_until:
                    queue_wait.append(r.json()["timings"]["queue_ms"] / 1000)

        async def one_small() -> None:
            t0 = time.monotonic()
            r = await c.post("/generate", json=SMALL)
            small.append((r.status_code, time.monotonic() - t0))

        async def probe() -> None:
            """A small request every second, each on its own (not waiting for the one before)."""
            await asyncio.sleep(5)
            sent = []
            t_next = time.monotonic()
            while time.monotonic() < stop:
                sent.append(asyncio.create_task(one_small()))
                active.append(metric((await c.get("/metrics")).text, "dualrate_active_images"))
                t_next += 1.0
                await asyncio.sleep(max(0.0, t_next - time.monotonic()))
            await asyncio.gather(*sent)

        await asyncio.gather(probe(), *[flood() for _ in range(clients)])
    return {"small": small, "active": active, "retry_after": retry_after, "queue_wait": queue_wait}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.small_under_overload", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--clients", type=int, default=48)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    srv = ServerProcess(a.checkpoint, Path("/tmp/dualrate-small-under-overload.log"), max_active_images=8,
                        max_images_per_request=2, queue_size=8, max_steps=256)
    try:
        srv.wait_ready()
        res = asyncio.run(scenario(srv.url, a.seconds, a.clients))
    finally:
        srv.terminate()
    lat = [t for code, t in res["small"] if code == 200]
    codes = [code for code, _ in res["small"]]
    ra, qw = res["retry_after"], res["queue_wait"]
    summary = {"small_sent": len(codes), "small_ok": codes.count(200), "small_429": codes.count(429),
               "small_latency_p50_s": pct(lat, 0.5), "small_latency_max_s": max(lat) if lat else float("nan"),
               "active_images_mean": statistics.mean(res["active"]) if res["active"] else float("nan"),
               "active_images_min": min(res["active"]) if res["active"] else float("nan"),
               "retry_after_p50_s": pct(ra, 0.5), "retry_after_p95_s": pct(ra, 0.95), "retries_429": len(ra),
               "queue_wait_p50_s": pct(qw, 0.5), "queue_wait_p95_s": pct(qw, 0.95)}
    summary["retry_after_p95_over_wait_p95"] = summary["retry_after_p95_s"] / summary["queue_wait_p95_s"]
    command = command_line("python -m loadtests.small_under_overload", argv)
    lines = [f"### Small requests under a flood of large ones, {utc_stamp()}, {platform.machine()} CPU", "",
             f"Command: `{command}`", "",
             f"8 slots, a queue of 8; {a.clients} clients loop 2-image 128-step requests (0.2 s pause after a 429); "
             f"a 1-image 8-step request once a second for {a.seconds:.0f} s (after 5 s of warm-up).", "",
             "| figure | value |", "|---|---:|",
             f"| small requests answered 200 / sent | {summary['small_ok']} / {summary['small_sent']} (429: "
             f"{summary['small_429']}) |",
             f"| small request latency p50 / max | {summary['small_latency_p50_s']:.2f} s / "
             f"{summary['small_latency_max_s']:.2f} s |",
             f"| active images (of 8), sampled each second: mean / min | {summary['active_images_mean']:.2f} / "
             f"{summary['active_images_min']:.0f} |",
             f"| Retry-After of the large requests' 429s, p50 / p95 ({len(ra)} answers) | "
             f"{summary['retry_after_p50_s']:.0f} s / {summary['retry_after_p95_s']:.0f} s |",
             f"| queue wait of the accepted large requests, p50 / p95 | {summary['queue_wait_p50_s']:.2f} s / "
             f"{summary['queue_wait_p95_s']:.2f} s |",
             f"| Retry-After p95 / queue wait p95 | {summary['retry_after_p95_over_wait_p95']:.2f} |"]
    publish(lines, a.out, {**provenance(a.checkpoint, command), "summary": summary, **res})


if __name__ == "__main__":
    main()
