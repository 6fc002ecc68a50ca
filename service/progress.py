"""Progress and previews of streamed requests (POST /generate/stream), as the scheduler thread sees them.

A streamed job carries a `Listener`; after each tick the scheduler calls `emit_progress`, which sends the job, in one
call, a `progress` event (its least advanced image's completed steps, encoder calls so far; at most one per
PROGRESS_INTERVAL_S, and always the last) and a `preview` per image whose preview the plan asked for
(`preview_due`). Jobs without a listener cost nothing here. Listeners must not block: the service's listener hands
the events to the request's event loop. Measured (docs/service_bench.md): a progress event every tick cost the plain
clients beside 4 streams ~4% of their images/s on two CPU cores (event-loop work competing with the tick loop).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from service.scheduler import ImageSlot, Job

log = logging.getLogger("service.progress")

Event = tuple[str, dict[str, Any]]  # (event name, payload)
Listener = Callable[[list[Event]], None]  # a tick's events for one job, in order
PROGRESS_INTERVAL_S = 0.25  # the most often a stream gets a progress event (its last one always comes)


def preview_due(batch: Sequence[ImageSlot]) -> tuple[bool, ...]:
    """Per image of the tick: is a preview due (every `preview_every` steps, not at the last step, whose picture
    comes in the answer)? () when no image in the tick wants previews: the runner then does no extra work."""
    flags = tuple(a.job.preview_every > 0 and (a.step + 1) % a.job.preview_every == 0 and a.step + 1 < a.job.spec.steps
                  for a in batch)
    return flags if any(flags) else ()


def emit_progress(batch: Sequence[ImageSlot], previews: dict[int, np.ndarray], failed: dict[Job, str]) -> None:
    """After a tick (steps already advanced): one `progress` per streamed job in the tick, then its previews."""
    jobs: dict[int, tuple[Job, list[ImageSlot]]] = {}
    for a in batch:
        if a.job.listener is not None and a.job not in failed:
            jobs.setdefault(id(a.job), (a.job, []))[1].append(a)
    now = time.monotonic()
    for job, images in jobs.values():
        steps = job.spec.steps
        events: list[Event] = []
        waiting = job.next_image < job.spec.num_images  # images not admitted yet have done no step
        least = 0 if waiting else min((a.step for a in images), default=steps)
        if least == steps or now - job.progress_sent >= PROGRESS_INTERVAL_S:
            job.progress_sent = now
            events.append(("progress", {
                "step": least, "of": steps, "images_done": job.done_images + sum(a.step == steps for a in images),
                "num_images": job.spec.num_images,
                "encoder_calls": max([job.encoder_calls, *(a.encoder_calls for a in images)])}))
        events += [("preview", {"index": a.index, "step": a.step, "image": previews[a.slot]})
                   for a in images if a.slot in previews]
        if events:
            _send(job, events)


def _send(job: Job, events: list[Event]) -> None:
    assert job.listener is not None
    try:
        job.listener(events)
    except Exception:  # a listener's bug must not stop the tick loop
        log.exception("progress listener failed")
