"""Step-level continuous batching of dual-rate diffusion requests.

One loop, split like vLLM's engine core: schedule (admit, reap) -> run engine (encoder for the rows due a refresh on
its own stream/thread, the light network meanwhile on the rows that are not due) -> ingest outputs (ancestral step,
finished images leave). Each tick advances every active image by one denoising step; requests with different
steps, K, labels and guidance share a batch. Features live in a preallocated per-slot cache.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from dualrate.data import to_uint8
from dualrate.diffusion import CosineSchedule, step_times
from dualrate.sampler import draw_noise, encoder_due, guided_step, needs_uncond_row
from engines import Engine
from service.errors import Cancelled, DeadlineExceeded, EngineFailure, NotReady, QueueFull, ServiceError
from service.stats import NetworkCall, RequestDone, SchedulerSnapshot, StatsSink, TickStats

log = logging.getLogger("service.scheduler")


class Policy(StrEnum):
    CONTINUOUS = "continuous"  # step-level: join and leave at every tick
    REQUEST = "request"  # request-level: a batch of whole requests runs to completion before the next


@dataclass(frozen=True)
class GenerationSpec:
    label: int  # 0-9, or the null label for unconditional
    num_images: int
    steps: int
    encoder_interval: int
    guidance_scale: float
    seed: int
    deadline: float | None = None  # time.monotonic() deadline


@dataclass
class JobResult:
    images: list[np.ndarray]  # uint8 each: (H, W) grayscale or (H, W, 3) RGB, the model's delivered size
    seeds: list[int]
    encoder_calls: int  # per image
    denoiser_calls: int
    queue_seconds: float
    compute_seconds: float


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

    def cancel(self) -> None:
        """Called from any thread (client disconnect); the slot is freed at the next tick."""
        self.cancelled = True


@dataclass(eq=False)
class ImageSlot:
    job: Job
    index: int  # image index within its job
    slot: int  # row of Scheduler.z; feature cache rows slot (conditional) and max_active_images + slot (unconditional)
    gen: torch.Generator
    guided: bool
    times: list[float]  # t_0 = 1 > t_1 > ... > t_N = 0 as float32 values
    step: int = 0
    tau: float = 1.0
    encoder_calls: int = 0


@lru_cache(maxsize=64)
def _times(steps: int) -> list[float]:
    return step_times(steps).float().tolist()  # exact float32 values: torch.tensor(...) gives them back bit for bit


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        sched: CosineSchedule,
        null_label: int,
        max_active_images: int,
        queue_size: int,
        policy: Policy = Policy.CONTINUOUS,
        stats: StatsSink | None = None,
        overlap_encoder: bool = True,  # light network runs the not-due rows while the encoder runs the due ones
        align_encoder: bool = True,  # admit an image only at a tick where its K-cohort refreshes (see _in_phase)
        output_size: int | None = None,  # the delivered crop (ModelConfig.output_size); None = the whole sample
    ) -> None:
        assert engine.max_batch >= 2 * max_active_images, "a guided image takes two rows"
        self.engine, self.sched, self.null_label = engine, sched, null_label
        self.max_active_images, self.queue_size, self.policy = max_active_images, queue_size, policy
        self.stats = stats or StatsSink()
        self.sample_shape = engine.sample_shape
        self.output_size = output_size or self.sample_shape[-1]
        self.overlap_encoder = overlap_encoder
        self.align_encoder = align_encoder
        self._phase: dict[int, int] = {}  # K -> ticks % K at which the active images with interval K refresh
        dev = engine.device
        # Preallocated per-slot state: the current sample of each slot, and the feature cache (one tensor per encoder
        # level; row `slot` holds a slot's conditional features, row `max_active_images + slot` its unconditional
        # ones). A tick gathers rows by index; a full batch in slot order reads the cache as views (see _cached).
        self.z = torch.zeros(max_active_images, *self.sample_shape)
        self.cache = [torch.zeros(2 * max_active_images, *s, device=dev) for s in engine.feature_shapes]
        self.queue: deque[Job] = deque()
        self.active: list[ImageSlot] = []
        self.free_slots = list(range(max_active_images))
        self._cv = threading.Condition()
        self._stop = False
        self._accepting = True
        self._abort: ServiceError | None = None  # set by abort(): every job fails with it at the next tick
        self._thread: threading.Thread | None = None
        self._encoder_rows = 0
        self._denoiser_rows = 0
        self.ticks = 0

    # ---- submission side (event loop thread) -------------------------------------------------------------------

    def submit(self, spec: GenerationSpec) -> Job:
        with self._cv:
            if not self._accepting:
                raise NotReady("the service is draining and accepts no new requests")
            if len(self.queue) >= self.queue_size:
                raise QueueFull(retry_after_s=self._retry_after())
            job = Job(spec, images=[None] * spec.num_images)
            self.queue.append(job)
            self._cv.notify()
        return job

    def _retry_after(self) -> float:
        return max(1.0, float(np.ceil(len(self.queue) * 0.5)))

    def snapshot(self) -> SchedulerSnapshot:
        with self._cv:
            queued = sum(j.spec.num_images - j.next_image for j in self.queue)
            return SchedulerSnapshot(len(self.queue), queued, len(self.active), len(self.free_slots),
                                     self._encoder_rows, self._denoiser_rows)

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
            return not self.queue and not self.active

    def shutdown(self, timeout: float | None = None) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the loop (scheduler thread) ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self.queue and not self.active:
                    self._cv.wait()
                if self._stop and not self.queue and not self.active:
                    return
            try:
                self.tick()
            except Exception:  # an invariant broke: fail what is in flight, keep serving
                log.exception("scheduler tick failed")
                self._fail_active(EngineFailure(uuid.uuid4().hex[:12], "internal scheduler error"))

    def tick(self) -> None:
        t0 = time.perf_counter()
        with self._cv:
            self._reap()
            self._admit()
            batch = sorted(self.active, key=lambda s: s.slot)  # slot order: a full batch reads the cache as views
        if not batch:
            return
        done, failed = self._run_isolating(batch)
        enc_rows = den_rows = 0
        for sub, (v_cond, v_uncond, e_rows, d_rows) in done:
            self._ingest(sub, v_cond, v_uncond)
            enc_rows, den_rows = enc_rows + e_rows, den_rows + d_rows
        for slot, (error_id, _) in failed:
            # Only the request that holds the failing rows fails; its other images stop too (nobody would read them).
            self._fail_slots([s for s in self.active if s.job is slot.job],
                             EngineFailure(error_id, f"engine failure (error id {error_id})"))
        self.ticks += 1
        self.stats.tick(TickStats(len(batch), enc_rows, den_rows, time.perf_counter() - t0))

    def _run_isolating(self, batch: list[ImageSlot], retry: bool = True) -> tuple[list, list]:
        """Run a tick's networks; a failure fails only the rows that cause it. The whole batch is retried once (a
        transient fault costs nothing); if it fails again, it is split in halves, recursively, down to the images
        that fail on their own. Rows do not depend on the batch they run in, so the halves compute what the whole
        would have. -> ([(sub-batch, network outputs)], [(failing image, (error id, exception))])."""
        try:
            return [(batch, self._run_networks(batch))], []
        except Exception as e:
            error_id = uuid.uuid4().hex[:12]
            log.exception("engine failure (error id %s) in a batch of %d images%s", error_id, len(batch),
                          ": retrying once" if retry else "")
            if retry:  # the same batch once more; then, if it fails again, its halves
                return self._run_isolating(batch, retry=False)
            if len(batch) == 1:
                return [], [(batch[0], (error_id, e))]
        mid = len(batch) // 2
        ok_a, bad_a = self._run_isolating(batch[:mid], retry=False)
        ok_b, bad_b = self._run_isolating(batch[mid:], retry=False)
        return ok_a + ok_b, bad_a + bad_b

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

        for job in list(self.queue):
            err = dead(job)
            if err is not None:
                self.queue.remove(job)
                self._finish_job(job, err)
        failed: dict[Job, ServiceError] = {}
        for s in self.active:
            if s.job not in failed and (err := dead(s.job)) is not None:
                failed[s.job] = err
        if failed:
            self._release([s for s in self.active if s.job in failed])
            for job, err in failed.items():
                if job in self.queue:
                    self.queue.remove(job)
                self._finish_job(job, err)

    def _admit(self) -> None:
        """Move queued images into free slots (caller holds the lock)."""
        if self.policy is Policy.REQUEST:
            if self.active:
                return  # request-level: wait for the whole batch to finish
            while self.queue and self.queue[0].spec.num_images <= len(self.free_slots):
                job = self.queue.popleft()
                while job.next_image < job.spec.num_images:
                    self._admit_image(job)
            return
        active_k = {s.job.spec.encoder_interval for s in self.active}
        for k in [k for k in self._phase if k not in active_k]:
            del self._phase[k]  # no image with this K is left: keep no state per K past its last image
        while self.queue and self.free_slots:
            job = self.queue[0]
            if not self._in_phase(job.spec.encoder_interval, active_k):
                break  # FIFO: the head waits at most K - 1 ticks; nothing behind it jumps the queue
            active_k.add(job.spec.encoder_interval)
            self._admit_image(job)
            if job.next_image == job.spec.num_images:
                self.queue.popleft()

    def _in_phase(self, k: int, active_k: set[int]) -> bool:
        """Aligned admission: an image with interval K joins only at a tick where the active images with the same K
        are due an encoder refresh, so their refreshes share one encoder call and the ticks between need a single
        light-network call. Unaligned, every tick has some rows due and pays an encoder call plus two light calls,
        which costs most where calls are launch-bound (GPU: docs/gpu.md). The first image of a cohort sets the phase."""
        if not self.align_encoder or k == 1:
            return True
        if k not in active_k:
            self._phase[k] = self.ticks % k
            return True
        return self.ticks % k == self._phase[k]

    def _admit_image(self, job: Job) -> None:
        spec = job.spec
        i = job.next_image
        job.next_image += 1
        if job.first_admitted is None:
            job.first_admitted = time.monotonic()
        gen = torch.Generator().manual_seed(spec.seed + i)
        slot = self.free_slots.pop(0)
        self.z[slot] = draw_noise([gen], self.sample_shape)[0]  # the same draw order as the reference sampler
        guided = needs_uncond_row(spec.label, spec.guidance_scale, self.null_label)
        self.active.append(ImageSlot(job, i, slot, gen, guided, _times(spec.steps)))

    def _rows(self, batch: list[ImageSlot], sel: list[int], uncond_pos: dict[int, int]) -> tuple[list[int], tuple]:
        """Network rows for the batch entries `sel`: their conditional rows, then the unconditional rows of the guided
        ones. -> (positions of these rows in the tick's row order, (z, t, tau, label, feature cache rows))."""
        b = len(batch)
        unc = [i for i in sel if batch[i].guided]
        src = sel + unc
        slots = torch.tensor([batch[i].slot for i in src])
        is_unc = torch.tensor([False] * len(sel) + [True] * len(unc))
        z = self.z[slots]  # (R, C, S, S)
        t = torch.tensor([batch[i].times[batch[i].step] for i in src], dtype=torch.float32)
        tau = torch.tensor([batch[i].tau for i in src], dtype=torch.float32)
        label = torch.tensor([batch[i].job.spec.label for i in sel] + [self.null_label] * len(unc), dtype=torch.long)
        cache_rows = slots + self.max_active_images * is_unc.long()
        return sel + [b + uncond_pos[i] for i in unc], (z, t, tau, label, cache_rows)

    def _run_networks(self, batch: list[ImageSlot]) -> tuple[Tensor, Tensor, int, int]:
        """-> v_cond, v_uncond per image (B, C, S, S) (= v_cond for unguided images), encoder rows, denoiser rows.
        Safe to run again on the same batch after a failure: it writes only the batch's own cache rows and tau."""
        b = len(batch)
        guided = [i for i, s in enumerate(batch) if s.guided]
        uncond_pos = {i: j for j, i in enumerate(guided)}  # batch index -> its unconditional row, after the B cond rows
        due = [i for i, s in enumerate(batch) if encoder_due(s.step, s.job.spec.encoder_interval)]
        rest = [i for i, s in enumerate(batch) if not encoder_due(s.step, s.job.spec.encoder_interval)]
        refreshed = due
        enc_rows, den_rows = len(due) + sum(batch[i].guided for i in due), b + len(guided)
        dev = self.engine.device
        v_all = torch.empty(b + len(guided), *self.sample_shape)  # every row's v: conditional rows, then unconditional
        handle = None
        if due:
            for i in due:
                batch[i].tau = batch[i].times[batch[i].step]  # idempotent: a retried tick sets the same value
            pos_d, (zd, td, _, yd, rows_d) = self._rows(batch, due, uncond_pos)
            t_enc = time.perf_counter()
            # The encoder goes to its own stream / worker thread; the light network runs the other rows meanwhile.
            handle = self.engine.encode_async(zd.to(dev), td.to(dev), yd.to(dev))
        if handle is not None and rest and not self.overlap_encoder:
            # No overlap: wait for the features, then one light-network call over every row (one bigger batch).
            self._store_features(batch, due, rows_d, handle.result(), t_enc)
            handle = None
            due, rest = [], due + rest
        if rest:
            pos_r, (zr, tr, taur, yr, rows_r) = self._rows(batch, rest, uncond_pos)
            v_all[pos_r] = self._light((zr, tr, taur, yr), self._cached(rows_r))
        if handle is not None:
            feats = self._store_features(batch, due, rows_d, handle.result(), t_enc)
            v_all[pos_d] = self._light((zd, td, td, yd), feats)  # fresh features: tau = t
        self._encoder_rows += enc_rows
        self._denoiser_rows += den_rows
        for i in refreshed:  # counted only once the whole tick succeeded (a retried tick must not count twice)
            batch[i].encoder_calls += 1
        v_cond = v_all[:b]
        v_uncond = v_cond.clone()  # an unguided image's v_uncond is its v_cond: guidance leaves it as it is
        if guided:
            v_uncond[guided] = v_all[b:]
        return v_cond, v_uncond, enc_rows, den_rows

    def _light(self, inputs: tuple[Tensor, Tensor, Tensor, Tensor], feats: tuple[Tensor, ...]) -> Tensor:
        """One light-network call (inputs: z, t, tau, label) -> v on the host."""
        dev = self.engine.device
        z, t, tau, label = (x.to(dev) for x in inputs)
        t1 = time.perf_counter()
        v = self.engine.denoise(z, t, tau, label, feats).float().cpu()
        self.stats.network_call(NetworkCall("denoiser", v.shape[0], time.perf_counter() - t1))
        return v

    def _cache_index(self, rows: Tensor) -> slice | Tensor:
        """Index of `rows` in the feature cache: a slice when they are consecutive (a full batch in slot order: reads
        are views and writes one copy, where a gather cost ~4% of a CPU tick at 16 slots), else an index tensor."""
        n = len(rows)
        if n and bool((rows == torch.arange(int(rows[0]), int(rows[0]) + n)).all()):
            return slice(int(rows[0]), int(rows[0]) + n)
        return rows.to(self.engine.device)

    def _cached(self, rows: Tensor) -> tuple[Tensor, ...]:
        ix = self._cache_index(rows)
        return tuple(c[ix] for c in self.cache)

    def _store_features(self, batch: list[ImageSlot], due: list[int], rows: Tensor, feats: tuple[Tensor, ...],
                        t_enc: float) -> tuple:
        self.stats.network_call(NetworkCall("encoder", len(rows), time.perf_counter() - t_enc))
        ix = self._cache_index(rows)
        for c, f in zip(self.cache, feats, strict=True):
            c[ix] = f.to(c.dtype)
        return feats

    def _ingest(self, batch: list[ImageSlot], v_cond: Tensor, v_uncond: Tensor) -> None:
        slots = torch.tensor([s.slot for s in batch])
        t = torch.tensor([s.times[s.step] for s in batch], dtype=torch.float32)
        s_next = torch.tensor([s.times[s.step + 1] for s in batch], dtype=torch.float32)
        g = torch.tensor([s.job.spec.guidance_scale for s in batch], dtype=torch.float32)
        noise = draw_noise([s.gen for s in batch], self.sample_shape)
        self.z[slots] = guided_step(self.z[slots], v_cond, v_uncond, g, t, s_next, self.sched, noise)
        finished = []
        for slot in batch:
            slot.step += 1
            if slot.step == slot.job.spec.steps:
                finished.append(slot)
        if not finished:
            return
        images = to_uint8(self.z[torch.tensor([s.slot for s in finished])], self.output_size)
        with self._cv:
            self._release(finished)
            for slot, img in zip(finished, images, strict=True):
                job = slot.job
                job.images[slot.index] = img
                job.encoder_calls = max(job.encoder_calls, slot.encoder_calls)
                job.done_images += 1
                if job.done_images == job.spec.num_images and not job.future.done():
                    self._finish_job(job, None)

    def _release(self, slots: list[ImageSlot]) -> None:
        gone = set(map(id, slots))
        self.active = [s for s in self.active if id(s) not in gone]
        self.free_slots.extend(s.slot for s in slots)
        self.free_slots.sort()

    def _fail_slots(self, slots: list[ImageSlot], err: ServiceError) -> None:
        with self._cv:
            self._release(slots)
            for job in {id(s.job): s.job for s in slots}.values():
                if job in self.queue:
                    self.queue.remove(job)  # its remaining images would be computed for nobody
                self._finish_job(job, err)

    def _fail_active(self, err: ServiceError) -> None:
        self._fail_slots(list(self.active), err)

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
            ))
            outcome = "ok"
        else:
            job.future.set_exception(err)
            outcome = err.kind
        self.stats.request_done(RequestDone(outcome, job.spec.num_images, admitted - job.submitted, now - job.submitted))

