"""What POST /generate/stream costs the other clients: saturation images/s of plain /generate clients, beside
streaming clients and beside plain ones, measured side by side in one run against one server.

    python -m loadtests.stream_cost [--pairs 12] [--window 10] [--settle 2] [--client-nice 0]
                                    [--out docs/runs/service_bench.md]

One server at saturation (16 slots; the card's default request of 1 image). 16 plain closed-loop clients run from
start to end; 4 more clients switch, window by window, between /generate/stream with a preview every 4 steps (the
"streams" windows) and /generate (the control windows), so the 16 never restart and no start-up transient falls on
one arm. Windows come in pairs in ABBA order (control first in odd pairs), so a drift over the run cancels out. The
first `--settle` seconds of each window are not counted: requests sent in the other mode finish then. Per pair: the
plain clients' images/s in the streams window / in the control window; reported as the mean ratio with its 95% t
interval over the pairs. "Nothing measurable" means 1 lies inside that interval.

The load generator shares the machine with the service (2 cores here), so its own work on the streams (reading ~5
chunks per streamed request) competes with the tick loop too: a stricter test than clients on other machines. It
runs at the service's priority unless `--client-nice N` lowers its own after the server has started (then it takes
mostly the cores the service leaves idle: a stand-in for remote clients). Each window also records the service's and
the load generator's CPU time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import httpx

from dualrate.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from dualrate.provenance import command_line, provenance, publish, utc_stamp
from loadtests.clients import read_stream
from loadtests.cpu_share import process_cpu_s
from loadtests.process import ServerProcess

log = logging.getLogger("loadtests.stream_cost")
PLAIN, EXTRA, PREVIEW_EVERY = 16, 4, 4


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and its two-sided t confidence interval (values: one ratio per paired window)."""
    from scipy import stats

    m = statistics.fmean(values)
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return m, float(m - half), float(m + half)


def computed(sent: float, answer: dict, who: str) -> tuple[float, float, str, int]:
    """When an answered request's images were computed, on this clock: from its sending, its queue and compute times."""
    begin = sent + answer["timings"]["queue_ms"] / 1000
    return begin, begin + answer["timings"]["compute_ms"] / 1000, who, len(answer["images"])


def overlap(begin: float, end: float, t0: float, t1: float) -> float:
    """The share of [begin, end] inside [t0, t1]: a request's images count in a window by how much of their
    computation fell in it (all 16 slots finish together in waves, so whole images would count in steps of ~16)."""
    return max(0.0, min(end, t1) - max(begin, t0)) / max(end - begin, 1e-9)


def arms(pairs: int) -> list[str]:
    """ABBA: control first in odd pairs (1st, 3rd, ...), streams first in even ones."""
    return [arm for i in range(pairs) for arm in (("control", "streams") if i % 2 == 0 else ("streams", "control"))]


async def alternate(url: str, server_pid: int, body: dict, pairs: int, window: float, settle: float,
                    warmup: float, *, num_classes: int) -> list[dict]:
    """Run the clients and switch the 4 extra ones window by window; -> one record per window."""
    mode = {"now": "control"}
    # Per answered request: when its images were being computed (from the answer's timings, on this clock), who sent
    # it ("plain", or the extra clients' "control" / "streams"), and its images.
    done: list[tuple[float, float, str, int]] = []
    # preview events (counted from the raw stream): when their request was sent, when it ended, the sender's arm
    previews: list[tuple[float, float, str]] = []

    async def plain_client(c: httpx.AsyncClient, i: int) -> None:
        while True:
            sent = time.perf_counter()
            r = await c.post("/generate", json={**body, "class_label": i % num_classes})
            r.raise_for_status()
            done.append(computed(sent, r.json(), "plain"))

    async def extra_client(c: httpx.AsyncClient, i: int) -> None:
        while True:
            arm = mode["now"]
            req = {**body, "class_label": i % num_classes}
            sent = time.perf_counter()
            if arm == "control":
                r = await c.post("/generate", json=req)
                r.raise_for_status()
                done.append(computed(sent, r.json(), arm))
                continue
            raw = await read_stream(c, {**req, "preview_every": PREVIEW_EVERY})
            previews.extend([(sent, time.perf_counter(), arm)] * raw.count(b"event: preview"))
            answer = json.loads(raw[raw.rindex(b"event: done"):].split(b"data: ", 1)[1].split(b"\r\n", 1)[0])
            done.append(computed(sent, answer, arm))

    spans = []  # per window: arm, counted span, CPU times at its ends
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=None)) as c:
        tasks = [asyncio.create_task(plain_client(c, i)) for i in range(PLAIN)]
        tasks += [asyncio.create_task(extra_client(c, i)) for i in range(EXTRA)]
        try:
            await asyncio.sleep(warmup)
            for k, arm in enumerate(arms(pairs)):
                mode["now"] = arm
                switched = time.perf_counter()
                await asyncio.sleep(settle)
                start = (time.perf_counter(), time.process_time(), process_cpu_s(server_pid))
                await asyncio.sleep(window - settle)
                spans.append((k, arm, switched, start,
                              (time.perf_counter(), time.process_time(), process_cpu_s(server_pid))))
                log.info("window %d of %d (%s) done", k + 1, 2 * pairs, arm)
                for t in tasks:
                    if t.done():  # a client failed: stop with its error rather than measure fewer clients
                        t.result()
            await asyncio.sleep(window)  # the last window's requests are answered
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    windows = []
    for k, arm, switched, (t0, cpu0, srv0), (t1, cpu1, srv1) in spans:
        counted = [(g, n * overlap(b, e, t0, t1)) for b, e, g, n in done if b < t1 and e > t0]
        plain = sum(n for g, n in counted if g == "plain")
        extra = sum(n for g, n in counted if g != "plain")
        windows.append({"pair": k // 2 + 1, "arm": arm, "seconds": t1 - t0,
                        "plain_images_per_s": plain / (t1 - t0), "all_images_per_s": (plain + extra) / (t1 - t0),
                        "extra_images_in_other_mode": sum(n for g, n in counted if g not in ("plain", arm)),
                        # previews of the requests sent in this window (from its switch on), whenever they ended; those
                        # of the other mode's requests still running in its counted span (a settle shorter than a
                        # request on a busy machine) apart
                        "previews": sum(switched <= sent < t1 and a == arm for sent, _, a in previews),
                        "previews_in_other_mode": sum(t0 <= end < t1 and a != arm for _, end, a in previews),
                        "service_cpu_pct": 100 * (srv1 - srv0) / (t1 - t0),
                        "client_cpu_pct": 100 * (cpu1 - cpu0) / (t1 - t0)})
    return windows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.stream_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--pairs", type=int, default=12, help="control/streams window pairs (at least 2)")
    p.add_argument("--window", type=float, default=10.0, help="seconds per window, settling included")
    p.add_argument("--settle", type=float, default=2.0, help="seconds at the start of each window not counted")
    p.add_argument("--warmup", type=float, default=10.0, help="seconds of load before the first window")
    p.add_argument("--slots", type=int, default=16, help="max_active_images of the service")
    p.add_argument("--client-nice", type=int, default=0,
                   help="niceness of the load generator (default 0: as the service; 19: it yields to the service)")
    p.add_argument("--out", type=Path, default=None, help="append the report to this markdown file (raw JSON beside)")
    a = p.parse_args(argv)
    if a.pairs < 2 or not 0 <= a.settle < a.window:
        p.error("need --pairs >= 2 and 0 <= --settle < --window")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    model = load_checkpoint(a.checkpoint)
    d = model.defaults
    body = {"num_images": 1, "steps": d.steps, "encoder_interval": d.encoder_interval, "guidance_scale": d.guidance_scale}
    srv = ServerProcess(a.checkpoint, Path("/tmp/dualrate-stream-cost.log"), max_active_images=a.slots,
                        max_images_per_request=a.slots, queue_size=1024)
    try:
        srv.wait_ready()
        if a.client_nice:
            os.nice(a.client_nice)  # after the server started: it keeps the default priority
        windows = asyncio.run(alternate(srv.url, srv.proc.pid, body, a.pairs, a.window, a.settle, a.warmup,
                                         num_classes=model.cfg.num_classes))
    finally:
        srv.terminate()
    by_pair = [{w["arm"]: w for w in windows if w["pair"] == i} for i in range(1, a.pairs + 1)]
    ratios = [p["streams"]["plain_images_per_s"] / p["control"]["plain_images_per_s"] for p in by_pair]
    totals = [p["streams"]["all_images_per_s"] / p["control"]["all_images_per_s"] for p in by_pair]
    ci, ci_all = mean_ci(ratios), mean_ci(totals)
    verdict = ("1 is inside it: no cost is measurable at this resolution" if ci[1] <= 1 <= ci[2] else
               "1 is outside it: the difference is measurable")

    def mean_of(arm: str, key: str) -> float:
        return statistics.fmean(w[key] for w in windows if w["arm"] == arm)

    command = command_line("python -m loadtests.stream_cost", argv)
    lines = [f"### What streaming costs the other clients (continuous), {utc_stamp()}, {platform.machine()} CPU "
             f"({os.cpu_count()} cores), onnxruntime", "", f"Command: `{command}`", "",
             f"One server, {a.slots} slots, requests of 1 image, N = {d.steps}, K = {d.encoder_interval}, guidance "
             f"{d.guidance_scale}. {PLAIN} plain closed-loop clients throughout; {EXTRA} more clients switch between "
             f"/generate/stream (a preview every {PREVIEW_EVERY} steps) and /generate (control) every {a.window:g} s "
             f"(first {a.settle:g} s of each window not counted), {a.pairs} pairs in ABBA order after {a.warmup:g} s of "
             f"warm-up; load generator at nice {a.client_nice}. **Plain clients' images/s with streams / control: mean "
             f"{ci[0]:.3f}, 95% confidence interval {ci[1]:.3f}-{ci[2]:.3f} over the {a.pairs} pairs: {verdict}.** All "
             f"clients' images/s: mean ratio {ci_all[0]:.3f} ({ci_all[1]:.3f}-{ci_all[2]:.3f}).", "",
             "| pair | plain images/s (control) | plain images/s (with streams) | ratio | all images/s (control) "
             "| all images/s (with streams) | previews |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for i, (pr, q, t) in enumerate(zip(by_pair, ratios, totals, strict=True), 1):
        c, s = pr["control"], pr["streams"]
        lines.append(f"| {i} | {c['plain_images_per_s']:.2f} | {s['plain_images_per_s']:.2f} | {q:.3f} | "
                     f"{c['all_images_per_s']:.2f} | {s['all_images_per_s']:.2f} ({t:.3f}) | {s['previews']} |")
    lines += ["", "CPU time per window, mean over the windows, in % of one core: service "
              f"{mean_of('control', 'service_cpu_pct'):.0f}% (control) / {mean_of('streams', 'service_cpu_pct'):.0f}% "
              f"(streams); load generator {mean_of('control', 'client_cpu_pct'):.1f}% / "
              f"{mean_of('streams', 'client_cpu_pct'):.1f}%."]
    raw = {**provenance(a.checkpoint, command), "slots": a.slots, "request": body, "pairs": a.pairs,
           "window_s": a.window, "settle_s": a.settle, "warmup_s": a.warmup, "client_nice": a.client_nice,
           "windows": windows, "plain_ratios": ratios, "all_ratios": totals, "mean_plain_ratio_ci95": ci,
           "mean_all_ratio_ci95": ci_all}
    publish(lines, a.out, raw)


if __name__ == "__main__":
    main()
