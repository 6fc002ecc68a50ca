"""Saturation, the bare engine loop and the service (once per settings arm) interleaved, round after round.

    python -m loadtests.interleaved --pairs 3 [--arms engine_process=off engine_process=on] [--out FILE.md]

Each arm's share of the bare loop per round and the median over the rounds, with the tick's time split by the
service's own metrics. (Runs before 2026-12-06 ran this as `python -m loadtests.service_bench --pairs`, which still
forwards here.)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import platform
import statistics
from pathlib import Path

from dualrate.checkpoint import load_checkpoint
from dualrate.provenance import command_line, provenance, publish, utc_stamp
from loadtests.bare import bare_engine_ips, log_progress, saturation_args, saturation_body, settings_arm, tick_breakdown
from loadtests.clients import closed_loop
from loadtests.process import ServerProcess

log = logging.getLogger("loadtests.interleaved")


def interleaved(a: argparse.Namespace, argv: list[str] | None) -> None:
    """Saturation, bare engine loop and the service (once per settings arm, `--arms`) alternately, `a.pairs` times
    each, in one run: each arm's share of the bare loop per round and their median, with the tick's time split by
    the service's own metrics."""
    model = load_checkpoint(a.checkpoint)
    d = model.defaults
    body = saturation_body(a.checkpoint)
    arms = a.arms or ["default"]
    pairs = []
    for i in range(a.pairs):
        bare = bare_engine_ips(a.checkpoint, a.slots, d.steps, d.encoder_interval, d.guidance_scale, a.seconds)
        for arm in arms:
            extra = settings_arm(arm)
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
    command = command_line("python -m loadtests.interleaved", argv)
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.interleaved", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    saturation_args(p)
    p.add_argument("--pairs", type=int, required=True, help="rounds: bare loop and service interleaved this many times")
    p.add_argument("--arms", nargs="+", metavar="KEY=VALUE[,KEY=VALUE]", default=None,
                   help="the service once per settings set in each round (e.g. engine_process=off "
                        "engine_process=on); default: the service's defaults")
    a = p.parse_args(argv)
    log_progress()
    interleaved(a, argv)


if __name__ == "__main__":
    main()
