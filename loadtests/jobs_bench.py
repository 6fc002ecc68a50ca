"""What the job queue costs and gives (issue 39), three measurements on real servers of the shipped checkpoint:

    python -m loadtests.jobs_bench [--jobs 1000] [--pairs 3] [--out docs/runs/jobs.md]

1. **Submit**: `--jobs` jobs POSTed by 16 concurrent clients to a server whose store is an SQLite file: submit
   latency p50/p99 and the store's size on disk with all of them in it (jobs of 1 image, 8 steps; the replica works
   through them meanwhile, as it would).
2. **Checkpoint cost**: two servers, checkpoints at the default interval (DUALRATE_JOB_CHECKPOINT_S=5) and off (0),
   each given the same batch of jobs in turn (ABBA order, `--pairs` pairs): job images stored per second, and the
   ratio on / off.
3. **Interactive under a job backlog**: one server (the default DUALRATE_INTERACTIVE_SLOWDOWN=3); 5 interactive
   single-image /generate requests of 32 steps one after another on the idle service, then again with a backlog of
   jobs holding every slot; the bound is 3x the idle latency + 0.5 s at the worst. Batch throughput (job images
   stored per second) in the same run, in windows with that interactive traffic and without it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from dualrate.checkpoint import DEFAULT_CHECKPOINT
from dualrate.provenance import command_line, provenance, publish, utc_stamp
from dualrate.sampler import rows_per_image
from loadtests.bare import log_progress
from loadtests.clients import pct
from loadtests.process import ServerProcess, metric

log = logging.getLogger("loadtests.jobs_bench")
INTERACTIVE = {"class_label": 3, "steps": 32, "priority": "interactive"}
JOB_STEPS = 128  # the backlog's jobs in the interactive part


def card_spec(checkpoint: Path):
    """The model's spec as its card states it."""
    from dualrate.checkpoint import read_card
    from export.card import model_spec

    return model_spec(read_card(checkpoint))


def classes(checkpoint: Path) -> int:
    """The model's class count (labels cycle through it)."""
    return max(1, card_spec(checkpoint).num_classes)


def job_images(url: str) -> float:
    return metric(httpx.get(f"{url}/metrics", timeout=30).text, "dualrate_job_images_total")


def image_steps(url: str, rows: int) -> float:
    """Image-steps the light network has run: its rows over `rows` per image-step (labelled, guided: 2)."""
    return metric(httpx.get(f"{url}/metrics", timeout=30).text, "dualrate_network_rows_total",
                  'network="denoiser"') / rows


def wait_done(url: str, total_images: float, timeout: float = 900.0) -> None:
    deadline = time.monotonic() + timeout
    while job_images(url) < total_images:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}: jobs not done in {timeout} s")
        time.sleep(0.2)


async def submit_many(url: str, n: int, body: dict, clients: int = 16) -> list[float]:
    latencies: list[float] = []
    todo = iter(range(n))

    async def client(c: httpx.AsyncClient) -> None:
        for i in todo:
            t0 = time.perf_counter()
            r = await c.post("/v1/jobs", json={**body, "seed": i})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)

    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        await asyncio.gather(*[client(c) for _ in range(clients)])
    return latencies


def submit_benchmark(checkpoint: Path, n: int, tmp: Path) -> dict:
    store = tmp / "submit.db"
    srv = ServerProcess(checkpoint, tmp / "submit.log", env={"DUALRATE_JOB_STORE": f"sqlite:///{store}"})
    try:
        srv.wait_ready()
        t0 = time.perf_counter()
        lat = asyncio.run(submit_many(srv.url, n, {"class_label": 1, "num_images": 1, "steps": 8}))
        wall = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in tmp.glob("submit.db*"))
        done = job_images(srv.url)
    finally:
        srv.terminate()
    out = {"jobs": n, "submit_p50_ms": 1000 * pct(lat, 0.5), "submit_p99_ms": 1000 * pct(lat, 0.99),
           "submits_per_s": n / wall, "store_bytes": size, "bytes_per_job": size / n, "done_meanwhile": done}
    log.info("submit: %s", out)
    return out


def checkpoint_benchmark(checkpoint: Path, pairs: int, tmp: Path, jobs: int = 8, images: int = 8,
                         steps: int = 128) -> dict:
    servers = {name: ServerProcess(checkpoint, tmp / f"ckpt-{name}.log", threads=1,
                                   env={"DUALRATE_JOB_STORE": f"sqlite:///{tmp / f'ckpt-{name}.db'}",
                                        "DUALRATE_JOB_CHECKPOINT_S": value})
               for name, value in (("on", "5"), ("off", "0"))}
    windows = []
    n_classes = classes(checkpoint)  # read once, not inside the timed loop
    try:
        for srv in servers.values():
            srv.wait_ready()
        for i in range(pairs):
            order = ["on", "off"] if i % 2 == 0 else ["off", "on"]
            got = {}
            for name in order:
                srv = servers[name]
                before = job_images(srv.url)
                t0 = time.perf_counter()
                for j in range(jobs):
                    httpx.post(f"{srv.url}/v1/jobs", json={"class_label": j % n_classes,
                                                           "num_images": images,
                                                           "steps": steps, "seed": 100 * i + j},
                               timeout=30).raise_for_status()
                wait_done(srv.url, before + jobs * images)
                got[name] = jobs * images / (time.perf_counter() - t0)
                log.info("checkpoints pair %d %s: %.2f job images/s", i + 1, name, got[name])
            windows.append(got)
        m = httpx.get(f"{servers['on'].url}/metrics", timeout=30).text
        writes = metric(m, "dualrate_job_checkpoint_seconds_count")
        mean_write = metric(m, "dualrate_job_checkpoint_seconds_sum") / max(1.0, writes)
    finally:
        for srv in servers.values():
            srv.terminate()
    ratios = [w["on"] / w["off"] for w in windows]
    out = {"windows": windows, "on_over_off": ratios, "mean_on_over_off": statistics.fmean(ratios),
           "checkpoint_writes": writes, "mean_write_ms": 1000 * mean_write, "jobs_per_window": jobs,
           "images_per_job": images, "steps": steps}
    log.info("checkpoints: %s", out)
    return out


def interactive_benchmark(checkpoint: Path, tmp: Path, window_s: float = 15.0) -> dict:
    srv = ServerProcess(checkpoint, tmp / "interactive.log",
                        env={"DUALRATE_JOB_STORE": f"sqlite:///{tmp / 'interactive.db'}"})

    def generate() -> float:
        t0 = time.perf_counter()
        httpx.post(f"{srv.url}/generate", json=INTERACTIVE, timeout=120).raise_for_status()
        return time.perf_counter() - t0

    try:
        srv.wait_ready()
        for _ in range(3):
            generate()
        idle = [generate() for _ in range(5)]
        info = httpx.get(f"{srv.url}/v1/model", timeout=30).json()
        slots = int(info["state"]["slots"])
        # A backlog: more job images than slots, long enough to outlast the windows below.
        spec = card_spec(checkpoint)
        for j in range(3 * slots // 16 + 4):
            httpx.post(f"{srv.url}/v1/jobs", json={"class_label": j % max(1, spec.num_classes), "num_images": 16,
                                                   "steps": JOB_STEPS,
                                                   "seed": j}, timeout=30).raise_for_status()
        time.sleep(3.0)
        m = httpx.get(f"{srv.url}/metrics").text
        active = metric(m, "dualrate_active_images")
        busy = [generate() for _ in range(5)]
        # Batch throughput: windows without and with interactive traffic (one request after another), counted in
        # image-steps the light network ran (less the interactive requests' own) over the jobs' JOB_STEPS: finished
        # images arrive in bursts (the slots run in step), which a short window may miss altogether.
        rows = rows_per_image(INTERACTIVE["class_label"], spec.defaults.guidance_scale, spec.null_label)
        alone_before = image_steps(srv.url, rows)
        time.sleep(window_s)
        alone = (image_steps(srv.url, rows) - alone_before) / JOB_STEPS / window_s
        with_before, t0, n = image_steps(srv.url, rows), time.perf_counter(), 0
        while time.perf_counter() - t0 < window_s:
            generate()
            n += 1
        beside = ((image_steps(srv.url, rows) - with_before - n * INTERACTIVE["steps"]) / JOB_STEPS
                  / (time.perf_counter() - t0))
        preemptions = metric(httpx.get(f"{srv.url}/metrics").text, "dualrate_preemptions_total")
    finally:
        srv.terminate()
    bound = 3 * statistics.median(idle) + 0.5
    out = {"idle_s": idle, "busy_s": busy, "active_images_at_start": active, "bound_s": bound,
           "worst_s": max(busy), "within_bound": max(busy) <= bound, "batch_images_per_s_alone": alone,
           "batch_images_per_s_beside_interactive": beside, "batch_share_kept": beside / alone if alone else None,
           "preemptions": preemptions, "slots": slots}
    log.info("interactive: %s", out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.jobs_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument("--jobs", type=int, default=1000, help="jobs submitted in part 1 (default 1000)")
    ap.add_argument("--pairs", type=int, default=3, help="ABBA pairs of the checkpoint-cost part (default 3)")
    ap.add_argument("--window", type=float, default=15.0, help="seconds per batch-throughput window (default 15)")
    ap.add_argument("--parts", default="submit,checkpoints,interactive", help="which parts to run (default all)")
    ap.add_argument("--checkpoint-jobs", type=int, default=8, help="part 2: jobs of 8 images per window (default 8)")
    ap.add_argument("--checkpoint-steps", type=int, default=128, help="part 2: steps per image (default 128)")
    ap.add_argument("--out", type=Path, default=None, help="append the report to this markdown file (+ raw JSON)")
    a = ap.parse_args(argv)
    log_progress()
    tmp = Path(tempfile.mkdtemp(prefix="jobs-bench-"))
    parts = set(a.parts.split(","))
    sub = submit_benchmark(a.checkpoint, a.jobs, tmp) if "submit" in parts else None
    ck = (checkpoint_benchmark(a.checkpoint, a.pairs, tmp, a.checkpoint_jobs, steps=a.checkpoint_steps)
          if "checkpoints" in parts else None)
    it = interactive_benchmark(a.checkpoint, tmp, a.window) if "interactive" in parts else None
    command = command_line("python -m loadtests.jobs_bench", argv)
    lines = [f"### Jobs, {utc_stamp()}, {platform.machine()} CPU ({os.cpu_count()} cores), onnxruntime, SQLite store",
             "", f"Command: `{command}`", ""]
    if sub:
        lines += [
            f"**Submit**: {sub['jobs']} jobs by 16 concurrent clients: p50 {sub['submit_p50_ms']:.1f} ms, p99 "
            f"{sub['submit_p99_ms']:.1f} ms ({sub['submits_per_s']:.0f} submits/s); the store holds them in "
            f"{sub['store_bytes'] / 1e6:.2f} MB ({sub['bytes_per_job']:.0f} bytes per job, with the write-ahead log); "
            f"{sub['done_meanwhile']:.0f} job images were finished meanwhile.", ""]
    if ck:
        lines += [
            f"**Checkpoints** (every 5 s vs off; {ck['jobs_per_window']} jobs of {ck['images_per_job']} images of "
            f"{ck['steps']} steps per window, {len(ck['windows'])} ABBA pairs; {ck['checkpoint_writes']:.0f} writes, "
            f"{ck['mean_write_ms']:.1f} ms each):", "",
            "| pair | on images/s | off images/s | on / off |",
            "|---:|---:|---:|---:|",
            *[f"| {i + 1} | {w['on']:.2f} | {w['off']:.2f} | {w['on'] / w['off']:.3f} |"
              for i, w in enumerate(ck["windows"])],
            "", f"Mean on / off: **{ck['mean_on_over_off']:.3f}**.", ""]
    if it:
        lines += [
            f"**Interactive beside a job backlog** ({it['active_images_at_start']:.0f} of {it['slots']} slots held by "
            "job images): single-image /generate, 32 steps, one after another: idle "
            f"{', '.join(f'{x:.3f}' for x in it['idle_s'])} s; with the backlog "
            f"{', '.join(f'{x:.3f}' for x in it['busy_s'])} s; worst {it['worst_s']:.3f} s against the bound 3 x idle "
            f"+ 0.5 s = {it['bound_s']:.3f} s ({'within' if it['within_bound'] else 'OVER'}). Batch throughput: "
            f"{it['batch_images_per_s_alone']:.2f} job images/s alone (image-steps / {JOB_STEPS}), "
            f"{it['batch_images_per_s_beside_interactive']:.2f} beside the interactive requests "
            f"({100 * (it['batch_share_kept'] or 0):.0f}% kept); {it['preemptions']:.0f} batch images paused over the "
            "run."]
    raw = {**provenance(a.checkpoint, command), "submit": sub, "checkpoints": ck, "interactive": it}
    publish(lines, a.out, raw)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
