"""The engine loop: the one owner of the tick thread, the lock, the runner and the futures.

It drives the pure `Scheduler` (service/core/scheduler.py) and the `Runner` (service/core/runner.py): under the lock,
`schedule()`; outside it, `runner.run(plan)`; under the lock again, `update(...)`; then, outside the lock, the
streamed jobs' events (service.core.progress.Handover) and the futures of the jobs that ended, in that order (a
stream's last events come before its answer). Submissions come from other threads (the event loop, the engine-core
process's IO thread) and take the lock. The in-process core (`service.core.handle.LocalCore`) and the `engine-core`
process (`service.core.engine_core`) both run one of these.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from dualrate.diffusion import CosineSchedule
from dualrate.sampler import encoder_due
from engines import Engine
from service.core.autok import AutoK
from service.core.errors import EngineFailure, LimitError, Outcome, ServiceError, new_error_id
from service.core.progress import Handover, Listener
from service.core.request import GenerationSpec, Job, RequestLimits
from service.core.runner import Runner, RunnerConfig
from service.core.scheduler import Ended, Scheduler, SchedulerConfig
from service.core.stats import RequestDone, SchedulerSnapshot, StatsSink, TickStats
from service.core.telemetry import TRACING, log_extra

log = logging.getLogger("service.core.loop")


class EngineLoop:
    def __init__(self, engine: Engine, sched: CosineSchedule, null_label: int, config: SchedulerConfig,
                 stats: StatsSink | None = None, output_size: int | tuple[int, int] | None = None,
                 autok: AutoK | None = None, runner: RunnerConfig | None = None, limits: RequestLimits | None = None,
                 prediction: str = "v") -> None:
        """`output_size`: the delivered crop, a side or (height, width) (None = the whole sample); `prediction`: what
        the denoiser predicts (the model card's v, eps or x0); `autok`: encoder_interval "auto" (None = not
        offered); `runner`: the runner's switches (overlap, fused tick); `limits`: every submission is checked against
        them again (it may come from any front end over the process boundary)."""
        self.limits, self.null_label = limits, null_label
        self.stats = stats or StatsSink()
        self.scheduler = Scheduler(config, null_label, autok)
        self.runner = Runner(engine, sched, null_label, config.max_active_images, runner or RunnerConfig(),
                             output_size, self.stats, prediction)
        self.handover = Handover()
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._progress = time.monotonic()  # the last tick's end, or when the loop last woke with work

    # ---- from any thread -----------------------------------------------------------------------------------------

    def submit(self, spec: GenerationSpec, listener: Listener | None = None, preview_every: int = 0) -> Job:
        """Queue a request; raises LimitError / QueueFull / NotReady at once when it cannot be queued."""
        if self.limits is not None:
            label = None if spec.label == self.null_label else spec.label
            problems = self.limits.problems(label, spec.num_images, spec.steps, spec.encoder_interval, spec.auto, None,
                                            spec.guidance_scale)
            if problems:
                raise LimitError(problems)
        if spec.start_step:
            self._check_resume(spec)
        with self._cv:
            if not self.scheduler.has_work():
                # Work starts now, not when the loop last ticked: an idle loop that gets work is not stalled for the
                # time it waited (a second request checked before the tick thread wakes would call it frozen).
                self._progress = time.monotonic()
            job = self.scheduler.submit(spec, listener, preview_every)
            self._cv.notify()
        return job

    def _check_resume(self, spec: GenerationSpec) -> None:
        """A resumed image (a job's checkpoint): one image, at an encoder refresh before its last step, with a sample
        of this model's shape."""
        sample_bytes = 4 * int(np.prod(self.runner.sample_shape))
        problems = []
        if spec.num_images != 1:
            problems.append(("num_images", "a resumed image is submitted alone"))
        if spec.auto or not 0 < spec.start_step < spec.steps or not encoder_due(spec.start_step, spec.encoder_interval):
            problems.append(("start_step", "must be an encoder refresh (a multiple of the fixed K) before the last "
                             "step"))
        if len(spec.start_sample) != sample_bytes:
            problems.append(("start_sample", f"must be {sample_bytes} bytes (float32 of the model's sample)"))
        if problems:
            raise LimitError(problems)

    def snapshot(self) -> SchedulerSnapshot:
        with self._cv:
            return self.scheduler.snapshot()

    def idle(self) -> bool:
        with self._cv:
            return not self.scheduler.has_work()

    def stop_admission(self) -> None:
        with self._cv:
            self.scheduler.stop_admission()

    def abort(self, err: ServiceError) -> None:
        """Fail every queued and running job with `err` at the next tick (a forced or timed-out drain)."""
        with self._cv:
            self.scheduler.abort(err)
            self._cv.notify()

    def stalled_for(self) -> float:
        """Seconds the loop has had work and completed no tick (0 while it is idle or stopped): a frozen device call
        or a stuck tick shows here while every other thread still answers. Read without the lock (the tick thread may
        hold it, stuck)."""
        if self._thread is None or not self._thread.is_alive() or not self.scheduler.has_work():
            return 0.0
        return max(0.0, time.monotonic() - self._progress)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float | None = None) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the tick thread -----------------------------------------------------------------------------------------

    def _run(self) -> None:
        self.runner.thread_started()
        while True:
            with self._cv:
                while not self._stop and not self.scheduler.has_work():
                    self._cv.wait()
                if self._stop and not self.scheduler.has_work():
                    return
                self._progress = time.monotonic()
            self.tick()
            self._progress = time.monotonic()

    def tick(self) -> None:
        """One tick: schedule, run, update, hand events over, resolve. An invariant that breaks fails what is in
        flight and the loop keeps serving."""
        t0 = time.perf_counter()
        try:
            with self._cv:
                scheduled = self.scheduler.schedule()
            self._resolve(scheduled.ended)  # reaped jobs answer now, not after the tick
            t_run = time.perf_counter()
            out = self.runner.run(scheduled.plan)
            ran = time.perf_counter() - t_run
            with self._cv:
                self.scheduler.cost.observe_tick(out.denoiser_rows, out.encoder_rows, ran, len(scheduled.plan.slots))
                ended = self.scheduler.update(scheduled, out)
        except Exception:
            log.exception("scheduler tick failed")
            with self._cv:
                ended = self.scheduler.fail(list(self.scheduler.active),
                                            EngineFailure(new_error_id(), "internal scheduler error"))
            self._resolve(ended)
            return
        if TRACING.tracer is not None:  # the ticks each request ran in: an attribute of its core span
            for job in {a.job for a in scheduled.batch}:
                job.ticks += 1
        failed = {a.job for a in scheduled.batch if a.slot in out.failed}
        self.handover.emit(scheduled.batch, out.previews, failed)  # before any job resolves: its events come first
        self._resolve(ended)
        if scheduled.batch:
            self.stats.tick(TickStats(len(scheduled.batch), out.encoder_rows, out.denoiser_rows,
                                      time.perf_counter() - t0))

    def _resolve(self, ended: list[Ended]) -> None:
        now = time.monotonic()
        for e in ended:
            job = e.job
            if job.future.done():
                continue
            admitted = job.first_admitted or now
            if e.error is None:
                job.future.set_result(e.result)
                outcome: str = Outcome.OK
            else:
                job.future.set_exception(e.error)
                outcome = e.error.kind
            spec = job.spec
            self.stats.request_done(RequestDone(outcome, spec.num_images, admitted - job.submitted,
                                                now - job.submitted, spec.priority.value))
            if isinstance(e.error, EngineFailure):
                log.error("request failed: %s", e.error, extra=log_extra(spec.request_id, error_id=e.error.error_id))
            elif log.isEnabledFor(logging.DEBUG):
                log.debug("request ended: %s, %d images, queued %.3f s, %.3f s in all", outcome, spec.num_images,
                          admitted - job.submitted, now - job.submitted,
                          extra=log_extra(spec.request_id, outcome=str(outcome), images=spec.num_images))
            if TRACING.tracer is not None:
                self._trace(job, e, admitted, now, str(outcome))

    @staticmethod
    def _trace(job: Job, e: Ended, admitted: float, now: float, outcome: str) -> None:
        """The request's time in the core as two spans under its front-end span: waiting for a slot, then running
        (its ticks, and per image its encoder and light-network calls, as attributes)."""
        spec = job.spec
        base = {"dualrate.request_id": spec.request_id, "dualrate.priority": spec.priority.value}
        TRACING.span_between("core.queue", spec.traceparent, job.submitted, admitted,
                             {**base, "dualrate.queue_position": job.queue_position})
        result = e.result
        TRACING.span_between("core.generate", spec.traceparent, admitted, now, {
            **base, "dualrate.outcome": outcome, "dualrate.images": spec.num_images, "dualrate.steps": spec.steps,
            "dualrate.encoder_interval": result.encoder_interval if result else spec.encoder_interval,
            "dualrate.ticks": job.ticks,
            "dualrate.encoder_calls_per_image": result.encoder_calls if result else job.encoder_calls,
            "dualrate.light_calls_per_image": result.denoiser_calls if result else 0})
