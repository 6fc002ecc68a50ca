"""Which PostgreSQL driver the job store uses, by measurement: the store's own operations (submit, get, claim, renew,
checkpoint write) through SQLAlchemy over asyncpg and over psycopg 3, against one throwaway PostgreSQL on loopback,
and the same over SQLite (aiosqlite) for scale.

    python -m loadtests.store_drivers [--jobs 400] [--rounds 3] [--out docs/runs/store_drivers.md]

Each round and driver: a fresh database, `--jobs` submits by 8 concurrent tasks, a get of each, claims of 8 until none
is left, a lease renewal of what was claimed, and one checkpoint write (a 4 KB sample) per job; per operation the
median latency. Drivers alternate within each round. psycopg is not a dependency of the service: install
`psycopg[binary]` to run this.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from dualrate.checkpoint import DEFAULT_CHECKPOINT
from dualrate.provenance import command_line, provenance, publish, utc_stamp
from loadtests.postgres import Postgres
from service.jobs.store import Checkpoint, JobStore

BODY = {"class_label": 1, "num_images": 1, "steps": 32, "encoder_interval": 4, "guidance_scale": 1.5, "seed": 0}


async def one_run(url: str, jobs: int) -> dict[str, float]:
    store = JobStore(url)
    await store.open()
    times: dict[str, list[float]] = {"submit": [], "get": [], "claim": [], "renew": [], "checkpoint": []}

    async def timed(name: str, coro):
        t0 = time.perf_counter()
        out = await coro
        times[name].append(time.perf_counter() - t0)
        return out

    ids: list[str] = []
    todo = iter(range(jobs))

    async def submitter() -> None:
        for i in todo:
            job, _ = await timed("submit", store.submit("", {**BODY, "seed": i}, "m", 1, 32, None, None))
            ids.append(job.id)

    await asyncio.gather(*[submitter() for _ in range(8)])
    for job_id in ids:
        await timed("get", store.get(job_id))
    claimed = []
    while True:
        got = await timed("claim", store.claim("bench", 30.0, 8))
        if not got:
            break
        claimed += [j for j, _ in got]
    for chunk in (claimed[i:i + 8] for i in range(0, len(claimed), 8)):
        await timed("renew", store.renew("bench", {j.id: (4, 0, {0: 4}) for j in chunk}, 30.0))
    sample = bytes(4096)
    for j in claimed:
        await timed("checkpoint", store.save_checkpoint("bench", j.id, Checkpoint(0, 4, 4, 1, sample)))
    await store.close()
    return {k: 1000 * statistics.median(v) for k, v in times.items() if v}


async def drop_and_create(pg: Postgres, name: str) -> str:
    import asyncpg

    conn = await asyncpg.connect(host="127.0.0.1", port=pg.port, user="dualrate", database="postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return f"dualrate@127.0.0.1:{pg.port}/{name}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.store_drivers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="store-drivers-"))
    results: dict[str, list[dict[str, float]]] = {"asyncpg": [], "psycopg": [], "aiosqlite": []}
    with Postgres(tmp / "pg") as pg:
        for r in range(a.rounds):
            order = ["asyncpg", "psycopg"] if r % 2 == 0 else ["psycopg", "asyncpg"]
            for driver in order:
                where = asyncio.run(drop_and_create(pg, f"bench_{driver}"))
                results[driver].append(asyncio.run(one_run(f"postgresql+{driver}://{where}", a.jobs)))
                print(driver, results[driver][-1], flush=True)
            results["aiosqlite"].append(asyncio.run(one_run(f"sqlite:///{tmp / f'r{r}.db'}", a.jobs)))
            print("aiosqlite", results["aiosqlite"][-1], flush=True)
    ops = ["submit", "get", "claim", "renew", "checkpoint"]
    med = {d: {op: statistics.median(run[op] for run in runs) for op in ops} for d, runs in results.items()}
    command = command_line("python -m loadtests.store_drivers", argv)
    lines = [f"### Job store drivers, {utc_stamp()}, {platform.machine()} CPU ({os.cpu_count()} cores), PostgreSQL on "
             "loopback (fsync off)", "", f"Command: `{command}`", "",
             f"Median latency per store operation (ms), median over {a.rounds} rounds of {a.jobs} jobs each "
             "(submits by 8 concurrent tasks; claims of 8; renewals of 8 jobs; a 4 KB checkpoint per job):", "",
             "| driver | " + " | ".join(ops) + " |", "|---|" + "---:|" * len(ops),
             *[f"| {d} | " + " | ".join(f"{med[d][op]:.2f}" for op in ops) + " |" for d in med]]
    publish(lines, a.out, {**provenance(DEFAULT_CHECKPOINT, command), "jobs": a.jobs, "rounds": results,
                           "median_ms": med})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
