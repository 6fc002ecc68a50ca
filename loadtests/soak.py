"""Soak: the split service (the engine core in its own process) under steady load for many minutes, the resident
memory (RSS) of both processes sampled once a minute, to tell warm-up from a leak.

    python -m loadtests.soak --minutes 15 --out docs/runs/soak.md

Load: `--clients` closed-loop clients of plain /generate requests and `--streams` clients reading /generate/stream
with previews, all the time. Each sample records the RSS of the front end and of the engine core (/proc/PID/status
VmRSS) and the requests answered so far. The report gives, per process, the RSS at the end of warm-up
(`--warmup-minutes`) and at the end, and the slope after warm-up (MB per minute, least squares); a plot of both
series goes beside it (soak.png), the raw samples into the JSON beside the report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from dualrate.checkpoint import DEFAULT_CHECKPOINT
from dualrate.provenance import command_line, provenance, publish, utc_stamp
from loadtests.process import ServerProcess


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def core_of(front: int) -> int:
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == front
                        and (d / "comm").read_text().strip() == "engine-core"):
                    return int(d.name)
            except OSError:
                continue
    raise RuntimeError(f"no engine-core child of {front}")


def slope(samples: list[dict], key: str, after_s: float) -> float:
    """MB per minute after `after_s`, least squares (0 with fewer than two samples)."""
    pts = [(s["t"], s[key]) for s in samples if s["t"] >= after_s]
    if len(pts) < 2:
        return 0.0
    t, y = np.array(pts).T
    return float(np.polyfit(t / 60, y, 1)[0])


async def load(url: str, stop: float, clients: int, streams: int, body: dict, counts: dict[str, int],
               num_classes: int) -> None:
    async def plain(c: httpx.AsyncClient, i: int) -> None:
        while time.monotonic() < stop:
            r = await c.post("/generate", json={**body, "class_label": i % num_classes, "seed": counts["plain"]})
            counts["plain" if r.status_code == 200 else "errors"] += 1

    async def stream(c: httpx.AsyncClient, i: int) -> None:
        while time.monotonic() < stop:
            async with c.stream("POST", "/generate/stream", json={**body, "class_label": i % num_classes,
                                                                   "preview_every": 4}) as r:
                done = False
                async for line in r.aiter_lines():
                    done = done or line == "event: done"
            counts["streams" if done else "errors"] += 1

    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=None)) as c:
        await asyncio.gather(*[plain(c, i) for i in range(clients)], *[stream(c, i) for i in range(streams)])


def plot(samples: list[dict], path: Path, warmup_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    t = [s["t"] / 60 for s in samples]
    ax.plot(t, [s["front_mb"] for s in samples], "o-", label="front end (HTTP)")
    ax.plot(t, [s["core_mb"] for s in samples], "s-", label="engine core")
    ax.axvline(warmup_s / 60, color="grey", linestyle="--", label="end of warm-up")
    ax.set_xlabel("minutes under load")
    ax.set_ylabel("RSS (MB)")
    ax.set_title("Soak: resident memory of both processes, sampled once a minute", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--minutes", type=float, default=15.0, help="time under load (default 15)")
    p.add_argument("--warmup-minutes", type=float, default=3.0, help="the slope is fitted after this (default 3)")
    p.add_argument("--sample-s", type=float, default=60.0, help="seconds between RSS samples (default 60)")
    p.add_argument("--clients", type=int, default=8, help="plain /generate clients (default 8)")
    p.add_argument("--streams", type=int, default=2, help="/generate/stream clients (default 2)")
    p.add_argument("--slots", type=int, default=8, help="DUALRATE_MAX_ACTIVE_IMAGES (default 8)")
    p.add_argument("--out", type=Path, default=None, help="append the report to this markdown file (raw JSON and "
                   "the plot beside it)")
    a = p.parse_args(argv)
    command = command_line("python -m loadtests.soak", argv)
    prov = provenance(a.checkpoint, command)  # at the start: the commit whose code the service runs
    log_path = Path("/tmp/dualrate-soak.log")
    srv = ServerProcess(a.checkpoint, log_path, engine_process="on", max_active_images=a.slots,
                        max_images_per_request=1, queue_size=256)
    srv.wait_ready()
    body = {"num_images": 1, "steps": 16, "encoder_interval": 4}
    samples: list[dict] = []
    counts = {"plain": 0, "streams": 0, "errors": 0}
    try:
        front, core = srv.proc.pid, core_of(srv.proc.pid)
        t0 = time.monotonic()
        stop = t0 + 60 * a.minutes

        async def run() -> None:
            classes = httpx.get(f"{srv.url}/v1/model", timeout=30).json()["image"]["num_classes"]
            task = asyncio.create_task(load(srv.url, stop, a.clients, a.streams, body, counts, classes))
            while True:
                t = time.monotonic() - t0
                samples.append({"t": round(t, 1), "front_mb": round(rss_mb(front), 1), "core_mb": round(rss_mb(core), 1),
                                **counts})
                print(f"[soak] {t / 60:5.1f} min  front {samples[-1]['front_mb']:7.1f} MB  core "
                      f"{samples[-1]['core_mb']:7.1f} MB  answered {counts['plain'] + counts['streams']}  errors "
                      f"{counts['errors']}", flush=True)
                if time.monotonic() >= stop:
                    break
                await asyncio.sleep(min(a.sample_s, max(0.0, stop - time.monotonic())))
            await task

        asyncio.run(run())
    finally:
        srv.terminate()
    warm = 60 * a.warmup_minutes
    after = [s for s in samples if s["t"] >= warm] or samples[-1:]
    result = {proc: {"at_warmup_end_mb": after[0][f"{proc}_mb"], "at_end_mb": samples[-1][f"{proc}_mb"],
                     "slope_mb_per_min_after_warmup": round(slope(samples, f"{proc}_mb", warm), 3)}
              for proc in ("front", "core")}
    raw = {**prov, "minutes": a.minutes, "warmup_minutes": a.warmup_minutes,
           "clients": a.clients, "streams": a.streams, "slots": a.slots, "body": body, "samples": samples,
           "result": result, "answered": counts}
    lines = [f"## Soak {utc_stamp()}: {a.minutes:g} min, {a.clients} plain + {a.streams} streaming clients, "
             f"{a.slots} slots, engine core in its own process", "",
             f"{counts['plain']} plain and {counts['streams']} streamed answers, {counts['errors']} errors.", "",
             f"Command: `{command}`", "",
             "| process | RSS at the end of warm-up | RSS at the end | slope after warm-up |", "|---|---:|---:|---:|"]
    for proc, name in (("front", "front end"), ("core", "engine core")):
        r = result[proc]
        lines.append(f"| {name} | {r['at_warmup_end_mb']:.1f} MB | {r['at_end_mb']:.1f} MB | "
                     f"{r['slope_mb_per_min_after_warmup']:+.2f} MB/min |")
    if a.out is not None:
        png = a.out.with_suffix(".png")
        plot(samples, png, warm)
        lines += ["", f"![RSS per minute]({png.name})"]
    publish(lines, a.out, raw)
    if a.out is None:
        print(json.dumps(result))
    return 0 if counts["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
