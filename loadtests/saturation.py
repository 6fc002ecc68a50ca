"""Saturation under several service settings: the bare engine loop once, then the service once per settings set.

    python -m loadtests.saturation --saturation threads=1 overlap_encoder=false [--seconds 20]

Prints a table: the service's images/s at saturation against the bare loop's, and the split of its time by the
service's own metrics (time in ticks, in the light network, in the encoder, rows per tick).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from dualrate.checkpoint import load_checkpoint
from loadtests.bare import bare_engine_ips, saturation_args, saturation_body, settings_arm, tick_breakdown
from loadtests.clients import closed_loop
from loadtests.process import ServerProcess

log = logging.getLogger("loadtests.saturation")


def saturation(a: argparse.Namespace) -> None:
    """Bare engine loop once, then the service at saturation once per settings set (DUALRATE_* without prefix)."""
    d = load_checkpoint(a.checkpoint).defaults
    body = saturation_body(a.checkpoint)
    bare = bare_engine_ips(a.checkpoint, a.slots, d.steps, d.encoder_interval, d.guidance_scale, a.seconds)
    lines = [f"| service settings | bare engine, batch {a.slots} | service at saturation | ratio | time in ticks | in light "
             "network | in encoder (async) | rows/tick | ms/tick outside light network |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for spec in a.saturation:
        extra = settings_arm(spec)
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.saturation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    saturation_args(p)
    p.add_argument("--saturation", nargs="+", metavar="KEY=VALUE[,KEY=VALUE]", required=True,
                   help="the service once per given settings set (e.g. threads=1 overlap_encoder=false; default = "
                   "its defaults)")
    a = p.parse_args(argv)
    saturation(a)


if __name__ == "__main__":
    main()
