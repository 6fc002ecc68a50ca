"""Step-level continuous batching of dual-rate diffusion requests: the scheduler, which decides and nothing else.

vLLM v1's split is the model: `schedule()` reaps (cancelled, expired), pauses batch images for waiting interactive
ones, admits (by the admission policy) and emits a frozen `TickPlan`; the runner (service/core/runner.py) executes it
and returns a `TickOutcome`; `update(scheduled, outcome)` advances the bookkeeping and says which jobs ended. The
scheduler is single-threaded and owns no thread, lock, future or runner: the engine loop (service/core/loop.py) calls
it under its lock, runs the plans, resolves the futures and hands streamed events over. Each tick advances every
active image by one denoising step; requests with different steps, K, labels and guidance share a batch. A failure
fails only the request whose rows cause it (the runner isolates them).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np

from dualrate.diffusion import step_times
from dualrate.sampler import encoder_due, needs_uncond_row, rows_per_image
from service.core.admission import Policy, admission_policy
from service.core.autok import AutoK, CostModel
from service.core.errors import Cancelled, DeadlineExceeded, EngineFailure, NotReady, QueueFull, ServiceError
from service.core.progress import Event, Listener, preview_due
from service.core.request import GenerationSpec, ImageSlot, Job, JobResult, PausedImage, Priority, request_cost
from service.core.runner import TickOutcome, TickPlan
from service.core.stats import SchedulerSnapshot


@lru_cache(maxsize=64)
def _times(steps: int) -> list[float]:
    return step_times(steps).float().tolist()  # exact float32 values: torch.tensor(...) gives them back bit for bit


@dataclass(frozen=True)
class SchedulerConfig:
    """How the scheduler batches, admits and preempts: one value, built from the settings; what the model decides
    (null label) comes apart."""

    max_active_images: int  # batch slots
    queue_size: int  # requests waiting before 429 (per size class when reserved_slots > 0)
    policy: Policy = Policy.CONTINUOUS
    align_encoder: bool = True  # continuous policy: admit an image where its K-cohort refreshes
    reserved_slots: int = 0  # slots only small requests may take (continuous policy)
    small_cost: float = 0.0  # a request costing at most this (request_cost) is small
    lend_horizon_s: float = 6.0  # reserved slots are lent to large images expected to finish within this
    priorities: bool = True  # interactive images first, batch images paused at a refresh boundary for them
    max_paused_images: int = 0  # batch images held paused at most (their samples in host memory)
    # While interactive images run, a tick may take at most this many times the interactive rows' own refresh tick
    # (the cost model's prediction): batch images pause at their encoder refresh, and none joins, until it fits.
    # 0 = no budget. On a GPU, where a tick's time is nearly flat in its rows, it rarely binds.
    interactive_slowdown: float = 0.0
    # Deadline-aware admission: refuse at submission (429 + Retry-After) a request whose predicted latency (the work
    # ahead of it and its own steps, at the measured costs) lies past its deadline, or, for an interactive "auto"
    # request, past `admit_target_s` (the latency target auto trades quality for; 0 = none), when the wait is what
    # makes it late.
    deadline_admission: bool = False
    admit_target_s: float = 0.0


@dataclass(frozen=True)
class Ended:
    """A job that ended at this tick: its result, or the error it fails with."""

    job: Job
    result: JobResult | None = None
    error: ServiceError | None = None


@dataclass
class Scheduled:
    """What `schedule()` decided: the plan for the runner, the images it advances (in the plan's order), and the jobs
    that ended before it (reaped: cancelled, expired, aborted)."""

    plan: TickPlan
    batch: list[ImageSlot]
    ended: list[Ended] = field(default_factory=list)


class Scheduler:
    def __init__(self, config: SchedulerConfig, null_label: int, autok: AutoK | None = None,
                 cost: CostModel | None = None) -> None:
        """`autok`: picks K for encoder_interval "auto" requests (None: auto not offered). `cost`: the measured
        per-row costs and throughput (the engine loop feeds it each tick); auto-K's own when it has one."""
        self.config = config
        self.null_label = null_label
        self.autok = autok
        self.cost = cost or (autok.cost if autok is not None else CostModel(slots=config.max_active_images))
        self.admission = admission_policy(config.policy, config.align_encoder)
        self.queue: deque[Job] = deque()
        self.active: list[ImageSlot] = []
        self.paused: list[PausedImage] = []  # oldest request first (resume order)
        self.free_slots = list(range(config.max_active_images))
        self.ticks = 0
        self.preemptions = 0
        self.refused_late = 0  # requests refused at submission because they could not finish in time
        self.accepting = True
        self.abort_error: ServiceError | None = None  # set by abort(): every job fails with it at the next tick
        self.encoder_rows = 0
        self.denoiser_rows = 0
        self._admitted: list[tuple[int, int]] = []  # (slot, seed) since the last plan
        self._resumed: list[tuple[int, object]] = []  # (slot, z) since the last plan
        self._pausing: list[int] = []  # slots whose image paused since the last plan

    # The admission policy's view (service.core.admission.AdmissionView) reads these.
    @property
    def reserved_slots(self) -> int:
        return self.config.reserved_slots

    @property
    def priorities(self) -> bool:
        return self.config.priorities

    # ---- requests ------------------------------------------------------------------------------------------------

    def submit(self, spec: GenerationSpec, listener: Listener | None = None, preview_every: int = 0,
               now: float | None = None) -> Job:
        """Queue a request (QueueFull / NotReady when it cannot be). `listener` (optional) receives its progress and
        previews (service.core.progress)."""
        now = time.monotonic() if now is None else now
        if not self.accepting:
            raise NotReady("the service is draining and accepts no new requests")
        # Small requests have queue places of their own beside the large ones' (as many), so a flood of large
        # requests cannot turn every small one away; with reserved slots off, one queue for all.
        small = self.spec_is_small(spec)
        waiting = sum(self.is_small(j) == small for j in self.queue) if self.reserved_slots else len(self.queue)
        if waiting >= self.config.queue_size:
            raise QueueFull(retry_after_s=self.predicted_wait())
        if self.autok is not None:
            self.autok.arrived(spec.num_images, now)  # every request loads the service
        if spec.auto:
            if self.autok is None:
                raise NotReady("encoder_interval auto is not offered by this server")
            rows = rows_per_image(spec.label, spec.guidance_scale, self.null_label)
            mix = [self.cost.image_cost(spec.steps, a.job.spec.encoder_interval, rows) for a in self.active]
            k = self.autok.choose(spec.steps, rows, self._queued_images() + spec.num_images, len(self.free_slots),
                                  sum(mix) / len(mix) if mix else 0.0, now)
            spec = replace(spec, encoder_interval=k)
        if self.config.deadline_admission:
            self._admit_in_time(spec, now)
        job = Job(spec, images=[None] * spec.num_images, listener=listener,
                  preview_every=preview_every if listener is not None else 0, queue_position=len(self.queue))
        self.queue.append(job)
        return job

    def stop_admission(self) -> None:
        self.accepting = False

    def abort(self, err: ServiceError) -> None:
        """Fail every queued and running job with `err` at the next tick (a forced or timed-out drain)."""
        self.accepting = False
        self.abort_error = err

    def has_work(self) -> bool:
        return bool(self.queue or self.active or self.paused)

    def snapshot(self) -> SchedulerSnapshot:
        by_priority = Counter(j.spec.priority.value for j in self.queue)
        return SchedulerSnapshot(len(self.queue), self._queued_images(), len(self.active), len(self.free_slots),
                                 self.encoder_rows, self.denoiser_rows,
                                 {p.value: by_priority.get(p.value, 0) for p in Priority}, len(self.paused),
                                 self.preemptions)

    def predicted_wait(self) -> float:
        """Seconds until the queue has taken in what waits now: its image-steps over the service's image-steps per
        second (smoothed over ~20 s of ticks); at least 1. Before any tick: 0.5 s per queued request."""
        rate = self.cost.steps_per_s
        work = sum((j.spec.num_images - j.next_image) * j.spec.steps for j in self.queue)
        return max(1.0, work / rate if rate > 0 else len(self.queue) * 0.5)

    def predicted_latency(self, spec: GenerationSpec) -> float:
        """Seconds from now to `spec`'s last image, at the measured costs (0 before the first ticks). With a full
        batch a slot frees every `image_cost` seconds on average (an image's share of the service's time), so the
        request's last image gets a slot after as many turnovers as images wait before it beyond the free slots (an
        interactive request has only the interactive ones ahead), and then takes its own steps at the tick time."""
        cost = self.cost
        if cost.tick_s <= 0:
            return 0.0
        batch = spec.priority is Priority.BATCH or not self.priorities
        ahead = [j for j in self.queue if batch or j.spec.priority is Priority.INTERACTIVE]
        waiting = sum(j.spec.num_images - j.next_image for j in ahead) + (len(self.paused) if batch else 0)
        own = spec.steps * cost.tick_s
        turnovers = waiting + spec.num_images - len(self.free_slots)
        if turnovers <= 0:
            return own

        def image_s(s: GenerationSpec) -> float:
            return cost.image_cost(s.steps, s.encoder_interval, rows_per_image(s.label, s.guidance_scale,
                                                                               self.null_label))

        running = [image_s(a.job.spec) for a in self.active] or [image_s(spec)]
        return turnovers * sum(running) / len(running) + own

    def _admit_in_time(self, spec: GenerationSpec, now: float) -> None:
        """Deadline-aware admission: QueueFull (429 + Retry-After) for a request that cannot finish in time."""
        limits = []
        if spec.deadline is not None:
            limits.append((spec.deadline - now, "its deadline (timeout_s)"))
        if spec.auto and spec.priority is Priority.INTERACTIVE and self.config.admit_target_s > 0:
            limits.append((self.config.admit_target_s, "the latency target (DUALRATE_LATENCY_TARGET_S)"))
        if not limits:
            return
        limit, what = min(limits)
        predicted = self.predicted_latency(spec)
        # Refused only when the wait makes it late: a request that could not finish in time on an idle service either
        # (a deadline shorter than its own steps take) is taken and answered as before (504 at its deadline).
        if predicted > limit and spec.steps * self.cost.tick_s <= limit:
            self.refused_late += 1
            raise QueueFull(max(1.0, predicted - limit), f"at the current load this request would take about "
                            f"{predicted:.1f} s, past {what} of {limit:.1f} s: retry later, or with a longer "
                            "timeout_s")

    def _queued_images(self) -> int:
        """Images waiting for a slot: of queued requests, not yet admitted, and paused."""
        return sum(j.spec.num_images - j.next_image for j in self.queue) + len(self.paused)

    # ---- one tick ------------------------------------------------------------------------------------------------

    def schedule(self, now: float | None = None) -> Scheduled:
        """Reap, pause, admit; -> the tick's plan (empty when nothing runs) and the jobs reaped."""
        now = time.monotonic() if now is None else now
        ended = self._reap(now)
        self._preempt(now)
        self.admission.admit(self)
        self._fit_budget(now)  # after admission: the interactive images admitted now count
        batch = sorted(self.active, key=lambda a: a.slot)  # slot order: a full batch reads the cache as views
        return Scheduled(self._plan(batch), batch, ended)

    def update(self, scheduled: Scheduled, outcome: TickOutcome, now: float | None = None) -> list[Ended]:
        """Advance the images of `scheduled` by what the runner did. -> the jobs that ended (done, or failed)."""
        now = time.monotonic() if now is None else now
        batch, plan = scheduled.batch, scheduled.plan
        for p in self.paused:
            if p.z is None and p.image.slot in outcome.paused:
                p.z = outcome.paused[p.image.slot]
        self.encoder_rows += outcome.encoder_rows
        self.denoiser_rows += outcome.denoiser_rows
        failed = {a.job: outcome.failed[a.slot] for a in batch if a.slot in outcome.failed}
        for a in batch:  # checkpoints: the sample as it stood at this step's refresh, before the step
            if a.slot in outcome.snapshots and a.job not in failed:
                a.job.pending.append(Event("checkpoint", {
                    "index": a.index, "step": a.step, "encoder_interval": a.job.spec.encoder_interval,
                    "encoder_calls": a.encoder_calls, "sample": outcome.snapshots[a.slot].tobytes()}))
        for a, due, tau in zip(batch, plan.due, plan.tau, strict=True):
            if a.job in failed:
                continue
            a.tau = tau  # the plan's feature time: the step's own where refreshed
            a.encoder_calls += due
            a.step += 1
        finished = [a for a in batch if a.slot in outcome.finished and a.job not in failed]
        self._release(finished)
        ended: list[Ended] = []
        for a in finished:
            job = a.job
            job.images[a.index] = outcome.finished[a.slot]
            job.encoder_calls = max(job.encoder_calls, a.encoder_calls)
            job.done_images += 1
            if job.done_images == job.spec.num_images:
                ended.append(self._done(job, now))
        for job, error_id in failed.items():
            # Its other images stop too: nobody would read them.
            ended += self.fail([a for a in self.active if a.job is job],
                               EngineFailure(error_id, f"engine failure (error id {error_id})"))
        if batch:
            self.ticks += 1
        return ended

    def fail(self, slots: list[ImageSlot], err: ServiceError) -> list[Ended]:
        """Fail the jobs of `slots` (and free every slot and queue place they hold) with `err`."""
        self._release(slots)
        ended = []
        for job in {id(a.job): a.job for a in slots}.values():
            self.paused = [p for p in self.paused if p.image.job is not job]
            if job in self.queue:
                self.queue.remove(job)  # its remaining images would be computed for nobody
            ended.append(Ended(job, error=err))
        return ended

    def _plan(self, batch: list[ImageSlot]) -> TickPlan:
        due = tuple(encoder_due(a.step, a.job.spec.encoder_interval) for a in batch)
        snapshot: tuple[int, ...] = ()
        if any(a.job.spec.checkpoint_every_s > 0 for a in batch):
            now = time.monotonic()
            snapshot = tuple(a.slot for a, d in zip(batch, due, strict=True) if d and a.step > 0
                             and 0 < a.job.spec.checkpoint_every_s <= now - a.job.last_checkpoint)
            for a in batch:
                if a.slot in snapshot:
                    a.job.last_checkpoint = now
        plan = TickPlan(
            slots=tuple(a.slot for a in batch), seeds=tuple(a.job.spec.seed + a.index for a in batch),
            steps=tuple(a.step for a in batch), labels=tuple(a.job.spec.label for a in batch),
            guidance=tuple(a.job.spec.guidance_scale for a in batch), guided=tuple(a.guided for a in batch),
            t=tuple(a.times[a.step] for a in batch), s=tuple(a.times[a.step + 1] for a in batch),
            tau=tuple(a.times[a.step] if d else a.tau for a, d in zip(batch, due, strict=True)), due=due,
            last=tuple(a.step + 1 == a.job.spec.steps for a in batch),
            admitted=tuple(self._admitted), preview=preview_due(batch),
            resumed=tuple(self._resumed),  # type: ignore[arg-type]
            paused=tuple(self._pausing), snapshot=snapshot)
        self._admitted, self._resumed, self._pausing = [], [], []
        return plan

    def _reap(self, now: float) -> list[Ended]:
        """Free the slots of cancelled or expired jobs."""

        def dead(job: Job) -> ServiceError | None:
            if self.abort_error is not None:
                return self.abort_error
            if job.cancelled:
                return Cancelled("client disconnected")
            if job.spec.deadline is not None and now > job.spec.deadline:
                return DeadlineExceeded("the request's deadline passed before its images were done")
            return None

        ended = []
        for job, why in [(j, e) for j in self.queue if (e := dead(j)) is not None]:
            self.queue.remove(job)
            ended.append(Ended(job, error=why))
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
                ended.append(Ended(job, error=err))
        return ended

    def interactive_waiting(self) -> int:
        """Images of queued interactive requests not yet admitted; 0 with priorities off."""
        if not self.priorities:
            return 0
        return sum(j.spec.num_images - j.next_image for j in self.queue if j.spec.priority is Priority.INTERACTIVE)

    def _preempt(self, now: float) -> None:
        """While interactive images wait with no free slot for them, pause as many batch images as they need, each
        at its next encoder-refresh boundary. An image pauses only at a tick where it is due a refresh: its features
        are stale from that tick on, so its sample and step are its whole state (the runner reads the sample back
        before this tick reuses the slot: `TickPlan.paused`). Images further from their boundary pause at later ticks
        if the need is still there then. The youngest requests' images pause first (the oldest resume first). At
        most `max_paused_images` are held."""
        if not self.priorities or self.config.policy is not Policy.CONTINUOUS:
            return
        need = min(self.interactive_waiting() - len(self.free_slots), self.config.max_paused_images - len(self.paused))
        if need <= 0:
            return
        for a in self._pausable()[:need]:
            self._pause(a, now)
        self.paused.sort(key=lambda p: (p.image.job.submitted, p.image.index))

    def _pausable(self) -> list[ImageSlot]:
        """Batch images due an encoder refresh at this tick (where pausing loses nothing), youngest request first."""
        due = [a for a in self.active if a.job.spec.priority is Priority.BATCH and a.step > 0
               and encoder_due(a.step, a.job.spec.encoder_interval) and not a.job.cancelled]
        return sorted(due, key=lambda a: (a.job.submitted, a.index), reverse=True)

    def _pause(self, a: ImageSlot, now: float) -> None:
        """Take a batch image out of its slot; the runner reads its sample back in this tick's plan."""
        self.paused.append(PausedImage(a, now))
        self._pausing.append(a.slot)
        self._release([a])
        self.preemptions += 1

    def _tick_s(self, images: list[ImageSlot], all_due: bool = False) -> float:
        """The cost model's prediction of a tick of `images` (each refreshing where it is due, or all with
        `all_due`)."""
        c0, a, c1, b = self.cost.theta
        light = sum(1 + a_.guided for a_ in images)
        enc = sum(1 + a_.guided for a_ in images if all_due or encoder_due(a_.step, a_.job.spec.encoder_interval))
        return c0 + a * light + ((c1 + b * enc) if enc else 0.0)

    def _budget(self) -> float | None:
        """The tick time allowed now (None: no budget: no interactive image runs or waits, or the budget is off)."""
        if not self.config.interactive_slowdown or not self.priorities:
            return None
        interactive = [a for a in self.active if a.job.spec.priority is Priority.INTERACTIVE]
        if not interactive and not self.interactive_waiting():
            return None
        return self.config.interactive_slowdown * self._tick_s(interactive or self.active[:1], all_due=True)

    def batch_room(self) -> bool:
        """May another batch image join (or resume) at this tick? Not while interactive images run and the tick
        already takes its budget."""
        budget = self._budget()
        return budget is None or self._tick_s(self.active) < budget

    def _fit_budget(self, now: float) -> None:
        """While interactive images run, pause batch images that are due a refresh (youngest first) until the
        predicted tick fits the budget; the others pause at their own refresh if it still does not fit then."""
        budget = self._budget()
        if budget is None or self._tick_s(self.active) <= budget:
            return
        room = self.config.max_paused_images - len(self.paused)
        for a in self._pausable()[:max(0, room)]:
            if self._tick_s(self.active) <= budget:
                break
            self._pause(a, now)
        self.paused.sort(key=lambda p: (p.image.job.submitted, p.image.index))

    def resume_image(self, p: PausedImage) -> None:
        """Give a paused image a free slot again, at the step it paused (called by the admission policy). Its sample
        goes back first; that tick refreshes its features."""
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
        return 0 < job.spec.steps * self.cost.tick_s <= self.config.lend_horizon_s

    def spec_is_small(self, spec: GenerationSpec) -> bool:
        return request_cost(spec.num_images, spec.steps, spec.encoder_interval) <= self.config.small_cost

    def admit_image(self, job: Job) -> None:
        """Give the next image of `job` a free slot (called by the admission policy)."""
        spec = job.spec
        i = job.next_image
        job.next_image += 1
        if job.first_admitted is None:
            job.first_admitted = time.monotonic()
        slot = self.free_slots.pop(0)
        guided = needs_uncond_row(spec.label, spec.guidance_scale, self.null_label)
        image = ImageSlot(job, i, slot, guided, _times(spec.steps))
        if spec.start_step:  # a checkpointed image: its sample goes back first, and it goes on from its step
            self._resumed.append((slot, np.frombuffer(spec.start_sample, dtype=np.float32).copy()))
            image.step, image.encoder_calls = spec.start_step, spec.start_encoder_calls
        else:
            self._admitted.append((slot, spec.seed + i))
        self.active.append(image)

    def _release(self, slots: list[ImageSlot]) -> None:
        gone = set(map(id, slots))
        self.active = [a for a in self.active if id(a) not in gone]
        self.free_slots.extend(a.slot for a in slots)
        self.free_slots.sort()

    def _done(self, job: Job, now: float) -> Ended:
        admitted = job.first_admitted or now
        spec = job.spec
        return Ended(job, JobResult(
            images=[im for im in job.images if im is not None], seeds=[spec.seed + i for i in range(spec.num_images)],
            encoder_calls=job.encoder_calls, denoiser_calls=spec.steps, queue_seconds=admitted - job.submitted,
            compute_seconds=now - admitted, encoder_interval=spec.encoder_interval))
