"""What tracing costs: the service with traces off (the default) against the same service exporting every request's
spans to an OTLP/HTTP receiver, side by side in one run, and what the off path's hooks cost per request.

    python -m loadtests.tracing_cost [--pairs 4] [--window 8] [--clients 8] [--out docs/runs/tracing.md]

Two servers of the same settings start at once: one without OTEL_* variables, one with OTEL_EXPORTER_OTLP_ENDPOINT
pointing at a receiver in this process (loadtests.otlp; it decodes every span, as a collector would). Windows of
`--clients` closed-loop clients alternate between them in ABBA order (off first in odd pairs), so a drift over the
run cancels out; the idle server waits meanwhile. Per pair: images/s and p50 latency of the "on" window over the "off"
window, reported as the mean ratio with its 95% t interval ("nothing measurable" = 1 inside it).

The off path is also timed directly: the work every request does for tracing while it is off (two `span()` blocks,
`current_traceparent()`, the attribute tests) in a loop of 200,000, as microseconds per request beside the measured
request latency. The request id (always on, not part of tracing) is timed the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import statistics
import tempfile
import timeit
from pathlib import Path

from dualrate.checkpoint import DEFAULT_CHECKPOINT
from dualrate.provenance import command_line, provenance, publish, utc_stamp
from loadtests.bare import log_progress
from loadtests.clients import closed_loop, pct
from loadtests.otlp import OtlpReceiver
from loadtests.process import ServerProcess
from loadtests.stream_cost import mean_ci

log = logging.getLogger("loadtests.tracing_cost")
BODY = {"num_images": 1, "steps": 16, "encoder_interval": 4, "seed": 0}


def off_path_us(n: int = 200_000) -> dict[str, float]:
    """Microseconds per request of the tracing hooks while tracing is off, and of the request id's handling."""
    from service.core import REQUEST_ID, TRACING, accept_request_id, current_traceparent, span

    assert TRACING.tracer is None, "run without OTEL_* variables"

    def hooks() -> None:
        current_traceparent()
        with span("validate"):
            pass
        with span("encode_png"):
            pass
        if TRACING.tracer is not None:  # the middleware's and the core's tests
            raise AssertionError
        if TRACING.tracer is not None:
            raise AssertionError

    def request_id() -> None:
        REQUEST_ID.set(accept_request_id(None))

    return {"tracing_off_hooks_us": 1e6 * min(timeit.repeat(hooks, number=n, repeat=3)) / n,
            "request_id_us": 1e6 * min(timeit.repeat(request_id, number=n, repeat=3)) / n}


async def window(srv: ServerProcess, clients: int, seconds: float, offset: int) -> dict[str, float]:
    ips, latencies = await closed_loop(srv.url, clients, seconds, BODY, offset=offset)
    return {"images_per_s": ips, "p50_s": pct(latencies, 50), "p99_s": pct(latencies, 99), "n": len(latencies)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.tracing_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument("--pairs", type=int, default=4, help="ABBA pairs of windows (default 4)")
    ap.add_argument("--window", type=float, default=8.0, help="seconds per window (default 8)")
    ap.add_argument("--clients", type=int, default=8, help="closed-loop clients (default 8)")
    ap.add_argument("--slots", type=int, default=8, help="max_active_images of both servers (default 8)")
    ap.add_argument("--out", type=Path, default=None, help="append the report to this markdown file (+ .json)")
    a = ap.parse_args(argv)
    log_progress()
    plain_env = {k: "" for k in os.environ if k.startswith("OTEL_")}
    micro = off_path_us()
    log.info("off path: %.3f us of tracing hooks, %.3f us of request id per request", micro["tracing_off_hooks_us"],
             micro["request_id_us"])
    tmp = Path(tempfile.mkdtemp(prefix="tracing-cost-"))
    with OtlpReceiver() as rx:
        settings = {"max_active_images": a.slots, "max_images_per_request": a.slots, "queue_size": 4 * a.clients,
                    "threads": 1}
        servers = {
            "off": ServerProcess(a.checkpoint, tmp / "off.log", env=plain_env, **settings),
            "on": ServerProcess(a.checkpoint, tmp / "on.log", env={**plain_env, "OTEL_EXPORTER_OTLP_ENDPOINT":
                                                                   rx.endpoint}, **settings),
        }
        try:
            for srv in servers.values():
                srv.wait_ready()
            for srv in servers.values():  # warm both: the first requests of a server are slower
                asyncio.run(window(srv, a.clients, 2.0, 0))
            pairs = []
            for i in range(a.pairs):
                order = ["off", "on"] if i % 2 == 0 else ["on", "off"]
                got = {}
                for name in order:
                    got[name] = asyncio.run(window(servers[name], a.clients, a.window, i))
                    log.info("pair %d %s: %.1f images/s, p50 %.1f ms", i + 1, name, got[name]["images_per_s"],
                             1000 * got[name]["p50_s"])
                pairs.append(got)
            spans = len(rx.spans)
        finally:
            for srv in servers.values():
                srv.terminate()
    ips_ratio = [p["on"]["images_per_s"] / p["off"]["images_per_s"] for p in pairs]
    p50_ratio = [p["on"]["p50_s"] / p["off"]["p50_s"] for p in pairs]
    ips_ci, p50_ci = mean_ci(ips_ratio), mean_ci(p50_ratio)
    off_p50 = statistics.median(p["off"]["p50_s"] for p in pairs)
    share = micro["tracing_off_hooks_us"] / (1e6 * off_p50)
    command = command_line("python -m loadtests.tracing_cost", argv)
    lines = [
        f"### What tracing costs, {utc_stamp()}, {platform.machine()} CPU ({os.cpu_count()} cores), onnxruntime", "",
        f"Command: `{command}`", "",
        f"Two servers of the same settings ({a.slots} slots, 1 thread each), one without OTEL_* variables (off), one "
        f"exporting every request's spans to an OTLP/HTTP receiver in the load generator's process (on); "
        f"{a.clients} closed-loop clients, requests of {BODY['num_images']} image, {BODY['steps']} steps, K = "
        f"{BODY['encoder_interval']}; {a.pairs} ABBA pairs of {a.window:g} s windows.",
        "",
        "| pair | off images/s | on images/s | off p50 ms | on p50 ms |",
        "|---:|---:|---:|---:|---:|",
        *[f"| {i + 1} | {p['off']['images_per_s']:.1f} | {p['on']['images_per_s']:.1f} | "
          f"{1000 * p['off']['p50_s']:.1f} | {1000 * p['on']['p50_s']:.1f} |" for i, p in enumerate(pairs)],
        "",
        f"**On / off images/s: mean {ips_ci[0]:.3f} (95% CI {ips_ci[1]:.3f}-{ips_ci[2]:.3f}); p50 latency on / off: "
        f"mean {p50_ci[0]:.3f} (95% CI {p50_ci[1]:.3f}-{p50_ci[2]:.3f}).** {spans} spans received.",
        f"Off path, timed directly: {micro['tracing_off_hooks_us']:.3f} us of tracing hooks per request, "
        f"{100 * share:.5f}% of the off arm's p50 of {1000 * off_p50:.1f} ms; the request id (always on) costs "
        f"{micro['request_id_us']:.3f} us per request.",
    ]
    raw = {**provenance(a.checkpoint, command), "settings": {**settings, "clients": a.clients, "window_s": a.window,
                                                             "body": BODY},
           "pairs": pairs, "on_over_off_images_per_s_ci95": ips_ci, "on_over_off_p50_ci95": p50_ci,
           "spans_received": spans, **micro, "off_hooks_share_of_p50": share}
    publish(lines, a.out, raw)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
