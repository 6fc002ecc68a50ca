"""The replica's side of the job queue: claim jobs from the store, run their images on the engine core at batch
priority, write checkpoints and finished images as they come, renew the leases, and finish the jobs.

Each image of a job is its own request to the core (one image, seed + index), so a finished image is stored as a PNG
at once and never redone, and a resumed image starts from its own checkpoint (`GenerationSpec.start_step`): a job
claimed again after its replica died gives the images an uninterrupted run gives, byte for byte. Images are submitted
while this replica has fewer than `capacity` of them in the core (the model's slots), so the core's queue keeps room
for interactive requests, which go first anyway (priorities pause batch images at their encoder refresh).

Everything here runs on the front end's event loop; the core's events reach it through `call_soon_threadsafe`, and the
store's writes are awaited here, never on the tick loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from service.core import (
    GenerationSpec,
    JobHandle,
    Priority,
    ServiceError,
)
from service.jobs.store import FAILED, SUCCEEDED, Checkpoint, JobRow, JobStore
from service.jobs.webhooks import Webhooks
from service.png import encode_png

if TYPE_CHECKING:
    from service.state import AppState

log = logging.getLogger("service.jobs")


@dataclass
class Running:
    """A job this replica holds: its images waiting, in the core, and how far each has come."""

    job: JobRow
    waiting: list[int]  # image indices not submitted yet
    starts: dict[int, Checkpoint]  # index -> the checkpoint it resumes from
    handles: dict[int, JobHandle] = field(default_factory=dict)
    steps: dict[int, int] = field(default_factory=dict)  # index -> its latest step (progress)
    done: int = 0
    failed: dict[str, Any] | None = None
    writes: asyncio.Lock = field(default_factory=asyncio.Lock)

    def progress(self) -> tuple[int, int, dict[int, int]]:
        """(least step of its running images, images done, step per running image)."""
        running = {i: self.steps.get(i, 0) for i in self.handles}
        least = min(running.values()) if running else (0 if self.waiting else self.job.steps)
        return least, self.done, running


class JobWorker:
    def __init__(self, store: JobStore, state: AppState) -> None:
        s = state.settings
        self.store, self.state = store, state
        self.replica = f"{uuid.uuid4().hex[:12]}"
        self.lease_s, self.checkpoint_s, self.ttl_s = s.job_lease_s, s.job_checkpoint_s, s.job_ttl_s
        self.poll_s = min(1.0, self.lease_s / 10)
        self.running: dict[str, Running] = {}
        self.webhooks = Webhooks(s.webhook_secret.get_secret_value() if s.webhook_secret else None,
                                 s.webhook_attempts, s.webhook_allow)
        self.stopping = False
        self._tasks: set[asyncio.Task] = set()
        self._wake = asyncio.Event()

    @property
    def in_core(self) -> int:
        return sum(len(r.handles) for r in self.running.values())

    def capacity(self, model: str) -> int:
        return self.state.settings.slots(model)

    def wake(self) -> None:
        """A job was submitted here: claim now rather than at the next poll."""
        self._wake.set()

    # ---- the loop ------------------------------------------------------------------------------------------------

    async def run(self) -> None:
        last_renew = last_house = 0.0
        while not self.stopping:
            try:
                now = time.monotonic()
                if now - last_renew >= self.lease_s / 5:
                    await self._renew()
                    last_renew = now
                await self._claim()
                self._pump()
                if now - last_house >= min(5.0, self.ttl_s / 4):
                    await self._housekeeping()
                    last_house = now
                await self._deliver_webhooks()
            except Exception:  # a database hiccup: log it and go on at the next poll
                log.exception("job worker: a round failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_s)

    async def _claim(self) -> None:
        if self.stopping or not self.state.ready or self.state.draining:
            return
        free = min(self.capacity(n) for n in self.state.models) - self.in_core
        if free <= 0 or sum(len(r.waiting) for r in self.running.values()) >= free:
            return
        for job, taken_over in await self.store.claim(self.replica, self.lease_s, limit=max(1, free)):
            if taken_over:
                self.state.metrics.job_lease_takeover()
                log.info("job %s: taken over (its replica's lease lapsed)", job.id, extra={"request_id": job.id})
            done = await self.store.images(job.id)
            starts = await self.store.checkpoints(job.id)
            waiting = [i for i in range(job.num_images) if i not in done]
            if taken_over:
                redone = await self.store.resumed_work(job, starts, set(done))
                log.info("job %s: resuming %d images (%d from checkpoints); %d image-steps to compute again",
                         job.id, len(waiting), len(starts), redone, extra={"request_id": job.id})
            self.running[job.id] = Running(job, waiting, starts, done=len(done))
            if not waiting:
                await self._end(self.running[job.id])

    def _pump(self) -> None:
        """Submit waiting images while this replica has fewer than the model's slots in the core."""
        for run in list(self.running.values()):
            while run.waiting and run.failed is None and self.in_core < self.capacity(run.job.model):
                index = run.waiting.pop(0)
                self._spawn(self._image(run, index))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def spec(self, run: Running, index: int) -> GenerationSpec:
        body, entry = run.job.body, self.state.models[run.job.model]
        label = entry.spec.null_label if body["class_label"] is None else body["class_label"]
        start = run.starts.get(index)
        k = body["encoder_interval"]
        auto = k == "auto" and start is None  # a resumed image keeps the K it ran at
        return GenerationSpec(
            label, 1, body["steps"], start.encoder_interval if start else (entry.sampling.encoder_interval
                                                                          if auto else int(k)),
            body["guidance_scale"], body["seed"] + index, deadline=None, auto=auto,
            priority=Priority(body.get("priority", Priority.BATCH)),
            request_id=run.job.id, start_step=start.step if start else 0,
            start_sample=start.sample if start else b"", start_encoder_calls=start.encoder_calls if start else 0,
            checkpoint_every_s=self.checkpoint_s)

    async def _image(self, run: Running, index: int) -> None:
        loop = asyncio.get_running_loop()
        entry = self.state.models[run.job.model]
        core = entry.core
        start = run.starts.get(index)

        def listener(events: list) -> None:  # on the core's thread
            loop.call_soon_threadsafe(self._events, run, index, events)

        try:
            if core is None:
                raise RuntimeError("no engine core")
            handle = await core.submit(self.spec(run, index), listener)
        except ServiceError as e:  # the core's queue is full, or it is draining: try again later
            log.debug("job %s image %d: not submitted (%s)", run.job.id, index, e)
            run.waiting.insert(0, index)
            return
        run.handles[index] = handle
        run.steps[index] = start.step if start else 0
        try:
            result = await asyncio.wrap_future(handle.future)
        except ServiceError as e:
            run.handles.pop(index, None)
            if run.job.id not in self.running:  # released or cancelled meanwhile
                return
            from service.api.answers import describe  # the error body /generate would answer

            status, body, _ = describe(e)
            run.failed = {"status": status, **body.model_dump(exclude_none=True)}
            await self._end(run)
            return
        run.handles.pop(index, None)
        png = await asyncio.to_thread(encode_png, result.images[0])
        async with run.writes:
            if not await self.store.save_image(self.replica, run.job.id, index, run.job.body["seed"] + index, png):
                self._drop(run)
                return
        run.done += 1
        self.state.metrics.job_image()
        if run.done == run.job.num_images:
            await self._end(run)
        self._pump()

    def _events(self, run: Running, index: int, events: list) -> None:
        for name, payload in events:
            if name == "progress":
                run.steps[index] = payload["step"]
            elif name == "checkpoint":
                c = Checkpoint(index, payload["step"], payload["encoder_interval"], payload["encoder_calls"],
                               payload["sample"])
                run.steps[index] = c.step
                self._spawn(self._checkpoint(run, c))

    async def _checkpoint(self, run: Running, c: Checkpoint) -> None:
        t0 = time.perf_counter()
        async with run.writes:
            if run.job.id not in self.running or index_done(run, c.index):
                return
            held = await self.store.save_checkpoint(self.replica, run.job.id, c)
        self.state.metrics.job_checkpoint(time.perf_counter() - t0)
        if not held:
            self._drop(run)

    async def _end(self, run: Running) -> None:
        if self.running.pop(run.job.id, None) is None:
            return
        for handle in run.handles.values():
            handle.cancel()
        status = FAILED if run.failed else SUCCEEDED
        if await self.store.finish(self.replica, run.job.id, status, self.ttl_s, run.failed):
            self.state.metrics.job_finished(status)
            log.info("job %s %s: %d images", run.job.id, status, run.done, extra={"request_id": run.job.id})
            self._wake.set()  # its webhook is due now

    def _drop(self, run: Running) -> None:
        """This replica no longer holds the job (cancelled, or its lease taken): stop its images."""
        if self.running.pop(run.job.id, None) is not None:
            for handle in run.handles.values():
                handle.cancel()
            log.info("job %s: no longer held here (cancelled or taken over): its images stop",
                     run.job.id, extra={"request_id": run.job.id})

    async def _renew(self) -> None:
        if not self.running:
            return
        progress = {job_id: run.progress() for job_id, run in self.running.items()}
        held = await self.store.renew(self.replica, progress, self.lease_s)
        for job_id in set(progress) - held:
            run = self.running.get(job_id)
            if run is not None:
                self._drop(run)

    async def _housekeeping(self) -> None:
        gone = await self.store.expire()
        if gone:
            log.info("jobs: %d past DUALRATE_JOB_TTL_S deleted", gone)
        self.state.metrics.job_counts(await self.store.counts())

    async def _deliver_webhooks(self) -> None:
        if not self.webhooks.enabled:
            return
        for job in await self.store.claim_webhooks(limit=8, hold_s=60.0):
            self._spawn(self._webhook(job))

    async def _webhook(self, job: JobRow) -> None:
        body = await job_status(self.store, job, self.state)
        attempts = await self.store.webhook_attempts(job.id) + 1
        outcome = await self.webhooks.deliver(job.webhook or "", body)
        self.state.metrics.job_webhook(outcome)
        if outcome == "delivered":
            await self.store.webhook_attempted(job.id, True, attempts, None)
        elif attempts >= self.webhooks.attempts or outcome == "refused":
            log.warning("job %s: webhook not delivered after %d attempts", job.id, attempts,
                        extra={"request_id": job.id})
            await self.store.webhook_attempted(job.id, False, attempts, None)
        else:
            await self.store.webhook_attempted(job.id, False, attempts, time.time() + self.webhooks.backoff(attempts))

    # ---- drain ---------------------------------------------------------------------------------------------------

    async def release(self) -> None:
        """Stop claiming; hand this replica's running jobs back (queued again, their checkpoints kept) so another
        replica, or this one after its restart, resumes them; stop their images in the core."""
        self.stopping = True
        self._wake.set()
        held = list(self.running.values())
        self.running.clear()
        for run in held:
            for handle in run.handles.values():
                handle.cancel()
        if held:
            n = await self.store.release(self.replica, [r.job.id for r in held])
            log.info("jobs: %d running jobs handed back for another replica (checkpoints kept)", n)


def index_done(run: Running, index: int) -> bool:
    return index not in run.handles and index not in run.waiting


def new_seed() -> int:
    return secrets.randbelow(2**31)


async def job_status(store: JobStore, job: JobRow, state: AppState | None = None) -> dict[str, Any]:
    """The job as GET /v1/jobs/{id} answers it (and its webhook carries)."""
    out: dict[str, Any] = {
        "id": job.id, "object": "job", "status": job.status, "model": job.model,
        "status_url": f"/v1/jobs/{job.id}", "num_images": job.num_images, "steps": job.steps,
        "created_at": job.created_at, "updated_at": job.updated_at, "finished_at": job.finished_at,
        "expires_at": job.expires_at, "step": job.steps if job.status == "succeeded" else job.step,
        "images_done": job.images_done,
    }
    if job.status == "queued":
        out["queue_position"] = await store.position(job)
    images = await store.images(job.id)
    out["images"] = [{"index": i, "seed": seed, "url": f"/v1/jobs/{job.id}/images/{i}.png"}
                     for i, seed in sorted(images.items())]
    if job.error is not None:
        out["error"] = job.error
    if job.claims > 1:
        out["resumed"] = job.claims - 1  # times another replica (or a restart) took it over
    return out
