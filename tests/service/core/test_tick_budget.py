"""The interactive tick budget (issue 39, item 6), on the scheduler's own clock with a real ONNX Runtime engine: while an
interactive image runs, batch images pause at their encoder refresh until the predicted tick fits the budget (no batch
image joins meanwhile), and once it is done they resume and give exactly the images they give alone."""

from __future__ import annotations

from dualrate.diffusion import CosineSchedule
from service.core import GenerationSpec, Priority, SchedulerConfig
from service.core.loop import EngineLoop

SLOTS, K = 8, 4


def make(engine, model, slowdown: float) -> EngineLoop:
    return EngineLoop(engine, CosineSchedule(model.cfg.logsnr_min, model.cfg.logsnr_max), model.cfg.null_label,
                      SchedulerConfig(SLOTS, queue_size=32, priorities=True, max_paused_images=64,
                                      interactive_slowdown=slowdown), output_size=model.cfg.output_size)


def finish(loop: EngineLoop, *jobs, limit: int = 3000) -> None:
    for _ in range(limit):
        if all(j.future.done() for j in jobs):
            return
        loop.tick()
    raise AssertionError("never finished")


def test_batch_images_pause_at_their_refresh_until_the_tick_fits_and_resume_exactly(engine, model):
    batch = GenerationSpec(3, SLOTS, 96, K, 1.5, 500, priority=Priority.BATCH)
    alone = make(engine, model, 3.0)
    ref = alone.submit(batch)
    finish(alone, ref)

    loop = make(engine, model, 3.0)
    s = loop.scheduler
    job = loop.submit(batch)
    for _ in range(30):  # the cost model fits itself on these ticks
        loop.tick()
    assert len(s.active) == SLOTS
    inter = loop.submit(GenerationSpec(5, 1, 32, K, 1.5, 7, priority=Priority.INTERACTIVE))
    fitted_at = None
    for tick in range(200):
        if inter.future.done():
            break
        loop.tick()
        running = [a for a in s.active if a.job is inter]
        budget = s._budget()
        if running and budget is not None and fitted_at is None and s._tick_s(s.active) <= budget:
            fitted_at = tick
        for p in s.paused:  # paused only where its features were due a refresh: nothing is lost
            assert p.image.step % K == 0
    assert inter.future.done() and fitted_at is not None
    assert fitted_at <= 2 * K  # within about one refresh period of the interactive image joining
    assert s.preemptions >= 2 and len(s.active) < SLOTS  # the budget took batch images out, more than a slot's worth
    finish(loop, job)
    assert not s.paused
    got = job.future.result()
    assert [im.tobytes() for im in got.images] == [im.tobytes() for im in ref.future.result().images]


def test_without_interactive_work_or_with_the_budget_off_nothing_pauses(engine, model):
    loop = make(engine, model, 3.0)
    job = loop.submit(GenerationSpec(3, SLOTS, 48, K, 1.5, 1, priority=Priority.BATCH))
    finish(loop, job)
    assert loop.scheduler.preemptions == 0  # batch alone: no budget
    off = make(engine, model, 0.0)
    job = off.submit(GenerationSpec(3, SLOTS - 1, 96, K, 1.5, 1, priority=Priority.BATCH))
    for _ in range(30):
        off.tick()
    inter = off.submit(GenerationSpec(5, 1, 32, K, 1.5, 7, priority=Priority.INTERACTIVE))
    finish(off, inter)
    assert off.scheduler.preemptions == 0  # a free slot, and no budget: the batch images keep running
