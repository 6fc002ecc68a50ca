"""Step-level continuous batching of dual-rate diffusion requests: the scheduler, which decides.

One loop, split like vLLM v1's engine core: the scheduler reaps (cancelled, expired) and admits (by the admission
policy) and emits a frozen `TickPlan`; the `Runner` (service/core/runner.py) executes it on the device-resident state and
returns a `TickOutcome`; the scheduler updates its bookkeeping from it and resolves the requests' futures. Each tick
advances every active image by one denoising step; requests with different steps, K, labels and guidance share a
batch. A failure fails only the request whose rows cause it (the runner isolates them).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np

from dualrate.diffusion import CosineSchedule, step_times
from dualrate.sampler import encoder_due, needs_uncond_row, rows_per_image
from engines import Engine
from service.core.admission import Policy, Priority, admission_policy, request_cost
from service.core.autok import AutoK, CostModel
from service.core.progress import Event, Handover, Listener, preview_due
from service.core.runner import Runner, TickPlan
from service.core.stats import RequestDone, SchedulerSnapshot, StatsSink, TickStats
from service.errors import Cancelled, DeadlineExceeded, EngineFailure, NotReady, Outcome, QueueFull, ServiceError, new_error_id

log = logging.getLogger("service.core.scheduler")


@dataclass(frozen=True)
class GenerationSpec:
    label: int  # 0-9, or the null label for unconditional
    num_images: int
    steps: int
    encoder_interval: int
    guidance_scale: float
    seed: int
    deadline: float | None = None  # time.monotonic() deadline
    auto: bool = False  # encoder_interval "auto": the scheduler picks K at submission (service.core.autok)
    priority: Priority = Priority.INTERACTIVE

    def __post_init__(self) -> None:
        object.__setattr__(self, "priority", Priority(self.priority))  # a plain string over the wire


@dataclass
class JobResult:
    images: list[np.ndarray]  # uint8 each: (H, W) grayscale or (H, W, 3) RGB, the model's delivered size
    seeds: list[int]
    encoder_calls: int  # per image
    denoiser_calls: int
    queue_seconds: float
    compute_seconds: float
    encoder_interval: int = 0  # the K the images ran at (an "auto" request's is the scheduler's pick)


@dataclass(eq=False)
class Job:
    spec: GenerationSpec
    future: Future = field(default_factory=Future)  # resolved with a JobResult or a ServiceError
    submitted: float = field(default_factory=time.monotonic)
    first_admitted: float | None = None
    next_image: int = 0  # images admitted so far
    done_images: int = 0
    images: list[np.ndarray | None] = field(default_factory=list)
    encoder_calls: int = 0
    cancelled: bool = False
    listener: Listener | None = None  # streamed events (service.core.progress), called on the scheduler thread
    preview_every: int = 0  # a preview every this many steps of each image (0 = none); only with a listener
    queue_position: int = 0  # requests ahead of it when it was queued
    pending: list[Event] = field(default_factory=list)  # its previews not handed over yet

    def cancel(self) -> None:
        """Called from any thread (client disconnect); the slot is freed at the next tick."""
        self.cancelled = True


@dataclass(eq=False)
class ImageSlot:
    job: Job
    index: int  # image index within its job
    slot: int  # the runner's state row (sample, feature cache rows, noise generator)
    guided: bool
    times: list[float]  # t_0 = 1 > t_1 > ... > t_N = 0 as float32 values
    step: int = 0
    tau: float = 1.0
    encoder_calls: int = 0


@dataclass(eq=False)
class PausedImage:
    """A batch image taken out of its slot at an encoder-refresh boundary: its whole state is its sample z (host
    memory) and its step; the features it held were about to be recomputed, so nothing is lost and resuming is
    exact (the noise is a function of seed and step)."""

    image: ImageSlot  # as it stood (slot no longer its own)
    z: np.ndarray
    paused_at: float


@lru_cache(maxsize=64)
def _times(steps: int) -> list[float]:
    return step_times(steps).float().tolist()  # exact float32 values: torch.tensor(...) gives them back bit for bit


@dataclass(frozen=True)
class SchedulerConfig:
    """How the scheduler batches, admits and preempts: one value, built from the settings
    (`service.settings.Settings.scheduler_config`); what the model decides (schedule, null label, crop) comes apart."""

    max_active_images: int  # batch slots
    queue_size: int  # requests waiting before 429 (per size class when reserved_slots > 0)
    policy: Policy = Policy.CONTINUOUS
    overlap_encoder: bool = True  # light network runs the not-due rows while the encoder runs the due ones
    align_encoder: bool = True  # continuous policy: admit an image where its K-cohort refreshes
    reserved_slots: int = 0  # slots only small requests may take (continuous policy)
    small_cost: float = 0.0  # a request costing at most this (request_cost) is small
    fused: bool = False  # each tick as one program (service.core.fused; torch backend)
    lend_horizon_s: float = 6.0  # reserved slots are lent to large images expected to finish within this
    priorities: bool = True  # interactive images first, batch images paused at a refresh boundary for them
    max_paused_images: int = 0  # batch images held paused at most (their samples in host memory)


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        sched: CosineSchedule,
        null_label: int,
        config: SchedulerConfig,
        stats: StatsSink | None = None,
        output_size: int | None = None,  # the delivered crop (ModelConfig.output_size); None = the whole sample
        autok: AutoK | None = None,  # picks K for encoder_interval "auto" requests; None = auto not offered
    ) -> None:
        c = self.config = config
        max_active_images, queue_size, policy = c.max_active_images, c.queue_size, c.policy
        overlap_encoder, align_encoder, fused = c.overlap_encoder, c.align_encoder, c.fused
        reserved_slots, small_cost, lend_horizon_s = c.reserved_slots, c.small_cost, c.lend_horizon_s
        priorities, max_paused_images = c.priorities, c.max_paused_images
        self.null_label, self.max_active_images, self.queue_size, self.policy = null_label, max_active_images, queue_size, policy
        self.stats = stats or StatsSink()
        self.admission = admission_policy(policy, align_encoder)
        self.autok = autok
        self.reserved_slots, self.small_cost, self.lend_horizon_s = reserved_slots, small_cost, lend_horizon_s
        self.cost = autok.cost if autok is not None else CostModel()  # per-row costs and throughput, from ticks
        self.cost.slots = max_active_images
        self.runner = Runner(engine, sched, null_label, max_active_images, overlap_encoder, output_size, self.stats,
                             fused=fused)
        self.priorities, self.max_paused_images = priorities, max_paused_images
        self.paused: list[PausedImage] = []  # oldest request first (resume order)
        self._resumed: list[tuple[int, np.ndarray]] = []  # (slot, z) since the last plan
        self.preemptions = 0
        self.queue: deque[Job] = deque()
        self.active: list[ImageSlot] = []
        self.free_slots = list(range(max_active_images))
        self._admitted: list[tuple[int, int]] = []  # (slot, seed) since the last plan
        self.handover = Handover()  # streamed jobs' events (service.core.progress)
        self._cv = threading.Condition()
        self._stop = False
        self._accepting = True
        self._abort: ServiceError | None = None  # set by abort(): every job fails with it at the next tick
        self._thread: threading.Thread | None = None
        self._encoder_rows = 0
        self._denoiser_rows = 0
        self.ticks = 0

    # ---- submission side (event loop thread) -------------------------------------------------------------------

    def submit(self, spec: GenerationSpec, listener: Listener | None = None, preview_every: int = 0) -> Job:
        """Queue a request. `listener` (optional) receives its progress and previews (service.core.progress)."""
        with self._cv:
            if not self._accepting:
                raise NotReady("the service is draining and accepts no new requests")
            # Small requests have queue places of their own beside the large ones' (as many), so a flood of large
            # requests cannot turn every small one away; with reserved slots off, one queue for all.
            small = self.spec_is_small(spec)
            waiting = sum(self.is_small(j) == small for j in self.queue) if self.reserved_slots else len(self.queue)
            if waiting >= self.queue_size:
                raise QueueFull(retry_after_s=self.predicted_wait())
            if self.autok is not None:
                self.autok.arrived(spec.num_images, time.monotonic())  # every request loads the service
            if spec.auto:
                if self.autok is None:
                    raise NotReady("encoder_interval auto is not offered by this server")
                rows = rows_per_image(spec.label, spec.guidance_scale, self.null_label)
                mix = [self.cost.image_cost(spec.steps, a.job.spec.encoder_interval, rows) for a in self.active]
                k = self.autok.choose(spec.steps, rows, self._queued_images() + spec.num_images, len(self.free_slots),
                                      sum(mix) / len(mix) if mix else 0.0, time.monotonic())
                spec = replace(spec, encoder_interval=k)
            job = Job(spec, images=[None] * spec.num_images, listener=listener,
                      preview_every=preview_every if listener is not None else 0, queue_position=len(self.queue))
            self.queue.append(job)
            self._cv.notify()
        return job

    def snapshot(self) -> SchedulerSnapshot:
        with self._cv:
            by_priority = Counter(j.spec.priority.value for j in self.queue)
            return SchedulerSnapshot(len(self.queue), self._queued_images(), len(self.active), len(self.free_slots),
                                     self._encoder_rows, self._denoiser_rows,
                                     {p.value: by_priority.get(p.value, 0) for p in Priority}, len(self.paused),
                                     self.preemptions)

    def predicted_wait(self) -> float:
        """Seconds until the queue has taken in what waits now: its image-steps over the service's image-steps per
        second (smoothed over ~20 s of ticks); at least 1. Before any tick: 0.5 s per queued request."""
        rate = self.cost.steps_per_s
        work = sum((j.spec.num_images - j.next_image) * j.spec.steps for j in self.queue)
        return max(1.0, work / rate if rate > 0 else len(self.queue) * 0.5)

    def _queued_images(self) -> int:
        """Images waiting for a slot: of queued requests, not yet admitted, and paused (caller holds the lock)."""
        return sum(j.spec.num_images - j.next_image for j in self.queue) + len(self.paused)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self._thread.start()

    def stop_admission(self) -> None:
        with self._cv:
            self._accepting = False

    def abort(self, err: ServiceError) -> None:
        """Fail every queued and running job with `err` at the next tick (a forced or timed-out drain)."""
        with self._cv:
            self._accepting = False
            self._abort = err
            self._cv.notify()

    def idle(self) -> bool:
        with self._cv:
            return not self.queue and not self.active and not self.paused

    def shutdown(self, timeout: float | None = None) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the loop (scheduler thread) ---------------------------------------------------------------------------

    def _run(self) -> None:
        self.runner.thread_started()
        while True:
            with self._cv:
                while not self._stop and not self.queue and not self.active and not self.paused:
                    self._cv.wait()
                if self._stop and not self.queue and not self.active and not self.paused:
                    return
            try:
                self.tick()
            except Exception:  # an invariant broke: fail what is in flight, keep serving
                log.exception("scheduler tick failed")
                self._fail_slots(list(self.active), EngineFailure(new_error_id(), "internal scheduler error"))

    def tick(self) -> None:
        t0 = time.perf_counter()
        with self._cv:
            self._reap()
            self._preempt()
            self.admission.admit(self)
            batch = sorted(self.active, key=lambda a: a.slot)  # slot order: a full batch reads the cache as views
            plan = self._plan(batch)
        t_run = time.perf_counter()
        out = self.runner.run(plan)
        self.cost.observe_tick(out.denoiser_rows, out.encoder_rows, time.perf_counter() - t_run, len(plan.slots))
        self._encoder_rows += out.encoder_rows
        self._denoiser_rows += out.denoiser_rows
        failed_jobs = {a.job: out.failed[a.slot] for a in batch if a.slot in out.failed}
        with self._cv:
            for a, due, tau in zip(batch, plan.due, plan.tau, strict=True):
                if a.job in failed_jobs:
                    continue
                a.tau = tau  # the plan's feature time: the step's own where refreshed
                a.encoder_calls += due
                a.step += 1
            self.handover.emit(batch, out.previews, failed_jobs)  # before any job resolves: its events come first
            finished = [a for a in batch if a.slot in out.finished and a.job not in failed_jobs]
            self._release(finished)
            for a in finished:
                job = a.job
                job.images[a.index] = out.finished[a.slot]
                job.encoder_calls = max(job.encoder_calls, a.encoder_calls)
                job.done_images += 1
                if job.done_images == job.spec.num_images:
                    self._finish_job(job, None)
        for job, error_id in failed_jobs.items():
            # Its other images stop too: nobody would read them.
            self._fail_slots([a for a in self.active if a.job is job],
                             EngineFailure(error_id, f"engine failure (error id {error_id})"))
        if batch:
            self.ticks += 1
            self.stats.tick(TickStats(len(batch), out.encoder_rows, out.denoiser_rows, time.perf_counter() - t0))

    def _plan(self, batch: list[ImageSlot]) -> TickPlan:
        due = tuple(encoder_due(a.step, a.job.spec.encoder_interval) for a in batch)
        plan = TickPlan(
            slots=tuple(a.slot for a in batch), seeds=tuple(a.job.spec.seed + a.index for a in batch),
            steps=tuple(a.step for a in batch), labels=tuple(a.job.spec.label for a in batch),
            guidance=tuple(a.job.spec.guidance_scale for a in batch), guided=tuple(a.guided for a in batch),
            t=tuple(a.times[a.step] for a in batch), s=tuple(a.times[a.step + 1] for a in batch),
            tau=tuple(a.times[a.step] if d else a.tau for a, d in zip(batch, due, strict=True)), due=due,
            last=tuple(a.step + 1 == a.job.spec.steps for a in batch),
            admitted=tuple(self._admitted), preview=preview_due(batch), resumed=tuple(self._resumed))
        self._admitted, self._resumed = [], []
        return plan

    def _reap(self) -> None:
        """Free the slots of cancelled or expired jobs (caller holds the lock)."""
        now = time.monotonic()

        def dead(job: Job) -> ServiceError | None:
            if self._abort is not None:
                return self._abort
            if job.cancelled:
                return Cancelled("client disconnected")
            if job.spec.deadline is not None and now > job.spec.deadline:
                return DeadlineExceeded("the request's deadline passed before its images were done")
            return None

        for job, why in [(j, e) for j in self.queue if (e := dead(j)) is not None]:
            self.queue.remove(job)
            self._finish_job(job, why)
        failed = {a.job: err for a in self.active if (err := dead(a.job)) is not None}
        gone = {p.image.job: err for p in self.paused if (err := dead(p.image.job)) is not None}
        if gone:
            self.paused = [p for p in self.paused if p.image.job not in gone]
            failed = {**gone, **failed}
        if failed:
            self._release([a for a in self.active if a.job in failed])
            for job, err in failed.items():
                if job in self.queue:
                    self.queue.remove(job)
                self._finish_job(job, err)

    def interactive_waiting(self) -> int:
        """Images of queued interactive requests not yet admitted (caller holds the lock); 0 with priorities off."""
        if not self.priorities:
            return 0
        return sum(j.spec.num_images - j.next_image for j in self.queue if j.spec.priority is Priority.INTERACTIVE)

    def _preempt(self) -> None:
        """While interactive images wait with no free slot for them, pause as many batch images as they need, each
        at its next encoder-refresh boundary (caller holds the lock). An image pauses only at a tick where it is due
        a refresh: its features are stale from that tick on, so its sample and step are its whole state. Images
        further from their boundary pause at later ticks if the need is still there then. The youngest requests'
        images pause first (the oldest resume first). At most `max_paused_images` are held."""
        if not self.priorities or self.policy is not Policy.CONTINUOUS:
            return
        need = min(self.interactive_waiting() - len(self.free_slots), self.max_paused_images - len(self.paused))
        if need <= 0:
            return
        due = [a for a in self.active if a.job.spec.priority is Priority.BATCH and a.step > 0
               and encoder_due(a.step, a.job.spec.encoder_interval) and not a.job.cancelled]
        due.sort(key=lambda a: (a.job.submitted, a.index), reverse=True)
        for a in due[:need]:
            self.paused.append(PausedImage(a, self.runner.sample(a.slot), time.monotonic()))
            self._release([a])
            self.preemptions += 1
        self.paused.sort(key=lambda p: (p.image.job.submitted, p.image.index))

    def resume_image(self, p: PausedImage) -> None:
        """Give a paused image a free slot again, at the step it paused (caller holds the lock; called by the
        admission policy). Its sample goes back first; that tick refreshes its features."""
        self.paused.remove(p)
        p.image.slot = self.free_slots.pop(0)
        self._resumed.append((p.image.slot, p.z))
        self.active.append(p.image)

    def is_small(self, job: Job) -> bool:
        """Small requests may use the reserved slots and queue places, and are admitted first."""
        return self.spec_is_small(job.spec)

    def may_lend(self, job: Job) -> bool:
        """May a large request's image take a reserved slot while no small request waits? Only if it is expected to
        finish within lend_horizon_s (its steps at the measured seconds per tick; unknown before the first ticks)."""
        return 0 < job.spec.steps * self.cost.tick_s <= self.lend_horizon_s

    def spec_is_small(self, spec: GenerationSpec) -> bool:
        return request_cost(spec.num_images, spec.steps, spec.encoder_interval) <= self.small_cost

    def admit_image(self, job: Job) -> None:
        """Give the next image of `job` a free slot (caller holds the lock; called by the admission policy)."""
        spec = job.spec
        i = job.next_image
        job.next_image += 1
        if job.first_admitted is None:
            job.first_admitted = time.monotonic()
        slot = self.free_slots.pop(0)
        self._admitted.append((slot, spec.seed + i))
        guided = needs_uncond_row(spec.label, spec.guidance_scale, self.null_label)
        self.active.append(ImageSlot(job, i, slot, guided, _times(spec.steps)))

    def _release(self, slots: list[ImageSlot]) -> None:
        gone = set(map(id, slots))
        self.active = [a for a in self.active if id(a) not in gone]
        self.free_slots.extend(a.slot for a in slots)
        self.free_slots.sort()

    def _fail_slots(self, slots: list[ImageSlot], err: ServiceError) -> None:
        with self._cv:
            self._release(slots)
            for job in {id(a.job): a.job for a in slots}.values():
                self.paused = [p for p in self.paused if p.image.job is not job]
                if job in self.queue:
                    self.queue.remove(job)  # its remaining images would be computed for nobody
                self._finish_job(job, err)

    def _finish_job(self, job: Job, err: ServiceError | None) -> None:
        now = time.monotonic()
        admitted = job.first_admitted or now
        if job.future.done():
            return
        if err is None:
            spec = job.spec
            job.future.set_result(JobResult(
                images=[im for im in job.images if im is not None], seeds=[spec.seed + i for i in range(spec.num_images)],
                encoder_calls=job.encoder_calls, denoiser_calls=spec.steps,
                queue_seconds=admitted - job.submitted, compute_seconds=now - admitted,
                encoder_interval=spec.encoder_interval,
            ))
            outcome = Outcome.OK
        else:
            job.future.set_exception(err)
            outcome = err.kind
        self.stats.request_done(RequestDone(outcome, job.spec.num_images, admitted - job.submitted, now - job.submitted,
                                            job.spec.priority.value))

