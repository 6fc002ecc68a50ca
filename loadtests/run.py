"""Drive the real service with locust, headless, and compare configurations side by side in one run.

    python -m loadtests.run --duration 60 --users 16 --configs k1 k4 k8 request torch --out docs/benchmarks.md

For each configuration: start the service (its own process, loopback), run locust headless for a fixed time and
user count, keep locust's CSVs under --csv-dir, and summarise images/s, p50/p95/p99 latency of successful requests
and failures by kind. Exits non-zero if any configuration had unexpected failures.
"""

from __future__ import annotations

import argparse
import csv
import logging
import platform
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np

from dualrate.checkpoint import DEFAULT_CHECKPOINT
from dualrate.provenance import command_line, provenance, publish, utc_stamp
from loadtests.process import ServerProcess, metric

log = logging.getLogger("loadtests.run")
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class LoadConfig:
    name: str
    settings: dict  # DUALRATE_* settings of the service
    forced_k: int | None  # LOAD_ENCODER_INTERVAL for locust


CONFIGS = {
    "k1": LoadConfig("K=1 (encoder every step)", {}, 1),
    "k4": LoadConfig("K=4", {}, 4),
    "k8": LoadConfig("K=8", {}, 8),
    "mixed": LoadConfig("mixed K (locust mix)", {}, None),
    "request": LoadConfig("K=4, request-level batching", {"policy": "request"}, 4),
    "torch": LoadConfig("K=4, torch backend", {"backend": "torch"}, 4),
}


@dataclass
class Summary:
    config: str
    requests: int
    images: float
    images_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    failures: Counter
    expected_invalid: int
    elapsed_s: float


def run_locust(url: str, users: int, duration: int, csv_prefix: Path, forced_k: int | None) -> float:
    """-> wall seconds from locust's start to its exit (the load time plus the wait for requests in flight)."""
    import os

    env = {**os.environ, "LOAD_ENCODER_INTERVAL": "" if forced_k is None else str(forced_k),
           "LOAD_LATENCY_CSV": f"{csv_prefix}_latencies.csv"}
    cmd = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless", "--host", url,
           "-u", str(users), "-r", str(max(1, users // 4)), "-t", f"{duration}s", "--csv", str(csv_prefix),
           "--only-summary", "--stop-timeout", "120", "--loglevel", "WARNING"]
    t0 = time.monotonic()
    subprocess.run(cmd, env=env, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.monotonic() - t0


def summarise(name: str, csv_prefix: Path, images: float, elapsed: float) -> Summary:
    """Latency percentiles over every valid request's own latency (one pool: the aggregate, not a mean of per-name
    percentiles); images/s over the measured wall time of the run."""
    with open(f"{csv_prefix}_stats.csv") as f:
        rows = list(csv.DictReader(f))
    agg = next(r for r in rows if r["Name"] == "Aggregated")
    invalid = sum(int(r["Request Count"]) - int(r["Failure Count"]) for r in rows if "invalid" in r["Name"])
    failures: Counter = Counter()
    with open(f"{csv_prefix}_failures.csv") as f:
        for r in csv.DictReader(f):
            kind = r["Error"].split(":")[0].replace("CatchResponseError('", "").strip("(')\"")
            failures[kind] += int(r["Occurrences"])
    with open(f"{csv_prefix}_latencies.csv") as f:
        valid = [float(r["response_ms"]) for r in csv.DictReader(f) if r["ok"] == "1" and "invalid" not in r["name"]]
    p50, p95, p99 = (float(np.percentile(valid, q)) if valid else float("nan") for q in (50, 95, 99))
    return Summary(name, int(agg["Request Count"]), images, images / elapsed, p50, p95, p99, failures, invalid,
                   round(elapsed, 1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--configs", nargs="+", default=["k1", "k4", "k8", "request", "torch"], choices=sorted(CONFIGS))
    p.add_argument("--duration", type=int, default=60, help="seconds of load per configuration")
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--slots", type=int, default=16, help="max_active_images of the service")
    p.add_argument("--csv-dir", type=Path, default=Path("artifacts/loadtests"))
    p.add_argument("--out", type=Path, default=None, help="append the comparison table to this markdown file; the raw "
                   "summary (with date, machine, commit, checkpoint hash) goes beside it as <name>.json")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    a.csv_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for key in a.configs:
        cfg = CONFIGS[key]
        settings = {"max_active_images": a.slots, "max_images_per_request": 8, "queue_size": 256, **cfg.settings}
        srv = ServerProcess(a.checkpoint, a.csv_dir / f"{key}_server.log", **settings)
        try:
            srv.wait_ready()
            before = metric(httpx.get(f"{srv.url}/metrics").text, "dualrate_images_generated_total")
            log.info("%s: locust %d users for %d s", cfg.name, a.users, a.duration)
            elapsed = run_locust(srv.url, a.users, a.duration, a.csv_dir / key, cfg.forced_k)
            images = metric(httpx.get(f"{srv.url}/metrics").text, "dualrate_images_generated_total") - before
        finally:
            srv.terminate()
        s = summarise(cfg.name, a.csv_dir / key, images, elapsed)
        log.info("%s", s)
        results.append(s)
    stamp = utc_stamp()
    lines = [f"### Locust load test, {stamp}, {platform.machine()} CPU (2 cores), service + locust on one machine",
             "", f"Command: `{command_line('python -m loadtests.run', argv)}`", "",
             f"{a.users} users, {a.duration} s of load per configuration, service max_active_images = {a.slots}. "
             "Latency (ms): percentiles over every successful valid request of the configuration, pooled. images/s: "
             "images returned / wall time of the locust run (load plus the wait for requests in flight).", "",
             "| configuration | requests | images/s | p50 ms | p95 ms | p99 ms | unexpected failures | invalid (expected 422) |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    for s in results:
        fails = ", ".join(f"{k}: {v}" for k, v in s.failures.items()) or "0"
        lines.append(f"| {s.config} | {s.requests} | {s.images_per_s:.2f} | {s.p50_ms:.0f} | {s.p95_ms:.0f} | "
                     f"{s.p99_ms:.0f} | {fails} | {s.expected_invalid} |")
    command = command_line("python -m loadtests.run", argv)
    raw = {**provenance(a.checkpoint, command), "users": a.users, "duration_s": a.duration, "slots": a.slots,
           "results": [{**asdict(s), "failures": dict(s.failures)} for s in results]}
    publish(lines, a.out, raw)
    return 1 if any(s.failures for s in results) else 0


if __name__ == "__main__":
    sys.exit(main())
