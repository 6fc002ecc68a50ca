"""Head-of-line blocking at the request caps: four requests at the caps (16 images x 256 steps, K = 1, guided), then a
1-image, 32-step request sent a second later. When does each finish?

    python -m loadtests.fairness [--reserved-slots N] [--out docs/fairness.md]

Runs the service with its default slots and caps (32 slots, 16 images, 256 steps) and reports each request's
latency; `--reserved-slots 0` shows what round-robin admission alone gives.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import platform
import time
from pathlib import Path

import httpx

from dualrate.checkpoint import DEFAULT_CHECKPOINT
from dualrate.provenance import command_line, provenance, publish, utc_stamp
from loadtests.process import ServerProcess

log = logging.getLogger("loadtests.fairness")
BIG = {"num_images": 16, "steps": 256, "encoder_interval": 1, "guidance_scale": 1.5, "timeout_s": 300}
SMALL = {"class_label": 5, "num_images": 1, "steps": 32, "encoder_interval": 4, "guidance_scale": 1.5}


async def scenario(url: str) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        t0 = time.perf_counter()

        async def timed(body: dict) -> float:
            r = await c.post("/generate", json=body)
            r.raise_for_status()
            return time.perf_counter() - t0

        bigs = [asyncio.create_task(timed({**BIG, "class_label": i, "seed": i})) for i in range(4)]
        await asyncio.sleep(1.0)
        sent = time.perf_counter() - t0
        small = await timed(SMALL)
        return {"big_done_s": sorted(await asyncio.gather(*bigs)), "small_sent_s": sent, "small_done_s": small}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.fairness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--reserved-slots", type=int, default=None, help="DUALRATE_RESERVED_SLOTS (default: the service's)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    extra = {} if a.reserved_slots is None else {"reserved_slots": a.reserved_slots}
    srv = ServerProcess(a.checkpoint, Path("/tmp/dualrate-fairness.log"), max_active_images=32,
                        max_images_per_request=16, max_steps=256, max_timeout_s=600, **extra)
    try:
        srv.wait_ready()
        res = asyncio.run(scenario(srv.url))
    finally:
        srv.terminate()
    stamp = utc_stamp()
    command = command_line("python -m loadtests.fairness", argv)
    wait = res["small_done_s"] - res["small_sent_s"]
    reserved = a.reserved_slots if a.reserved_slots is not None else "default (32 // 8 = 4)"
    lines = [f"### Four requests at the caps and a small one, {stamp}, {platform.machine()} CPU, onnxruntime", "",
             f"Command: `{command}`", "",
             "32 slots; four requests of 16 images x 256 steps, K = 1, guidance 1.5 (64 guided images), then 1 s later a "
             f"1-image, 32-step, K = 4 request; reserved slots: {reserved}.",
             "", "| request | finished after (s) |", "|---|---:|",
             *[f"| large {i + 1} | {t:.1f} |" for i, t in enumerate(res["big_done_s"])],
             f"| small (sent at {res['small_sent_s']:.1f} s) | {res['small_done_s']:.1f} ({wait:.2f} s after it was sent) |"]
    publish(lines, a.out, {**provenance(a.checkpoint, command), **res})


if __name__ == "__main__":
    main()
