"""Priorities and preemption at the encoder boundary, on the scheduler's own clock (one `tick()` at a time) with a
real ONNX Runtime engine: batch images pause only where their features are due a refresh, resume oldest first at
the same step, and give exactly the images (0/255) and the network work they give unpaused."""

from __future__ import annotations

import time

import numpy as np
import pytest

from dualrate.diffusion import CosineSchedule
from service.core import Cancelled, DeadlineExceeded, GenerationSpec, NotReady, Priority, SchedulerConfig
from service.core.loop import EngineLoop
from service.core.stats import NetworkCall, StatsSink

BATCH, INTERACTIVE = Priority.BATCH, Priority.INTERACTIVE


class Rows(StatsSink):
    def __init__(self) -> None:
        self.rows = {"encoder": 0, "denoiser": 0}

    def network_call(self, call: NetworkCall) -> None:
        self.rows[call.network] += call.rows


def make(engine, model, slots=4, paused=64, priorities=True):
    stats = Rows()
    s = EngineLoop(engine, CosineSchedule(model.cfg.logsnr_min, model.cfg.logsnr_max), model.cfg.null_label,
                   SchedulerConfig(slots, queue_size=32, priorities=priorities, max_paused_images=paused), stats=stats,
                  output_size=model.cfg.output_size)
    return s, stats


def spec(n, steps, k, seed, priority, label=3, deadline=None):
    return GenerationSpec(label, n, steps, k, 1.5, seed, deadline=deadline, priority=priority)


def ticks_until(s, cond, limit=2000):
    for i in range(limit):
        if cond():
            return i
        s.tick()
    raise AssertionError("condition never held")


def test_a_batch_request_preempted_twice_gives_the_same_images_and_work_as_alone(engine, model):
    alone, alone_rows = make(engine, model)
    job = alone.submit(spec(4, 16, 4, 100, BATCH))
    ticks_until(alone, job.future.done)
    ref = job.future.result()
    inter_alone, inter_rows = make(engine, model)
    i1 = inter_alone.submit(spec(2, 4, 2, 7, INTERACTIVE))
    i2 = inter_alone.submit(spec(3, 6, 3, 9, INTERACTIVE))
    ticks_until(inter_alone, lambda: i1.future.done() and i2.future.done())

    s, rows = make(engine, model)
    batch = s.submit(spec(4, 16, 4, 100, BATCH))
    for _ in range(2):
        s.tick()
    first = s.submit(spec(2, 4, 2, 7, INTERACTIVE))  # no free slot: two batch images must pause
    ticks_until(s, first.future.done)
    ticks_until(s, lambda: not s.scheduler.paused)  # all four batch images running again
    assert s.scheduler.preemptions == 2
    second = s.submit(spec(3, 6, 3, 9, INTERACTIVE))
    ticks_until(s, lambda: batch.future.done() and second.future.done())
    assert s.scheduler.preemptions == 5  # two images paused for the first, three for the second
    got = batch.future.result()
    assert all(np.array_equal(a, b) for a, b in zip(got.images, ref.images, strict=True))  # 0/255
    assert (got.encoder_calls, got.denoiser_calls) == (ref.encoder_calls, ref.denoiser_calls)
    for a, b in ((first, i1), (second, i2)):
        assert all(np.array_equal(x, y) for x, y in zip(a.future.result().images, b.future.result().images, strict=True))
    # No recomputation: the rows of both networks are those of the three requests run apart.
    assert rows.rows == {n: alone_rows.rows[n] + inter_rows.rows[n] for n in rows.rows}


def test_batch_images_pause_only_at_their_refresh_boundary(engine, model):
    s, _ = make(engine, model)
    s.submit(spec(4, 16, 4, 1, BATCH))
    s.tick()  # the batch images are now at step 1: mid-interval until step 4
    s.submit(spec(1, 8, 4, 2, INTERACTIVE))
    waited = ticks_until(s, lambda: s.scheduler.paused)
    assert waited == 4  # three ticks run steps 1-3 with every image in place; the fourth pauses one at step 4
    assert [p.image.step % 4 for p in s.scheduler.paused] == [0]
    assert len(s.scheduler.paused) == 1  # one interactive image needs one slot
    assert [a.job.spec.priority for a in s.scheduler.active].count(INTERACTIVE) == 1  # it took the slot at once


def test_paused_images_resume_oldest_first_at_their_step(engine, model):
    s, _ = make(engine, model, slots=2)
    old = s.submit(spec(1, 12, 2, 1, BATCH))
    young = s.submit(spec(1, 12, 2, 2, BATCH))
    s.tick()
    s.tick()
    short = s.submit(spec(1, 4, 2, 3, INTERACTIVE))
    long = s.submit(spec(1, 10, 2, 4, INTERACTIVE))
    ticks_until(s, lambda: len(s.scheduler.paused) == 2)
    steps = {p.image.job: p.image.step for p in s.scheduler.paused}
    assert [p.image.job for p in s.scheduler.paused] == [old, young]
    ticks_until(s, short.future.done)
    s.tick()  # one slot free: the older request comes back, at the step where it paused, and refreshes there
    (back,) = [a for a in s.scheduler.active if a.job.spec.priority is BATCH]
    assert back.job is old and back.step == steps[old] + 1 and back.encoder_calls == steps[old] // 2 + 1
    assert [p.image.job for p in s.scheduler.paused] == [young]
    ticks_until(s, long.future.done)
    ticks_until(s, lambda: old.future.done() and young.future.done())


def test_preemption_prefers_the_youngest_batch_request_and_priorities_off_never_pauses(engine, model):
    s, _ = make(engine, model, slots=2)
    old = s.submit(spec(1, 12, 2, 1, BATCH))
    s.tick()
    s.tick()
    young = s.submit(spec(1, 12, 2, 2, BATCH))  # joins at the cohort's phase
    ticks_until(s, lambda: len(s.scheduler.active) == 2)
    s.submit(spec(1, 4, 2, 3, INTERACTIVE))
    ticks_until(s, lambda: s.scheduler.paused)
    assert [p.image.job for p in s.scheduler.paused] == [young]
    assert {a.job for a in s.scheduler.active} >= {old}

    off, _ = make(engine, model, slots=2, priorities=False)
    jobs = [off.submit(spec(1, 12, 2, 1, BATCH)), off.submit(spec(1, 12, 2, 2, BATCH))]
    off.tick()
    jobs.append(off.submit(spec(1, 4, 2, 3, INTERACTIVE)))
    ticks_until(off, lambda: all(j.future.done() for j in jobs))
    assert off.scheduler.preemptions == 0


def test_cancel_and_deadline_while_paused(engine, model):
    s, _ = make(engine, model, slots=2)
    cancelled = s.submit(spec(1, 12, 2, 1, BATCH))
    expiring = s.submit(spec(1, 12, 2, 2, BATCH, deadline=time.monotonic() + 3600))
    s.tick()
    inter = s.submit(spec(2, 20, 2, 3, INTERACTIVE))
    ticks_until(s, lambda: len(s.scheduler.paused) == 2)
    cancelled.cancel()
    object.__setattr__(expiring.spec, "deadline", time.monotonic() - 1)  # its deadline passes while it is paused
    s.tick()
    assert not s.scheduler.paused
    with pytest.raises(Cancelled):
        cancelled.future.result(0)
    with pytest.raises(DeadlineExceeded):
        expiring.future.result(0)
    ticks_until(s, inter.future.done)
    assert inter.future.result().images


def test_a_drain_waits_for_paused_images_and_an_abort_fails_them(engine, model):
    s, _ = make(engine, model, slots=2)
    batch = s.submit(spec(2, 8, 2, 1, BATCH))
    s.tick()
    inter = s.submit(spec(2, 6, 2, 3, INTERACTIVE))
    ticks_until(s, lambda: s.scheduler.paused)
    s.stop_admission()
    assert not s.idle()  # paused work keeps a drain waiting
    with pytest.raises(NotReady):
        s.submit(spec(1, 4, 2, 4, INTERACTIVE))
    ticks_until(s, s.idle)
    assert len(batch.future.result().images) == 2 and inter.future.result().images

    s2, _ = make(engine, model, slots=2)
    batch2 = s2.submit(spec(2, 8, 2, 1, BATCH))
    s2.tick()
    s2.submit(spec(2, 6, 2, 3, INTERACTIVE))
    ticks_until(s2, lambda: s2.scheduler.paused)
    s2.abort(NotReady("forced"))
    s2.tick()
    assert s2.idle() and not s2.scheduler.paused
    with pytest.raises(NotReady):
        batch2.future.result(0)


def test_paused_state_is_bounded(engine, model):
    s, _ = make(engine, model, slots=4, paused=1)
    batch = s.submit(spec(4, 8, 2, 1, BATCH))
    s.tick()
    s.submit(spec(3, 8, 2, 2, INTERACTIVE))
    for _ in range(6):
        s.tick()
        assert len(s.scheduler.paused) <= 1
    assert s.scheduler.preemptions == 1  # the bound held; the other interactive images waited for slots to free
    assert s.scheduler.paused[0].z.nbytes == int(np.prod(engine.sample_shape)) * 4  # one sample, in host memory
    ticks_until(s, batch.future.done)
