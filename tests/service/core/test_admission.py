"""Admission, reaping and preemption decided by the pure scheduler alone: no engine, no thread. A stand-in runner
answers each plan as a runner would (the last step's picture, the paused slots' samples), so these tests say what
the scheduler decides, tick by tick, in milliseconds."""

from __future__ import annotations

import numpy as np
import pytest

from service.core import Cancelled, DeadlineExceeded, GenerationSpec, NotReady, Policy, Priority, QueueFull, SchedulerConfig
from service.core.runner import TickOutcome, TickPlan
from service.core.scheduler import Scheduler

NULL = 10


def outcome(plan: TickPlan) -> TickOutcome:
    """What a runner reports for `plan`: a picture for every image at its last step, each paused slot's sample."""
    return TickOutcome(finished={s: np.full((2, 2), s, np.uint8) for s, last in zip(plan.slots, plan.last, strict=True)
                                 if last},
                       paused={s: np.full((1, 4, 4), s, np.float32) for s in plan.paused},
                       encoder_rows=sum(plan.due), denoiser_rows=len(plan.slots))


def tick(s: Scheduler, now: float = 0.0) -> tuple[TickPlan, list]:
    scheduled = s.schedule(now)
    return scheduled.plan, scheduled.ended + s.update(scheduled, outcome(scheduled.plan), now)


def spec(n=1, steps=8, k=4, seed=0, priority=Priority.INTERACTIVE, deadline=None) -> GenerationSpec:
    return GenerationSpec(1, n, steps, k, 1.0, seed, deadline=deadline, priority=priority)


def make(slots=4, queue=8, **config) -> Scheduler:
    return Scheduler(SchedulerConfig(slots, queue, **config), NULL)


def test_round_robin_gives_a_small_request_a_slot_beside_a_large_one():
    s = make(slots=4)
    big, small = s.submit(spec(n=8, seed=1)), s.submit(spec(n=1, seed=100))
    plan, _ = tick(s)
    assert len(plan.slots) == 4 and sorted(a.job is small for a in s.active) == [False, False, False, True]
    assert plan.admitted == ((0, 1), (1, 100), (2, 2), (3, 3))  # (slot, seed): noise draw 0 is set for these
    assert big.next_image == 3


def test_an_image_joins_where_its_cohort_refreshes():
    s = make(slots=4)
    s.submit(spec(n=1, k=4, seed=1))
    tick(s)  # tick 0: the K = 4 cohort refreshes at ticks 0, 4, 8, ...
    late = s.submit(spec(n=1, k=4, seed=2))
    joined = []
    for _ in range(5):
        plan, _ = tick(s)
        joined.append(any(a.job is late for a in s.active))
    assert joined == [False, False, False, True, True]  # waited for tick 4, then shared its encoder call
    assert plan.due == (False, False)


def test_unaligned_images_join_at_once():
    s = make(slots=4, align_encoder=False)
    s.submit(spec(n=1, k=4, seed=1))
    tick(s)
    late = s.submit(spec(n=1, k=4, seed=2))
    tick(s)
    assert any(a.job is late for a in s.active)


def test_request_policy_admits_whole_requests_only_when_the_batch_is_empty():
    s = make(slots=4, policy=Policy.REQUEST)
    a, b = s.submit(spec(n=3, steps=2, seed=1)), s.submit(spec(n=2, steps=2, seed=10))
    plan, _ = tick(s)
    assert len(plan.slots) == 3  # b does not fit beside a
    _, ended = tick(s)
    assert [e.job for e in ended] == [a] and ended[0].result.seeds == [1, 2, 3]
    plan, _ = tick(s)
    assert len(plan.slots) == 2 and all(x.job is b for x in s.active)


def test_a_finished_job_carries_its_pictures_in_image_order():
    s = make(slots=4)
    job = s.submit(spec(n=2, steps=3, seed=7))
    ended = []
    for _ in range(3):
        ended += tick(s)[1]
    assert [e.job for e in ended] == [job] and ended[0].error is None
    r = ended[0].result
    assert r.seeds == [7, 8] and r.denoiser_calls == 3 and r.encoder_calls == 1 and len(r.images) == 2
    assert s.free_slots == [0, 1, 2, 3] and not s.has_work()


def test_reaping_frees_slots_and_answers_with_the_reason():
    s = make(slots=4)
    gone, late, kept = s.submit(spec(seed=1)), s.submit(spec(seed=2, deadline=5.0)), s.submit(spec(seed=3))
    tick(s, now=0.0)
    gone.cancel()
    _, ended = tick(s, now=6.0)
    why = {e.job: type(e.error) for e in ended}
    assert why == {gone: Cancelled, late: DeadlineExceeded}
    assert [a.job for a in s.active] == [kept] and len(s.free_slots) == 3


def test_a_full_queue_refuses_with_the_predicted_wait_and_a_draining_one_with_not_ready():
    s = make(slots=1, queue=2)
    s.submit(spec(seed=1))
    s.submit(spec(seed=2))
    with pytest.raises(QueueFull) as full:
        s.submit(spec(seed=3))
    assert full.value.retry_after_s >= 1.0
    s.stop_admission()
    with pytest.raises(NotReady):
        s.submit(spec(seed=4))


def test_abort_fails_everything_at_the_next_tick():
    s = make(slots=1)
    running, queued = s.submit(spec(seed=1)), s.submit(spec(seed=2))
    tick(s)
    s.abort(NotReady("the drain timed out"))
    _, ended = tick(s)
    assert {e.job for e in ended} == {running, queued} and all(isinstance(e.error, NotReady) for e in ended)
    assert not s.has_work()


def test_a_batch_image_pauses_at_its_refresh_and_resumes_with_the_sample_the_runner_read():
    s = make(slots=2, max_paused_images=4)
    batch = s.submit(spec(n=2, steps=12, k=4, seed=1, priority=Priority.BATCH))
    for _ in range(2):
        tick(s)
    inter = s.submit(spec(n=1, steps=4, k=4, seed=50))
    plan, _ = tick(s)  # step 2: not a refresh boundary, nobody pauses yet
    assert not plan.paused and not s.paused
    plan, _ = tick(s)  # step 3: K = 4 refreshes at steps 0, 4, 8: still not
    plan, _ = tick(s)  # step 4: due, the youngest image pauses and its slot goes to the interactive image
    assert len(plan.paused) == 1 and s.preemptions == 1
    paused_slot = plan.paused[0]
    assert (paused_slot, 50) in plan.admitted
    assert s.paused[0].z is not None and s.paused[0].z.flat[0] == paused_slot  # the sample read back by that tick
    ended = []
    while not ended:
        plan, ended = tick(s)
    assert ended[0].job is inter
    plan, _ = tick(s)
    assert [slot for slot, _ in plan.resumed] and not s.paused  # back, at the step it paused
    assert batch.next_image == 2


def test_priorities_off_is_one_class_and_never_pauses():
    s = make(slots=1, priorities=False)
    s.submit(spec(steps=12, seed=1, priority=Priority.BATCH))
    tick(s)
    s.submit(spec(seed=2))
    for _ in range(8):
        plan, _ = tick(s)
        assert not plan.paused
    assert s.preemptions == 0
