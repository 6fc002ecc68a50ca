"""Jobs are never lost (issue 39): a service SIGKILLed while its jobs run and started again on the same SQLite file
finishes every job; two replicas on one PostgreSQL, one SIGKILLed mid-run, and the other finishes every job from the
checkpoints; without a kill, no job is ever run by both. Every image is byte for byte the image /generate gives for its
seed (an uninterrupted run), and the work done again is bounded by the checkpoint interval."""

from __future__ import annotations

import asyncio
import base64
import sqlite3
import time

import httpx
import pytest

from loadtests.postgres import Postgres, available
from loadtests.process import ServerProcess, metric

pytestmark = pytest.mark.slow
STEPS, K, CHECKPOINT_S = 128, 4, 0.2  # 128 steps: an image outlives several checkpoints (64 let one kill find none)
SETTINGS = dict(max_active_images=4, max_images_per_request=2, queue_size=32, max_steps=STEPS, threads=1,
                job_lease_s=2, job_checkpoint_s=CHECKPOINT_S)


def submit_jobs(url: str, n: int) -> list[str]:
    ids = []
    for i in range(n):
        r = httpx.post(f"{url}/v1/jobs", json={"class_label": i % 10, "num_images": 2, "steps": STEPS,
                                              "encoder_interval": K, "seed": 1000 * i}, timeout=30)
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    return ids


def states(url: str) -> dict[str, str]:
    jobs = httpx.get(f"{url}/v1/jobs", params={"limit": 100}, timeout=30).json()["jobs"]
    return {j["id"]: j["status"] for j in jobs}


def wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} within {timeout} s")


def check_images(url: str, ids: list[str]) -> None:
    """Every job succeeded, with the images /generate gives for the same seeds (PNG bytes)."""
    for i, job_id in enumerate(ids):
        job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
        assert job["status"] == "succeeded", job
        ref = httpx.post(f"{url}/generate", json={"class_label": i % 10, "num_images": 2, "steps": STEPS,
                                                 "encoder_interval": K, "seed": 1000 * i}, timeout=120).json()
        for im, want in zip(job["images"], ref["images"], strict=True):
            got = httpx.get(f"{url}{im['url']}", timeout=30).content
            assert got == base64.b64decode(want["png_base64"]), (job_id, im["index"])


def image_steps_run(url: str) -> float:
    """Image-steps this replica's light network has run (its rows over the rows per image-step of the test's
    requests: class-conditional at the card's guidance)."""
    from dualrate.checkpoint import DEFAULT_CHECKPOINT, read_card
    from dualrate.sampler import rows_per_image
    from export.card import model_spec

    spec = model_spec(read_card(DEFAULT_CHECKPOINT))
    rows = rows_per_image(1, spec.defaults.guidance_scale, spec.null_label)
    m = httpx.get(f"{url}/metrics", timeout=30).text
    return metric(m, "dualrate_network_rows_total", 'network="denoiser"') / rows


def replica_id(log: str) -> str:
    import re

    (found,) = re.findall(r"jobs: replica (\w+),", log)
    return found


def steps_per_checkpoint(url: str, window_s: float = 1.0) -> float:
    """Steps an image advances in one checkpoint interval and the write of its checkpoint (its mean time so far: the
    snapshot is kept once the store has it), at the ticks per second this replica ran over the last `window_s` (a
    step a tick), + K (a checkpoint waits for the next encoder refresh). The recent rate, not the run's mean tick
    time: on a machine shared with other work the rate moves, and the kill follows this reading."""
    def ticks() -> float:
        return metric(httpx.get(f"{url}/metrics", timeout=30).text, "dualrate_tick_duration_seconds_count")

    n0, t0 = ticks(), time.monotonic()
    time.sleep(window_s)
    rate = (ticks() - n0) / (time.monotonic() - t0)
    m = httpx.get(f"{url}/metrics", timeout=30).text
    write_s = metric(m, "dualrate_job_checkpoint_seconds_sum") / max(1.0, metric(m, "dualrate_job_checkpoint_seconds_count"))
    return (CHECKPOINT_S + write_s) * rate + K


def test_sqlite_jobs_survive_a_sigkill_and_resume_exactly(checkpoint_dir, tmp_path):
    store = tmp_path / "jobs.db"
    env = {"DUALRATE_JOB_STORE": f"sqlite:///{store}"}
    first = ServerProcess(checkpoint_dir, tmp_path / "first.log", env=env, **SETTINGS)
    try:
        first.wait_ready()
        ids = submit_jobs(first.url, 12)
        # Kill it while jobs run: some finished, some running with checkpoints written.
        def written() -> int:
            db = sqlite3.connect(store)
            try:
                return db.execute("SELECT count(*) FROM job_checkpoints").fetchone()[0]
            finally:
                db.close()

        wait_until(lambda: list(states(first.url).values()).count("succeeded") >= 3, 120, "3 jobs done")
        per_checkpoint = steps_per_checkpoint(first.url)
        wait_until(lambda: written() >= 2, 60, "checkpoints of running images")
        ran = image_steps_run(first.url)  # what it computed, read just before the kill (a few ticks may follow)
    except BaseException:  # it does not outlive a failure before the kill
        first.terminate()
        raise
    first.proc.kill()
    first.proc.wait()
    first.terminate()
    db = sqlite3.connect(store)
    running = db.execute("SELECT count(*) FROM jobs WHERE status = 'running'").fetchone()[0]
    checkpoints, kept_steps = db.execute("SELECT count(*), coalesce(sum(step), 0) FROM job_checkpoints").fetchone()
    stored = db.execute("SELECT count(*) FROM job_images").fetchone()[0]
    db.close()
    # Work lost with the process: what it ran, less the finished images and the steps the checkpoints keep.
    lost = ran - stored * STEPS - kept_steps
    assert running >= 1 and checkpoints >= 1  # the kill fell on running jobs with checkpoints
    second = ServerProcess(checkpoint_dir, tmp_path / "second.log", env=env, **SETTINGS)
    try:
        second.wait_ready()
        wait_until(lambda: set(states(second.url).values()) == {"succeeded"}, 180, "all 12 jobs succeeded")
        assert len(states(second.url)) == 12
        check_images(second.url, ids)
        db = sqlite3.connect(store)
        redone, resumed = db.execute("SELECT sum(redone_steps), sum(claims > 1) FROM jobs").fetchone()
        db.close()
        print(f"\nSQLite: {running} jobs running at the kill, {checkpoints} checkpoints; {resumed} jobs resumed; "
              f"image-steps computed again: about {lost:.0f} (measured: run before the kill less what was kept), "
              f"at least {redone} (the store's count, as of the last lease renewal); one checkpoint interval is "
              f"{per_checkpoint:.1f} steps per image; {stored} images were stored before the kill")
        assert resumed == running
        assert 0 <= redone <= lost + 4 * K  # the store's lower bound (a few ticks may follow the scrape)
        assert lost <= 4 * per_checkpoint + 4 * K  # at most the 4 slots' images, one interval each
        assert "taken over" in second.log() and "from checkpoints" in second.log()
    finally:
        second.terminate()


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    why = available()
    if why is not None:
        import os

        if os.environ.get("CI"):
            raise RuntimeError(f"CI must test the PostgreSQL store: {why} (scripts/install_test_tools.sh)")
        pytest.skip(why)
    pg = Postgres(tmp_path_factory.mktemp("pg")).start()
    yield pg
    pg.stop()


def fresh_database(pg: Postgres, name: str) -> str:
    import asyncpg

    async def create() -> None:
        conn = await asyncpg.connect(host="127.0.0.1", port=pg.port, user="dualrate", database="postgres")
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    return f"postgresql://dualrate@127.0.0.1:{pg.port}/{name}"


def two_replicas(checkpoint_dir, tmp_path, url: str) -> tuple[ServerProcess, ServerProcess]:
    env = {"DUALRATE_JOB_STORE": url}
    a = ServerProcess(checkpoint_dir, tmp_path / "a.log", env=env, **SETTINGS)
    b = ServerProcess(checkpoint_dir, tmp_path / "b.log", env=env, **SETTINGS)
    try:
        a.wait_ready()
        b.wait_ready()
    except BaseException:  # neither outlives a failed start
        a.terminate()
        b.terminate()
        raise
    return a, b


def test_postgres_two_replicas_one_killed_the_other_finishes_every_job(checkpoint_dir, tmp_path, postgres):
    url = fresh_database(postgres, "killed")
    a, b = two_replicas(checkpoint_dir, tmp_path, url)
    try:
        ids = submit_jobs(a.url, 12)
        # Both replicas take jobs; kill A once it runs some.
        wait_until(lambda: metric(httpx.get(f"{a.url}/metrics").text, "dualrate_job_images_total") >= 2, 120,
                   "replica A finished 2 images")
        per_checkpoint = steps_per_checkpoint(a.url)
        a_id = replica_id(a.log())
        m = httpx.get(f"{a.url}/metrics", timeout=30).text
        ran, stored = image_steps_run(a.url), metric(m, "dualrate_job_images_total")
        a.proc.kill()
        a.proc.wait()
        import asyncpg

        async def kept() -> int:  # the steps A's checkpoints keep (its jobs still hold its lease for ~2 s)
            conn = await asyncpg.connect(url.replace("postgresql://", "postgres://"))
            try:
                return await conn.fetchval("SELECT coalesce(sum(c.step), 0) FROM job_checkpoints c JOIN jobs j ON "
                                           "j.id = c.job_id WHERE j.lease_owner = $1", a_id)
            finally:
                await conn.close()

        kept_steps = asyncio.run(kept())
        lost = ran - stored * STEPS - kept_steps
        print(f"\nA: ran {ran:.0f} image-steps, stored {stored:.0f} images, checkpoints keep {kept_steps} steps")
        wait_until(lambda: set(states(b.url).values()) == {"succeeded"}, 180, "all 12 jobs succeeded on B")
        check_images(b.url, ids)


        async def figures() -> tuple[int, int]:
            conn = await asyncpg.connect(url.replace("postgresql://", "postgres://"))
            try:
                row = await conn.fetchrow("SELECT sum(redone_steps) AS redone, sum((claims > 1)::int) AS resumed "
                                          "FROM jobs")
                return row["redone"], row["resumed"]
            finally:
                await conn.close()

        redone, resumed = asyncio.run(figures())
        print(f"\nPostgreSQL: {resumed} jobs taken over from the killed replica; image-steps computed again: about "
              f"{lost:.0f} (measured), at least {redone} (the store's count); one checkpoint interval is "
              f"{per_checkpoint:.1f} steps per image")
        assert resumed >= 1 and "taken over" in b.log()
        assert lost <= 4 * per_checkpoint + 4 * K  # the killed replica's 4 slots, one checkpoint interval each
        assert metric(httpx.get(f"{b.url}/metrics").text, "dualrate_job_lease_takeovers_total") == resumed
    finally:
        a.terminate()
        b.terminate()


def test_postgres_two_replicas_never_run_one_job_twice(checkpoint_dir, tmp_path, postgres):
    url = fresh_database(postgres, "shared")
    a, b = two_replicas(checkpoint_dir, tmp_path, url)
    try:
        ids = submit_jobs(b.url, 12)
        wait_until(lambda: set(states(a.url).values()) == {"succeeded"}, 180, "all 12 jobs succeeded")
        done = [metric(httpx.get(f"{s.url}/metrics").text, "dualrate_job_images_total") for s in (a, b)]
        assert sum(done) == 24 and min(done) > 0, done  # both worked, and no image was made twice
        jobs = [httpx.get(f"{a.url}/v1/jobs/{i}").json() for i in ids]
        assert all("resumed" not in j for j in jobs)  # each claimed once
    finally:
        a.terminate()
        b.terminate()
