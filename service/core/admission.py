"""Admission policies: which queued images join the running batch at a tick. One enum names them; one factory builds
them. The scheduler calls them while it plans a tick; they see it through `AdmissionView`, the narrow part they use
(its queue, active and paused images, free slots, tick count and the calls that admit or resume an image)."""

from __future__ import annotations

from collections import deque
from enum import StrEnum
from typing import Any, Protocol

from service.core.request import Priority


class Policy(StrEnum):
    CONTINUOUS = "continuous"  # step-level: join and leave at every tick
    REQUEST = "request"  # request-level: a batch of whole requests runs to completion before the next


class AdmissionView(Protocol):
    """What an admission policy may read and call on the scheduler (service.core.scheduler.Scheduler is one)."""

    queue: deque[Any]  # Jobs waiting, oldest first: .spec (encoder_interval, num_images, priority), .next_image
    active: list[Any]  # ImageSlots running: .job
    paused: list[Any]  # PausedImages, oldest request first: .image.job
    free_slots: list[int]
    ticks: int

    @property
    def reserved_slots(self) -> int: ...

    @property
    def priorities(self) -> bool: ...

    def is_small(self, job: Any) -> bool: ...

    def may_lend(self, job: Any) -> bool: ...

    def interactive_waiting(self) -> int: ...

    def admit_image(self, job: Any) -> None: ...

    def resume_image(self, p: Any) -> None: ...

    def batch_room(self) -> bool: ...


class Admission:
    """Which queued images join at this tick. Chosen by `admission_policy`."""

    def admit(self, s: AdmissionView) -> None:
        raise NotImplementedError


class ContinuousAdmission(Admission):
    """Step-level: images join at any tick, one image per waiting request in turn (round robin), small requests (a
    default request or cheaper) first, so a small request is not queued behind the images of the large ones before
    it. The last `reserved_slots` free slots are kept for small requests: while one waits, always; while none waits,
    they are lent to large images expected to finish within `s.lend_horizon_s` (their steps at the measured tick
    time), so reserved capacity does not idle under a flood of moderate requests, and a small request that arrives
    waits at most about that long for the next slot (small requests are admitted first). Images longer than that
    never take a reserved slot: without preemption a small request would wait their whole trajectory.

    Aligned (the default), an image with interval K joins only at a tick where the active images with the same K are
    due an encoder refresh (it waits < K ticks), so their refreshes share one encoder call and the ticks between need
    one light-network call; a request waiting for its phase does not hold up the others. Unaligned, every tick has
    some rows due and pays an encoder call plus two light calls, which costs most where calls are launch-bound (GPU:
    docs/gpu.md). The first image of a cohort sets the phase; no state is kept for a K without active images."""

    def __init__(self, aligned: bool = True) -> None:
        self.aligned = aligned
        self.phase: dict[int, int] = {}  # K -> ticks % K at which the active images with interval K refresh

    def admit(self, s: AdmissionView) -> None:
        active_k = {a.job.spec.encoder_interval for a in s.active}
        for k in [k for k in self.phase if k not in active_k]:
            del self.phase[k]
        if not s.priorities:
            self._jobs(s, active_k, None)
            return
        # Interactive requests first. While any of their images still waits (no slot yet, or its K's phase not
        # come), the free slots are theirs; otherwise paused batch images resume, oldest first, then new batch work.
        self._jobs(s, active_k, Priority.INTERACTIVE)
        if s.interactive_waiting():
            return
        for p in list(s.paused):
            if not s.free_slots or not s.batch_room():
                return
            if p.z is None:  # paused at this very tick: its sample is read back by this tick's run
                continue
            if self._blocked(s, p.image.job, active_k, small_waits=False):
                continue
            s.resume_image(p)
        if not s.paused and s.batch_room():
            self._jobs(s, active_k, Priority.BATCH)

    def _blocked(self, s: AdmissionView, job: Any, active_k: set[int], small_waits: bool) -> bool:
        """May the next image of `job` not take a free slot at this tick? Reserved slots and the K cohort's phase;
        otherwise records the phase of a new cohort and the K as active."""
        if len(s.free_slots) <= s.reserved_slots and not s.is_small(job) and (small_waits or not s.may_lend(job)):
            return True  # the last free slots are kept for small requests
        k = job.spec.encoder_interval
        if self.aligned and k > 1:
            if k not in active_k:
                self.phase[k] = s.ticks % k
            elif s.ticks % k != self.phase[k]:
                return True
        active_k.add(k)
        return False

    def _jobs(self, s: AdmissionView, active_k: set[int], priority: Priority | None) -> None:
        """Admit queued requests of `priority` (None: all), round robin, small requests first."""
        admitted = True
        while s.queue and s.free_slots and admitted:
            admitted = False
            # One round: an image from each request that may join now, small ones first, else oldest first.
            queue = [j for j in s.queue if priority is None or j.spec.priority is priority]
            small_waits = any(s.is_small(j) for j in queue)
            for job in sorted(queue, key=lambda j: not s.is_small(j)):
                if not s.free_slots:
                    break
                if self._blocked(s, job, active_k, small_waits):
                    continue
                if priority is Priority.BATCH and not s.batch_room():
                    return  # interactive images run and the tick takes its budget
                s.admit_image(job)
                admitted = True
                if job.next_image == job.spec.num_images:
                    s.queue.remove(job)


class RequestAdmission(Admission):
    """Request-level (a classic dynamic batcher): whole requests join only when the running batch has finished."""

    def admit(self, s: AdmissionView) -> None:
        if s.active:
            return
        while s.queue and s.queue[0].spec.num_images <= len(s.free_slots):
            job = s.queue.popleft()
            while job.next_image < job.spec.num_images:
                s.admit_image(job)


def admission_policy(policy: Policy, align_encoder: bool = True) -> Admission:
    return RequestAdmission() if policy is Policy.REQUEST else ContinuousAdmission(aligned=align_encoder)
