"""The durable job store: one code path (SQLAlchemy 2 Core, asyncio) over an embedded SQLite file (aiosqlite) or a
PostgreSQL server (asyncpg) that several replicas share.

Tables: `jobs` (the request, its owner, state, lease and webhook state), `job_images` (each finished image's PNG,
stored at once), `job_checkpoints` (each running image's last checkpoint: its sample at an encoder refresh, its step,
K and encoder calls). A replica claims a job with a lease (`lease_owner`, `lease_expires_at`), renewed while it runs;
a job whose lease lapses is claimed again by any replica and resumed from its checkpoints. The claim is one
conditional UPDATE (`... WHERE status = 'queued' OR the lease lapsed`), whose row count says who won, so two
replicas never run one job at once on either database; on PostgreSQL the candidates are picked with
`FOR UPDATE SKIP LOCKED`, so concurrent claimers skip each other's rows instead of waiting. No queue lives outside the
database.

Times are Unix seconds (float) from the writing process's clock.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
SCHEMA_LOCK = 0x6475616C72617465  # "dualrate": the advisory lock that serializes table creation on PostgreSQL
MAX_CURSOR = 2**62  # the largest `after` a page may start from (SQLite and PostgreSQL integers are 64-bit)
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

metadata = MetaData()
jobs = Table(
    "jobs", metadata,
    Column("id", String(32), primary_key=True),
    Column("seq", Integer, nullable=False),  # submission order (queue position, listing order)
    Column("owner", String(64), nullable=False),  # a hash of the API key that made it ("" without keys)
    Column("idempotency_key", String(255)),
    Column("body_sha256", String(64), nullable=False),
    Column("body", Text, nullable=False),  # the request, as JSON
    Column("model", String(255), nullable=False),
    Column("num_images", Integer, nullable=False),
    Column("steps", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("step", Integer, nullable=False, default=0),  # the least advanced running image's step
    Column("images_done", Integer, nullable=False, default=0),
    Column("error", Text),  # the error body, as JSON, when failed
    Column("webhook", Text),
    Column("webhook_state", String(16)),  # pending | delivered | failed (None: no webhook)
    Column("webhook_attempts", Integer, nullable=False, default=0),
    Column("webhook_next_at", Float),
    Column("lease_owner", String(64)),
    Column("lease_expires_at", Float),
    Column("claims", Integer, nullable=False, default=0),  # how often a replica took it (> 1: resumed)
    Column("redone_steps", Integer, nullable=False, default=0),  # image-steps computed again after a resume
    Column("progress", Text),  # JSON {image index: step reached}, as of the holder's last lease renewal
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("finished_at", Float),
    Column("expires_at", Float),
    UniqueConstraint("owner", "idempotency_key", name="jobs_owner_idempotency_key"),
)
Index("jobs_status_seq", jobs.c.status, jobs.c.seq)
Index("jobs_owner_seq", jobs.c.owner, jobs.c.seq)
job_images = Table(
    "job_images", metadata,
    Column("job_id", String(32), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("idx", Integer, primary_key=True),
    Column("seed", Integer, nullable=False),
    Column("png", LargeBinary, nullable=False),
)
job_checkpoints = Table(
    "job_checkpoints", metadata,
    Column("job_id", String(32), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("idx", Integer, primary_key=True),
    Column("step", Integer, nullable=False),
    Column("encoder_interval", Integer, nullable=False),
    Column("encoder_calls", Integer, nullable=False),
    Column("sample", LargeBinary, nullable=False),
    Column("written_at", Float, nullable=False),
)


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different body."""


@dataclass(frozen=True)
class JobRow:
    id: str
    seq: int
    owner: str
    body: dict[str, Any]
    model: str
    num_images: int
    steps: int
    status: str
    step: int
    images_done: int
    error: dict[str, Any] | None
    webhook: str | None
    webhook_state: str | None
    lease_owner: str | None
    claims: int
    redone_steps: int
    created_at: float
    updated_at: float
    finished_at: float | None
    expires_at: float | None

    @classmethod
    def of(cls, r: Any) -> JobRow:
        return cls(r.id, r.seq, r.owner, json.loads(r.body), r.model, r.num_images, r.steps, r.status, r.step,
                   r.images_done, json.loads(r.error) if r.error else None, r.webhook, r.webhook_state, r.lease_owner,
                   r.claims, r.redone_steps, r.created_at, r.updated_at, r.finished_at, r.expires_at)


@dataclass(frozen=True)
class Checkpoint:
    index: int
    step: int
    encoder_interval: int
    encoder_calls: int
    sample: bytes


def owner_of(key: str | None) -> str:
    """What a job stores of the API key that made it: a hash, never the key."""
    return hashlib.sha256(key.encode()).hexdigest()[:32] if key else ""


def body_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def async_url(url: str) -> str:
    """sqlite:///path -> sqlite+aiosqlite:///path; postgresql://... -> postgresql+asyncpg://... (an explicit driver
    is kept)."""
    u = make_url(url)
    if u.drivername == "sqlite":
        return str(u.set(drivername="sqlite+aiosqlite"))
    if u.drivername in ("postgresql", "postgres"):
        return u.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    return url


class JobStore:
    """The job tables of one database. `await open()` creates them where missing."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sqlite = make_url(url).drivername.startswith("sqlite")
        if self.sqlite:
            database = make_url(url).database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
        self.engine: AsyncEngine = create_async_engine(async_url(url), pool_pre_ping=not self.sqlite)
        if self.sqlite:
            @event.listens_for(self.engine.sync_engine, "connect")
            def _pragmas(conn: Any, _record: Any) -> None:
                # WAL: readers never wait for the writer; foreign keys on (ON DELETE CASCADE); a writer waits for
                # another process's transaction instead of failing at once.
                cur = conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute("PRAGMA busy_timeout=10000")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()

    async def open(self) -> None:
        """Create the tables where missing. Replicas starting together on one PostgreSQL take a transaction-scoped
        advisory lock first: two concurrent CREATE TABLE IF NOT EXISTS would race on the catalog."""
        async with self.engine.begin() as conn:
            if not self.sqlite:
                await conn.execute(select(func.pg_advisory_xact_lock(SCHEMA_LOCK)))
            await conn.run_sync(metadata.create_all)

    async def close(self) -> None:
        await self.engine.dispose()

    # ---- submission ----------------------------------------------------------------------------------------------

    async def submit(self, owner: str, body: dict[str, Any], model: str, num_images: int, steps: int,
                     webhook: str | None, idempotency_key: str | None,
                     request: dict[str, Any] | None = None) -> tuple[JobRow, bool]:
        """Store a queued job (`body`: the resolved request every replica runs). -> (the job, created). With an
        idempotency key used before by this owner: the job it made (created False), or IdempotencyConflict if the
        request (`request`, as the client sent it; default `body`) differs."""
        digest, now = body_hash(request if request is not None else body), time.time()
        if idempotency_key is not None:
            found = await self._by_key(owner, idempotency_key)
            if found is not None:
                return self._same(found, digest)
        job_id = uuid.uuid4().hex
        values = dict(id=job_id, owner=owner, idempotency_key=idempotency_key, body_sha256=digest,
                      body=json.dumps(body, sort_keys=True), model=model, num_images=num_images, steps=steps,
                      status=QUEUED, step=0, images_done=0, webhook=webhook, webhook_attempts=0,
                      webhook_state="pending" if webhook else None, claims=0, redone_steps=0, created_at=now,
                      updated_at=now)
        try:
            async with self.engine.begin() as conn:
                seq = (await conn.execute(select(func.coalesce(func.max(jobs.c.seq), 0) + 1))).scalar_one()
                await conn.execute(insert(jobs).values(seq=seq, **values))
        except Exception as e:  # a concurrent submit with the same key won the unique constraint
            if idempotency_key is None or "unique" not in str(e).lower():
                raise
            found = await self._by_key(owner, idempotency_key)
            if found is None:
                raise
            return self._same(found, digest)
        job = await self.get(job_id)
        assert job is not None
        return job, True

    @staticmethod
    def _same(found: tuple[JobRow, str], digest: str) -> tuple[JobRow, bool]:
        job, stored = found
        if stored != digest:
            raise IdempotencyConflict(job.id)
        return job, False

    async def _by_key(self, owner: str, key: str) -> tuple[JobRow, str] | None:
        async with self.engine.connect() as conn:
            r = (await conn.execute(select(jobs).where(jobs.c.owner == owner, jobs.c.idempotency_key == key))).first()
        return (JobRow.of(r), r.body_sha256) if r is not None else None

    # ---- reading -------------------------------------------------------------------------------------------------

    async def get(self, job_id: str, owner: str | None = None) -> JobRow | None:
        """The job (None if missing, or owned by another owner when `owner` is given)."""
        q = select(jobs).where(jobs.c.id == job_id)
        if owner is not None:
            q = q.where(jobs.c.owner == owner)
        async with self.engine.connect() as conn:
            r = (await conn.execute(q)).first()
        return JobRow.of(r) if r is not None else None

    async def position(self, job: JobRow) -> int:
        """Queued jobs ahead of a queued job."""
        async with self.engine.connect() as conn:
            return (await conn.execute(select(func.count()).select_from(jobs).where(
                jobs.c.status == QUEUED, jobs.c.seq < job.seq))).scalar_one()

    async def page(self, owner: str, limit: int, after: int | None = None) -> list[JobRow]:
        """The owner's jobs, newest first, `limit` of them after the cursor `after` (a seq)."""
        q = select(jobs).where(jobs.c.owner == owner)
        if after is not None:
            q = q.where(jobs.c.seq < after)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(q.order_by(jobs.c.seq.desc()).limit(limit))).all()
        return [JobRow.of(r) for r in rows]

    async def image(self, job_id: str, index: int) -> bytes | None:
        async with self.engine.connect() as conn:
            return (await conn.execute(select(job_images.c.png).where(
                job_images.c.job_id == job_id, job_images.c.idx == index))).scalar_one_or_none()

    async def images(self, job_id: str) -> dict[int, int]:
        """index -> seed of the job's finished images."""
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(job_images.c.idx, job_images.c.seed).where(
                job_images.c.job_id == job_id))).all()
        return {r.idx: r.seed for r in rows}

    async def checkpoints(self, job_id: str) -> dict[int, Checkpoint]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(job_checkpoints).where(job_checkpoints.c.job_id == job_id))).all()
        return {r.idx: Checkpoint(r.idx, r.step, r.encoder_interval, r.encoder_calls, r.sample) for r in rows}

    async def counts(self) -> dict[str, int]:
        """Jobs per state."""
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(jobs.c.status, func.count()).group_by(jobs.c.status))).all()
        return {s: 0 for s in STATES} | {r[0]: r[1] for r in rows}

    # ---- the replica that runs jobs ------------------------------------------------------------------------------

    async def claim(self, owner: str, lease_s: float, limit: int) -> list[tuple[JobRow, bool]]:
        """Take up to `limit` jobs, oldest first: queued ones, and running ones whose lease lapsed (a dead
        replica's). -> (job, taken over from another replica)."""
        now = time.time()
        claimable = or_(jobs.c.status == QUEUED, and_(jobs.c.status == RUNNING, jobs.c.lease_expires_at < now))
        pick = select(jobs.c.id, jobs.c.status).where(claimable).order_by(jobs.c.seq).limit(limit)
        if not self.sqlite:
            pick = pick.with_for_update(skip_locked=True)
        got: list[tuple[str, bool]] = []
        async with self.engine.begin() as conn:
            for job_id, status in (await conn.execute(pick)).all():
                # The condition again: on SQLite (no row locks) another process may have claimed it meanwhile.
                r = await conn.execute(update(jobs).where(jobs.c.id == job_id, claimable).values(
                    status=RUNNING, lease_owner=owner, lease_expires_at=now + lease_s, claims=jobs.c.claims + 1,
                    updated_at=now))
                if r.rowcount == 1:
                    got.append((job_id, status == RUNNING))
        out = []
        for job_id, taken_over in got:
            job = await self.get(job_id)
            if job is not None:
                out.append((job, taken_over))
        return out

    async def renew(self, owner: str, progress: dict[str, tuple[int, int, dict[int, int]]],
                    lease_s: float) -> set[str]:
        """Extend the leases of this replica's running jobs, recording their progress (job -> (least step, images
        done, step per running image)). -> the jobs it still holds (a job missing was cancelled, or its lease taken
        after lapsing)."""
        now, held = time.time(), set()
        async with self.engine.begin() as conn:
            for job_id, (step, done, per_image) in progress.items():
                r = await conn.execute(update(jobs).where(
                    jobs.c.id == job_id, jobs.c.lease_owner == owner, jobs.c.status == RUNNING).values(
                    lease_expires_at=now + lease_s, step=step, images_done=done, updated_at=now,
                    progress=json.dumps(per_image)))
                if r.rowcount == 1:
                    held.add(job_id)
        return held

    async def release(self, owner: str, job_ids: list[str]) -> int:
        """Hand running jobs back (a draining replica): queued again, checkpoints kept. -> how many."""
        async with self.engine.begin() as conn:
            r = await conn.execute(update(jobs).where(
                jobs.c.id.in_(job_ids), jobs.c.lease_owner == owner, jobs.c.status == RUNNING).values(
                status=QUEUED, lease_owner=None, lease_expires_at=None, updated_at=time.time()))
        return r.rowcount

    async def resumed_work(self, job: JobRow, starts: dict[int, Checkpoint], done: set[int]) -> int:
        """Image-steps the previous holder had computed past the checkpoints this claim resumes from (as of its
        last renewal: a lower bound), added to the job's `redone_steps`. -> those steps."""
        async with self.engine.connect() as conn:
            raw = (await conn.execute(select(jobs.c.progress).where(jobs.c.id == job.id))).scalar_one_or_none()
        reached = {int(k): v for k, v in json.loads(raw).items()} if raw else {}
        redone = sum(max(0, step - (starts[i].step if i in starts else 0)) for i, step in reached.items()
                     if i not in done)
        if redone:
            async with self.engine.begin() as conn:
                await conn.execute(update(jobs).where(jobs.c.id == job.id).values(
                    redone_steps=jobs.c.redone_steps + redone))
        return redone

    async def save_checkpoint(self, owner: str, job_id: str, c: Checkpoint) -> bool:
        """Replace an image's checkpoint (only while this replica holds the job). -> whether it was written."""
        now = time.time()
        async with self.engine.begin() as conn:
            held = (await conn.execute(select(jobs.c.id).where(
                jobs.c.id == job_id, jobs.c.lease_owner == owner, jobs.c.status == RUNNING))).first()
            if held is None:
                return False
            await conn.execute(delete(job_checkpoints).where(job_checkpoints.c.job_id == job_id,
                                                             job_checkpoints.c.idx == c.index))
            await conn.execute(insert(job_checkpoints).values(
                job_id=job_id, idx=c.index, step=c.step, encoder_interval=c.encoder_interval,
                encoder_calls=c.encoder_calls, sample=c.sample, written_at=now))
        return True

    async def save_image(self, owner: str, job_id: str, index: int, seed: int, png: bytes) -> bool:
        """Store a finished image (its checkpoint goes). -> whether this replica still held the job."""
        now = time.time()
        async with self.engine.begin() as conn:
            r = await conn.execute(update(jobs).where(
                jobs.c.id == job_id, jobs.c.lease_owner == owner, jobs.c.status == RUNNING).values(
                images_done=jobs.c.images_done + 1, updated_at=now))
            if r.rowcount != 1:
                return False
            await conn.execute(delete(job_images).where(job_images.c.job_id == job_id, job_images.c.idx == index))
            await conn.execute(insert(job_images).values(job_id=job_id, idx=index, seed=seed, png=png))
            await conn.execute(delete(job_checkpoints).where(job_checkpoints.c.job_id == job_id,
                                                             job_checkpoints.c.idx == index))
        return True

    async def finish(self, owner: str, job_id: str, status: str, ttl_s: float,
                     error: dict[str, Any] | None = None) -> bool:
        """A running job ends (succeeded or failed) on this replica. -> whether it still held it."""
        now = time.time()
        async with self.engine.begin() as conn:
            r = await conn.execute(update(jobs).where(
                jobs.c.id == job_id, jobs.c.lease_owner == owner, jobs.c.status == RUNNING).values(
                status=status, error=json.dumps(error) if error else None, lease_owner=None, lease_expires_at=None,
                finished_at=now, expires_at=now + ttl_s, updated_at=now, webhook_next_at=now))
            if r.rowcount == 1:
                await conn.execute(delete(job_checkpoints).where(job_checkpoints.c.job_id == job_id))
        return r.rowcount == 1

    async def cancel(self, job_id: str, owner: str, ttl_s: float) -> JobRow | None:
        """Cancel a queued or running job (a running one's replica sees it at its next lease renewal). -> the job
        after (None: no such job of this owner); a finished job is returned unchanged."""
        now = time.time()
        async with self.engine.begin() as conn:
            await conn.execute(update(jobs).where(
                jobs.c.id == job_id, jobs.c.owner == owner, jobs.c.status.in_((QUEUED, RUNNING))).values(
                status=CANCELLED, lease_owner=None, lease_expires_at=None, finished_at=now, expires_at=now + ttl_s,
                updated_at=now, webhook_next_at=now))
            await conn.execute(delete(job_checkpoints).where(job_checkpoints.c.job_id == job_id))
        return await self.get(job_id, owner)

    async def expire(self) -> int:
        """Delete finished jobs past their time to live (and their images). -> how many."""
        async with self.engine.begin() as conn:
            ids = [r[0] for r in (await conn.execute(select(jobs.c.id).where(jobs.c.expires_at < time.time()))).all()]
            for chunk in (ids[i:i + 500] for i in range(0, len(ids), 500)):
                await conn.execute(delete(job_images).where(job_images.c.job_id.in_(chunk)))
                await conn.execute(delete(job_checkpoints).where(job_checkpoints.c.job_id.in_(chunk)))
                await conn.execute(delete(jobs).where(jobs.c.id.in_(chunk)))
        return len(ids)

    # ---- webhooks ------------------------------------------------------------------------------------------------

    async def claim_webhooks(self, limit: int, hold_s: float) -> list[JobRow]:
        """Finished jobs whose webhook is due, each held from other replicas for `hold_s` while it is delivered."""
        now = time.time()
        due = and_(jobs.c.webhook_state == "pending", jobs.c.status.in_(tuple(TERMINAL)),
                   jobs.c.webhook_next_at <= now)
        got = []
        async with self.engine.begin() as conn:
            for (job_id,) in (await conn.execute(select(jobs.c.id).where(due).order_by(jobs.c.seq).limit(limit))).all():
                r = await conn.execute(update(jobs).where(jobs.c.id == job_id, due).values(
                    webhook_next_at=now + hold_s))
                if r.rowcount == 1:
                    got.append(job_id)
        return [j for j in [await self.get(i) for i in got] if j is not None]

    async def webhook_attempted(self, job_id: str, delivered: bool, attempts: int, next_at: float | None) -> None:
        """After a delivery attempt: delivered, failed for good (next_at None), or retried at next_at."""
        state = "delivered" if delivered else ("failed" if next_at is None else "pending")
        async with self.engine.begin() as conn:
            await conn.execute(update(jobs).where(jobs.c.id == job_id).values(
                webhook_state=state, webhook_attempts=attempts, webhook_next_at=next_at))

    async def webhook_attempts(self, job_id: str) -> int:
        async with self.engine.connect() as conn:
            return (await conn.execute(select(jobs.c.webhook_attempts).where(jobs.c.id == job_id))).scalar_one()

    async def size_bytes(self) -> int | None:
        """The store's size on disk (SQLite: the file and its WAL; PostgreSQL: the database)."""
        if self.sqlite:
            database = make_url(self.url).database or ""
            return sum(p.stat().st_size for p in (Path(database), Path(database + "-wal")) if p.exists())
        async with self.engine.connect() as conn:
            return (await conn.execute(select(func.pg_database_size(func.current_database())))).scalar_one()


