"""Deadline-aware admission (issue 40), on the scheduler's own clock with a known cost model (no engine): a request
whose predicted latency (the images waiting before it, a slot turnover each, then its own steps) lies past its
deadline, or, for an interactive "auto" request, past the latency target, is refused at submission with 429 and a
Retry-After; one that fits is taken; with admission off, or before any tick was measured, nothing is refused."""

from __future__ import annotations

import numpy as np
import pytest

from service.core import GenerationSpec, Priority, QualityBudget, QueueFull, SchedulerConfig
from service.core.autok import AutoK, CostModel
from service.core.scheduler import Scheduler

SLOTS, NULL = 4, 10
TICK_S = 0.05  # every tick, whatever its rows (per-row costs 0 below): an image's service time = steps x tick / slots


def make(admission: bool = True, target: float = 2.0) -> Scheduler:
    cost = CostModel(slots=SLOTS)
    cost.theta = np.array([TICK_S, 0.0, 0.0, 0.0])  # c0 per tick, no per-row cost: a tick takes 50 ms
    cost.tick_s = TICK_S
    autok = AutoK(QualityBudget({1: 1.0, 4: 1.05}, 1.15, default_k=4), target_s=target, cost=cost)
    return Scheduler(SchedulerConfig(SLOTS, queue_size=100, deadline_admission=admission, admit_target_s=target),
                     NULL, autok=autok, cost=cost)


def spec(n=1, steps=32, deadline=None, auto=False, priority=Priority.INTERACTIVE) -> GenerationSpec:
    return GenerationSpec(3, n, steps, 4, 1.5, 0, deadline=deadline, auto=auto, priority=priority)


def fill(s: Scheduler, now: float, waiting: int) -> None:
    """Every slot busy, `waiting` images queued behind them."""
    s.submit(spec(SLOTS), now=now)
    s.schedule(now)  # admits them: no slot is free any more
    assert not s.free_slots
    for _ in range(waiting):
        s.submit(spec(1), now=now)


def test_a_request_that_cannot_meet_its_deadline_is_refused_with_retry_after():
    s, now = make(), 1000.0
    fill(s, now, waiting=8)
    # 8 images ahead + its own = 9 slot turnovers of 32 x 50 ms / 4 slots = 0.4 s each, then 32 steps x 50 ms = 1.6 s.
    assert s.predicted_latency(spec(1)) == pytest.approx(9 * 0.4 + 1.6)
    with pytest.raises(QueueFull) as e:
        s.submit(spec(1, deadline=now + 4.0), now=now)
    assert e.value.status == 429 and e.value.retry_after_s == pytest.approx(5.2 - 4.0)
    assert "5.2 s" in str(e.value) and "deadline" in str(e.value)
    assert s.refused_late == 1
    s.submit(spec(1, deadline=now + 6.0), now=now)  # fits: taken
    assert len(s.queue) == 9


def test_an_interactive_auto_request_is_held_to_the_latency_target_a_fixed_one_to_its_deadline():
    s, now = make(target=3.0), 1000.0
    fill(s, now, waiting=4)  # 5 turnovers x 0.4 s + 1.6 s = 3.6 s predicted
    with pytest.raises(QueueFull, match="latency target"):
        s.submit(spec(1, deadline=now + 60, auto=True), now=now)
    s.submit(spec(1, deadline=now + 60), now=now)  # fixed K: its own deadline, 60 s, is what it asked for
    s.submit(spec(1, deadline=None, auto=True, priority=Priority.BATCH), now=now)  # batch: throughput work, no target


def test_an_interactive_request_counts_only_the_interactive_images_ahead():
    s, now = make(), 1000.0
    fill(s, now, waiting=0)
    for _ in range(20):
        s.submit(spec(1, priority=Priority.BATCH), now=now)  # 20 batch images wait: not ahead of interactive ones
    assert s.predicted_latency(spec(1)) == pytest.approx(1 * 0.4 + 1.6)
    s.submit(spec(1, deadline=now + 2.5), now=now)
    with pytest.raises(QueueFull):
        s.submit(spec(1, deadline=now + 2.5, priority=Priority.BATCH), now=now)  # a batch one has them ahead


def test_nothing_is_refused_with_admission_off_below_capacity_or_before_any_tick():
    s, now = make(admission=False), 1000.0
    fill(s, now, waiting=50)
    s.submit(spec(1, deadline=now + 0.5), now=now)  # would be late, but admission is off
    idle = make()
    idle.submit(spec(1, deadline=now + 1.7), now=now)  # free slots: its own 1.6 s only
    idle.submit(spec(1, deadline=now + 0.5), now=now)  # late even alone: taken, answered 504 at its deadline as before
    busy = make()
    fill(busy, now, waiting=8)
    busy.submit(spec(1, deadline=now + 1.0), now=now)  # likewise: its own steps alone take 1.6 s
    cold = make()
    cold.cost.tick_s = 0.0  # nothing measured yet: no prediction, no refusal
    fill(cold, now, waiting=50)
    cold.submit(spec(1, deadline=now + 0.5), now=now)
