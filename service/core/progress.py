"""Progress and previews of streamed requests (POST /generate/stream), as the scheduler thread sees them.

A streamed job carries a `Listener`; after each tick the scheduler calls `Handover.emit`, which sends the job, in one
call, a `progress` event (its least advanced image's completed steps, encoder calls so far) and a `preview` per image
whose preview the plan asked for (`preview_due`). The streamed jobs get their events together, at most once per
PROGRESS_INTERVAL_S (the previews made since the last hand-over, then one `progress`), and each job always at its
last step (`Handover`). Jobs without a listener cost nothing here. Listeners must not block: the service's listener
hands the events to the request's event loop. Each hand-over wakes that loop and becomes one write to the client, and
on two CPU cores that event-loop work is taken from the tick loop (docs/runs/service_bench.md: a progress event every tick
cost the plain clients beside 4 streams ~4% of their images/s), so a stream gets at most 1 / PROGRESS_INTERVAL_S
writes per second however often it asks for previews; every preview asked for still arrives, in order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from service.core.request import ImageSlot, Job
    from service.core.runner import Preview

log = logging.getLogger("service.core.progress")

class Event(NamedTuple):
    """One stream event: `progress` (step, of, images_done, num_images, encoder_calls) or `preview` (index, step,
    image). The payload is what the client receives (a preview's image becomes its PNG on the way)."""

    name: str
    payload: dict[str, Any]

    @property
    def final(self) -> bool:
        """The progress of the job's last step: its answer (done or error) follows."""
        return self.name == "progress" and self.payload["step"] == self.payload["of"]


Listener = Callable[[list[Event]], None]  # a tick's events for one job, in order
PROGRESS_INTERVAL_S = 0.25  # the most often a stream gets events (its last step's always come)


def preview_due(batch: Sequence[ImageSlot]) -> tuple[bool, ...]:
    """Per image of the tick: is a preview due (every `preview_every` steps, not at the last step, whose picture
    comes in the answer)? () when no image in the tick wants previews: the runner then does no extra work."""
    flags = tuple(a.job.preview_every > 0 and (a.step + 1) % a.job.preview_every == 0 and a.step + 1 < a.job.spec.steps
                  for a in batch)
    return flags if any(flags) else ()


class Handover:
    """When streamed jobs get their events: all of them together, at most once per PROGRESS_INTERVAL_S, and each job
    at its last step. Together, because each hand-over wakes the event loop, and the wake-ups of streams handed over
    on different ticks were what streams cost the tick loop (every stream sharing one wake-up: one per interval)."""

    def __init__(self) -> None:
        self.last = float("-inf")  # the last time the streams got their events

    def emit(self, batch: Sequence[ImageSlot], previews: dict[int, Preview], failed: Collection[Job]) -> None:
        """After a tick (steps and finished images already counted by the scheduler's update): queue each streamed
        job's due previews; when the interval has passed (or at a job's last step) hand the job its previews so far
        and a `progress` event. A preview's "image" is a `Preview`: the receiver makes the picture (`.picture()`),
        off the tick loop."""
        jobs: dict[int, tuple[Job, list[ImageSlot]]] = {}
        for a in batch:
            if a.job.listener is not None and a.job not in failed:
                jobs.setdefault(id(a.job), (a.job, []))[1].append(a)
        if not jobs:
            return
        now = time.monotonic()
        due = now - self.last >= PROGRESS_INTERVAL_S
        if due:
            self.last = now
        for job, images in jobs.values():
            steps = job.spec.steps
            job.pending += [Event("preview", {"index": a.index, "step": a.step, "image": previews[a.slot]})
                            for a in images if a.slot in previews]
            waiting = job.next_image < job.spec.num_images  # images not admitted yet have done no step
            least = 0 if waiting else min((a.step for a in images), default=steps)
            if least < steps and not due:
                continue
            progress = Event("progress", {
                "step": least, "of": steps, "images_done": job.done_images,
                "num_images": job.spec.num_images,
                "encoder_calls": max([job.encoder_calls, *(a.encoder_calls for a in images)])})
            events, job.pending = [*job.pending, progress], []
            _send(job, events)


def _send(job: Job, events: list[Event]) -> None:
    assert job.listener is not None
    try:
        job.listener(events)
    except Exception:  # a listener's bug must not stop the tick loop
        log.exception("progress listener failed")
