"""Where the CPU goes at saturation: the service process against the load generator, and (with py-spy installed)
where the service's own samples fall.

    python -m loadtests.cpu_share [--seconds 15] [--out docs/runs/service_bench.md]

One server (16 slots, the card's default request of 1 image). Cases, each `--seconds` long: 32 plain closed-loop
clients; 16 plain + 4 plain; 16 plain + 4 streaming with previews every 4 steps; the same without previews. For each:
images/s, the service's and the load generator's CPU time per second of wall time (in % of one core), and the load
generator's CPU per request. Then py-spy samples the service for `--seconds` under 32 plain clients: the share of
samples per thread and inside ONNX Runtime's Session.run.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

from dualrate.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from dualrate.provenance import command_line, provenance, publish, utc_stamp
from loadtests.clients import closed_loop, plain_and_streams
from loadtests.process import ServerProcess

log = logging.getLogger("loadtests.cpu_share")


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(pid: int, run) -> dict:
    """Run `run()` (-> (images/s, requests)) and the CPU it and the service took."""
    c0, s0, t0 = time.process_time(), process_cpu_s(pid), time.perf_counter()
    ips, requests = run()
    wall = time.perf_counter() - t0
    client = time.process_time() - c0
    return {"images_per_s": ips, "service_cpu_pct": 100 * (process_cpu_s(pid) - s0) / wall,
            "client_cpu_pct": 100 * client / wall, "client_cpu_ms_per_request": 1000 * client / max(requests, 1)}


def profile(pid: int, seconds: float) -> dict | None:
    """py-spy's raw samples of the service -> share per thread and inside Session.run (None without py-spy)."""
    if shutil.which("py-spy") is None:
        return None
    out = Path(tempfile.mkdtemp()) / "profile.txt"
    subprocess.run(["py-spy", "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "200", "-f", "raw", "-o",
                    str(out), "--threads", "--nonblocking"], check=True, capture_output=True)
    threads: Counter[str] = Counter()
    in_ort = 0
    for line in out.read_text().splitlines():
        stack, n = line.rsplit(" ", 1)
        name = stack.split(";")[0].split(": ", 1)[-1].rstrip(")")
        ort = "Session.run" in stack
        in_ort += int(n) if ort else 0
        threads["scheduler" if name == "scheduler" else "other threads"] += int(n)
        # Finer: the scheduler thread in and out of ONNX Runtime, the event loop (MainThread), the rest.
        kind = ("scheduler, in ONNX Runtime" if ort else "scheduler, Python") if name == "scheduler" else \
            "event loop" if name == "MainThread" else "in ONNX Runtime, other thread" if ort else "other, Python"
        threads[f"by: {kind}"] += int(n)
    total = threads["scheduler"] + threads["other threads"]
    return {"samples": total, **{f"{k}_pct": 100 * v / total for k, v in threads.items()},
            "inside_onnxruntime_run_pct": 100 * in_ort / total}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.cpu_share", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--profile-mixes", type=int, default=0, metavar="ROUNDS",
                   help="also profile 16 plain + 4 plain against 16 plain + 4 streaming clients (previews every 4 "
                   "steps), this many alternated rounds: which thread the streams' cost lands on")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    model = load_checkpoint(a.checkpoint)
    d, num_classes = model.defaults, model.cfg.num_classes
    body = {"num_images": 1, "steps": d.steps, "encoder_interval": d.encoder_interval, "guidance_scale": d.guidance_scale}
    srv = ServerProcess(a.checkpoint, Path(tempfile.mkdtemp()) / "server.log", max_active_images=16,
                        max_images_per_request=16, queue_size=1024)
    cases: dict[str, dict] = {}
    try:
        srv.wait_ready()
        pid = srv.proc.pid

        def saturation() -> tuple[float, int]:
            ips, lat = asyncio.run(closed_loop(srv.url, 32, a.seconds, body))
            return ips, len(lat)

        def mix(streaming: bool, previews: int) -> tuple[float, int]:
            r = asyncio.run(plain_and_streams(srv.url, 16, 4, streaming, a.seconds, body, previews,
                                                  num_classes=num_classes))
            return r["total_images_per_s"], round(r["total_images_per_s"] * a.seconds)

        cases["32 plain clients"] = measured(pid, saturation)
        cases["16 plain + 4 plain"] = measured(pid, lambda: mix(False, 4))
        cases["16 plain + 4 streaming, previews every 4 steps"] = measured(pid, lambda: mix(True, 4))
        cases["16 plain + 4 streaming, no previews"] = measured(pid, lambda: mix(True, 0))
        for name, c in cases.items():
            log.info("%s: %s", name, c)
        prof_box: dict = {}

        async def profiled() -> None:
            task = asyncio.create_task(closed_loop(srv.url, 32, a.seconds + 2, body))
            prof_box["p"] = await asyncio.to_thread(profile, pid, a.seconds)
            await task

        asyncio.run(profiled())
        prof = prof_box["p"]
        mixes = {}
        if a.profile_mixes:  # the stream-cost arms, each profiled while it runs, alternated
            for rnd in range(a.profile_mixes):
                for streaming in ((False, True) if rnd % 2 == 0 else (True, False)):
                    async def arm(streaming: bool = streaming) -> tuple[dict, dict | None]:
                        task = asyncio.create_task(plain_and_streams(srv.url, 16, 4, streaming, a.seconds + 2, body, 4,
                                                                                num_classes=num_classes))
                        prof = await asyncio.to_thread(profile, pid, a.seconds)
                        return await task, prof
                    res, pr = asyncio.run(arm())
                    mixes.setdefault("streams" if streaming else "control", []).append({"result": res, "profile": pr})
                    log.info("profiled %s: %s %s", "streams" if streaming else "control", res, pr)
    finally:
        srv.terminate()
    command = command_line("python -m loadtests.cpu_share", argv)
    lines = [f"### Where the CPU goes at saturation, {utc_stamp()}, {platform.machine()} CPU ({os.cpu_count()} cores), "
             "onnxruntime", "", f"Command: `{command}`", "",
             f"One server, 16 slots; requests of 1 image, N = {d.steps}, K = {d.encoder_interval}; {a.seconds:g} s per "
             "case. CPU in % of one core (process CPU time / wall time); the load generator runs on the same cores.", "",
             "| case | images/s | service CPU | load generator CPU | load generator CPU per request (ms) |",
             "|---|---:|---:|---:|---:|",
             *[f"| {n} | {c['images_per_s']:.2f} | {c['service_cpu_pct']:.0f}% | {c['client_cpu_pct']:.1f}% | "
               f"{c['client_cpu_ms_per_request']:.2f} |" for n, c in cases.items()]]
    if prof is not None:
        lines += ["", f"py-spy, {prof['samples']} samples at 200 Hz over {a.seconds:g} s of 32 plain clients: "
                  f"{prof.get('scheduler_pct', 0):.0f}% of the service's samples on the scheduler thread, "
                  f"{prof['inside_onnxruntime_run_pct']:.0f}% inside ONNX Runtime's Session.run, "
                  f"{prof.get('other threads_pct', 0):.0f}% on every other thread (event loop, PNG and AnyIO workers)."]
    if mixes:
        kinds = sorted({k.removesuffix("_pct") for arm in mixes.values() for m in arm for k in (m["profile"] or {})
                        if k.startswith("by: ")})
        lines += ["", f"py-spy during the stream-cost arms ({a.profile_mixes} alternated rounds each, {a.seconds:g} s): "
                  "share of the service's samples per thread, mean over the rounds, and images/s of all clients.", "",
                  "| arm | images/s | " + " | ".join(k[4:] for k in kinds) + " |", "|---|---:|" + "---:|" * len(kinds)]
        for arm, ms in mixes.items():
            ips = statistics.fmean(m["result"]["total_images_per_s"] for m in ms)
            shares = [statistics.fmean((m["profile"] or {}).get(k + "_pct", 0.0) for m in ms) for k in kinds]
            lines.append(f"| {arm} | {ips:.2f} | " + " | ".join(f"{v:.1f}%" for v in shares) + " |")
    publish(lines, a.out, {**provenance(a.checkpoint, command), "seconds": a.seconds, "cases": cases, "profile": prof,
                           "mixes": mixes})


if __name__ == "__main__":
    main()
