"""Admission policies: which queued images join the running batch at a tick. One enum names them; one factory builds
them. They run under the scheduler's lock and use its queue, active images, free slots and tick count."""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.scheduler import Scheduler


class Policy(StrEnum):
    CONTINUOUS = "continuous"  # step-level: join and leave at every tick
    REQUEST = "request"  # request-level: a batch of whole requests runs to completion before the next


class Admission:
    """Which queued images join at this tick (caller holds the scheduler's lock). Chosen by `admission_policy`."""

    def admit(self, s: Scheduler) -> None:
        raise NotImplementedError


class ContinuousAdmission(Admission):
    """Step-level: images join at any tick, FIFO. Aligned (the default), an image with interval K joins only at a
    tick where the active images with the same K are due an encoder refresh (it waits < K ticks), so their refreshes
    share one encoder call and the ticks between need one light-network call. Unaligned, every tick has some rows
    due and pays an encoder call plus two light calls, which costs most where calls are launch-bound (GPU:
    docs/gpu.md). The first image of a cohort sets the phase; no state is kept for a K without active images."""

    def __init__(self, aligned: bool = True) -> None:
        self.aligned = aligned
        self.phase: dict[int, int] = {}  # K -> ticks % K at which the active images with interval K refresh

    def admit(self, s: Scheduler) -> None:
        active_k = {a.job.spec.encoder_interval for a in s.active}
        for k in [k for k in self.phase if k not in active_k]:
            del self.phase[k]
        while s.queue and s.free_slots:
            job = s.queue[0]
            k = job.spec.encoder_interval
            if self.aligned and k > 1:
                if k not in active_k:
                    self.phase[k] = s.ticks % k
                elif s.ticks % k != self.phase[k]:
                    break  # FIFO: the head waits at most K - 1 ticks; nothing behind it jumps the queue
            active_k.add(k)
            s.admit_image(job)
            if job.next_image == job.spec.num_images:
                s.queue.popleft()


class RequestAdmission(Admission):
    """Request-level (a classic dynamic batcher): whole requests join only when the running batch has finished."""

    def admit(self, s: Scheduler) -> None:
        if s.active:
            return
        while s.queue and s.queue[0].spec.num_images <= len(s.free_slots):
            job = s.queue.popleft()
            while job.next_image < job.spec.num_images:
                s.admit_image(job)


def admission_policy(policy: Policy, align_encoder: bool = True) -> Admission:
    return RequestAdmission() if policy is Policy.REQUEST else ContinuousAdmission(aligned=align_encoder)
