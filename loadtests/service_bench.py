"""Service benchmark: the HTTP service against the bare engine loop, batching gains, continuous vs request-level.

    python -m loadtests.service_bench [--seconds 20] [--out docs/runs/service_bench.md]

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
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from dualrate.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from dualrate.diffusion import CosineSchedule
from dualrate.provenance import command_line, provenance, publish, utc_stamp
from dualrate.sampler import dual_rate_sample
from engines import create_engine
from loadtests.clients import (
    closed_loop,
    core_requests,
    fixed_requests,
    httpx_post,
    lean_post,
    open_loop_mix,
    pct,
)
from loadtests.lean_http import LeanConnection
from loadtests.process import ServerProcess

log = logging.getLogger("loadtests.service_bench")


def bare_engine_ips(checkpoint: Path, batch: int, steps: int, k: int, g: float, seconds: float) -> float:
    model = load_checkpoint(checkpoint)
    engine = create_engine(checkpoint, backend="onnxruntime", device="cpu", max_batch=2 * batch)
    sched = CosineSchedule(model.cfg.logsnr_min, model.cfg.logsnr_max)
    labels = torch.arange(batch) % model.cfg.num_classes

    def run() -> None:
        dual_rate_sample(engine.encode, engine.denoise, labels, list(range(batch)), steps, k, g, sched,
                         model.cfg.null_label, sample_shape=model.cfg.sample_shape)

    run()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        run()
        n += batch
    engine.close()
    return n / (time.perf_counter() - t0)


def tick_breakdown(url: str, run) -> tuple[Any, dict[str, float]]:
    """Run `run()` and split its wall time with the service's own metrics: the share spent inside scheduler ticks,
    inside light-network and encoder calls (the encoder's, for async calls, from submit to features ready), ticks/s
    and images per tick. -> (run's result, figures)."""
    from loadtests.process import metric

    names = [("tick_s", "dualrate_tick_duration_seconds_sum", ""), ("ticks", "dualrate_tick_duration_seconds_count", ""),
             ("den_s", "dualrate_network_duration_seconds_sum", 'network="denoiser"'),
             ("enc_s", "dualrate_network_duration_seconds_sum", 'network="encoder"'),
             ("den_rows", "dualrate_network_rows_total", 'network="denoiser"')]

    def read() -> dict[str, float]:
        text = httpx.get(f"{url}/metrics", timeout=30).text
        return {k: metric(text, n, lab) for k, n, lab in names}

    before, t0 = read(), time.perf_counter()
    out = run()
    wall, after = time.perf_counter() - t0, read()
    d = {k: after[k] - before[k] for k in before}
    ticks = max(d["ticks"], 1.0)
    return out, {"ticks_per_s": d["ticks"] / wall, "in_ticks": d["tick_s"] / wall, "in_light_network": d["den_s"] / wall,
                 "in_encoder": d["enc_s"] / wall, "rows_per_tick": d["den_rows"] / ticks,
                 "ms_per_tick_outside_light_network": 1000 * (d["tick_s"] - d["den_s"]) / ticks}


def saturation_only(a: argparse.Namespace) -> None:
    """Bare engine loop once, then the service at saturation once per settings set (DUALRATE_* without prefix)."""
    d = load_checkpoint(a.checkpoint).defaults
    body = {"num_images": 1, "steps": d.steps, "encoder_interval": d.encoder_interval,
            "guidance_scale": d.guidance_scale}
    bare = bare_engine_ips(a.checkpoint, a.slots, d.steps, d.encoder_interval, d.guidance_scale, a.seconds)
    lines = [f"| service settings | bare engine, batch {a.slots} | service at saturation | ratio | time in ticks | in light "
             "network | in encoder (async) | rows/tick | ms/tick outside light network |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for spec in a.saturation:
        extra = dict(kv.split("=", 1) for kv in spec.split(",") if kv != "default")
        srv = ServerProcess(a.checkpoint, Path("/tmp/dualrate-bench-saturation.log"), max_active_images=a.slots,
                            max_images_per_request=a.slots, queue_size=1024, **extra)
        try:
            srv.wait_ready()
            (ips, _), br = tick_breakdown(srv.url, lambda u=srv.url: asyncio.run(closed_loop(u, 2 * a.slots, a.seconds, body)))
        finally:
            srv.terminate()
        lines.append(f"| {spec} | {bare:.2f} | {ips:.2f} | {ips / bare:.2f} | {br['in_ticks']:.0%} | {br['in_light_network']:.0%} "
                     f"| {br['in_encoder']:.0%} | {br['rows_per_tick']:.1f} | {br['ms_per_tick_outside_light_network']:.1f} |")
        log.info("%s", lines[-1])
    print("\n".join(lines))


def interleaved(a: argparse.Namespace, argv: list[str] | None) -> None:
    """Saturation, bare engine loop and the service (once per settings arm, `--arms`) alternately, `a.pairs` times
    each, in one run: each arm's share of the bare loop per round and their median, with the tick's time split by
    the service's own metrics."""
    model = load_checkpoint(a.checkpoint)
    d = model.defaults
    body = {"num_images": 1, "steps": d.steps, "encoder_interval": d.encoder_interval, "guidance_scale": d.guidance_scale}
    arms = a.arms or ["default"]
    pairs = []
    for i in range(a.pairs):
        bare = bare_engine_ips(a.checkpoint, a.slots, d.steps, d.encoder_interval, d.guidance_scale, a.seconds)
        for arm in arms:
            extra = dict(kv.split("=", 1) for kv in arm.split(",") if kv != "default")
            srv = ServerProcess(a.checkpoint, Path("/tmp/dualrate-bench-interleaved.log"), max_active_images=a.slots,
                                max_images_per_request=a.slots, queue_size=1024, **extra)
            try:
                srv.wait_ready()
                (ips, _), br = tick_breakdown(srv.url, lambda u=srv.url: asyncio.run(
                    closed_loop(u, 2 * a.slots, a.seconds, body, model.cfg.num_classes)))
            finally:
                srv.terminate()
            pairs.append({"round": i + 1, "arm": arm, "bare_images_per_s": bare, "service_images_per_s": ips,
                          "ratio": ips / bare, **br})
            log.info("round %d, %s: bare %.2f, service %.2f images/s (%.3f)", i + 1, arm, bare, ips, ips / bare)
    medians = {arm: statistics.median(p["ratio"] for p in pairs if p["arm"] == arm) for arm in arms}
    stamp = utc_stamp()
    command = command_line("python -m loadtests.service_bench", argv)
    summary = "; ".join(f"{arm}: {m:.3f}" for arm, m in medians.items())
    lines = [f"### Saturation, bare loop and service interleaved, {stamp}, {platform.machine()} CPU, onnxruntime", "",
             f"Command: `{command}`", "",
             f"Requests: 1 image, N = {d.steps}, K = {d.encoder_interval}, guidance {d.guidance_scale}; "
             f"{a.slots} slots ({2 * a.slots} closed-loop clients), bare loop on the same batch; {a.seconds:.0f} s per "
             f"measurement. **Median service / bare over the {a.pairs} rounds: {summary}.**", "",
             "| round | service settings | bare engine images/s | service images/s | service / bare | time in ticks "
             "| in light network | in encoder (async) | rows/tick | ms/tick outside light network |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in pairs:
        lines.append(f"| {p['round']} | {p['arm']} | {p['bare_images_per_s']:.2f} | {p['service_images_per_s']:.2f} | "
                     f"{p['ratio']:.3f} | {p['in_ticks']:.0%} | {p['in_light_network']:.0%} | {p['in_encoder']:.0%} | "
                     f"{p['rows_per_tick']:.1f} | {p['ms_per_tick_outside_light_network']:.1f} |")
    raw = {**provenance(a.checkpoint, command), "slots": a.slots, "seconds": a.seconds, "request": body,
           "pairs": pairs, "median_ratio": medians}
    publish(lines, a.out, raw)


def alternating(a: argparse.Namespace, argv: list[str] | None) -> None:
    """Saturation in short alternating windows: the bare loop and one warm service (its defaults) take turns over the
    same number of images (`a.window_batches` batches of `a.slots`), `a.windows` times, with nothing restarted in
    between. This machine's speed drifts by 10-25% over tens of seconds (docs/cpu_backends.md); windows of a few
    seconds put both sides of each pair in the same drift, which 20 s rounds with a restart in between did not."""
    model = load_checkpoint(a.checkpoint)
    d, cfg = model.defaults, model.cfg
    body = {"num_images": 1, "steps": d.steps, "encoder_interval": d.encoder_interval, "guidance_scale": d.guidance_scale}
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
    command = command_line("python -m loadtests.service_bench", argv)
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
    p = argparse.ArgumentParser(prog="python -m loadtests.service_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--seconds", type=float, default=20.0, help="per measurement")
    p.add_argument("--slots", type=int, default=16, help="max_active_images of the service")
    p.add_argument("--out", type=Path, default=None, help="append the report to this markdown file")
    p.add_argument("--saturation", nargs="+", metavar="KEY=VALUE[,KEY=VALUE]", default=None,
                   help="only compare saturation: bare engine loop, then the service once per given settings set "
                        "(e.g. threads=1 overlap_encoder=false), alternating, and print a table")
    p.add_argument("--pairs", type=int, default=0,
                   help="only saturation: bare loop and service interleaved this many times each (median ratio)")
    p.add_argument("--arms", nargs="+", metavar="KEY=VALUE[,KEY=VALUE]", default=None,
                   help="with --pairs: the service once per settings set in each round (e.g. engine_process=off "
                        "engine_process=on); default: the service's defaults")
    p.add_argument("--windows", type=int, default=0,
                   help="only saturation: bare loop and one warm service alternately in this many short windows "
                        "of the same images (median ratio; drift of the machine cancels within a pair)")
    p.add_argument("--window-batches", type=int, default=4, help="with --windows: batches of --slots per window")
    p.add_argument("--core", action="store_true",
                   help="with --windows: also the service's scheduler and engine in this process without HTTP, in the "
                   "same windows (what of the gap is the scheduler, what the HTTP side)")
    p.add_argument("--client", choices=("httpx", "lean"), default="httpx",
                   help="with --windows: the load generator's HTTP client: httpx, or loadtests.lean_http (one "
                   "kept-alive socket per client, less CPU per request on the cores the service shares)")
    p.add_argument("--client-nice", type=int, default=0,
                   help="with --windows: niceness of this process (the load generator, and the bare loop, which runs "
                   "alone) after the server has started; 19 makes the load generator take mostly the cores the service "
                   "leaves idle, a stand-in for clients on other machines (default 0: as the service)")
    a = p.parse_args(argv)
    if a.windows:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("httpx").setLevel(logging.WARNING)
        alternating(a, argv)
        return
    if a.pairs:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("httpx").setLevel(logging.WARNING)
        interleaved(a, argv)
        return
    if a.saturation:
        saturation_only(a)
        return
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
