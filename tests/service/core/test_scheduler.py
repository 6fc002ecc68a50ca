"""The scheduler in-process on a real ONNX Runtime engine: same images as the reference sampler, both policies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dualrate.data import to_uint8
from dualrate.diffusion import CosineSchedule
from dualrate.sampler import dual_rate_sample
from engines import create_engine
from service.core import GenerationSpec, Policy, RunnerConfig, SchedulerConfig
from service.core.loop import EngineLoop
from service.core.stats import NetworkCall, StatsSink
from tests.conftest import encoder_waits_for_light_network


class Recorder(StatsSink):
    def __init__(self) -> None:
        self.calls: list[NetworkCall] = []

    def network_call(self, call: NetworkCall) -> None:
        self.calls.append(call)


def make(engine, model, policy=Policy.CONTINUOUS, slots=8, overlap=True, align=True):
    rec = Recorder()
    s = EngineLoop(engine, CosineSchedule(model.cfg.logsnr_min, model.cfg.logsnr_max), model.cfg.null_label,
                   SchedulerConfig(slots, queue_size=32, policy=policy, align_encoder=align),
                   runner=RunnerConfig(overlap_encoder=overlap), stats=rec, output_size=model.cfg.output_size)
    return s, rec


def run_all(s: EngineLoop, jobs) -> None:
    for _ in range(10_000):
        if all(j.future.done() for j in jobs):
            return
        s.tick()
    raise AssertionError("jobs did not finish")


@pytest.mark.parametrize(("policy", "overlap", "align"), [(Policy.CONTINUOUS, True, True), (Policy.REQUEST, True, True),
                                                          (Policy.CONTINUOUS, False, True), (Policy.CONTINUOUS, True, False)])
def test_scheduler_matches_the_reference_sampler(engine, model, policy, overlap, align):
    s, rec = make(engine, model, policy, overlap=overlap, align=align)
    specs = [GenerationSpec(3, 2, 8, 4, 1.5, seed=10), GenerationSpec(10, 1, 5, 2, 1.5, seed=20),
             GenerationSpec(7, 3, 12, 1, 1.0, seed=30), GenerationSpec(0, 1, 9, 9, 2.0, seed=40)]
    jobs = [s.submit(sp) for sp in specs]
    run_all(s, jobs)
    sched = CosineSchedule(model.cfg.logsnr_min, model.cfg.logsnr_max)
    for sp, job in zip(specs, jobs, strict=True):
        res = job.future.result()
        ref, st = dual_rate_sample(engine.encode, engine.denoise, torch.full((sp.num_images,), sp.label),
                                   [sp.seed + i for i in range(sp.num_images)], sp.steps, sp.encoder_interval,
                                   sp.guidance_scale, sched, model.cfg.null_label, sample_shape=model.cfg.sample_shape)
        diff = np.abs(np.stack(res.images).astype(int) - to_uint8(ref, model.cfg.output_size).astype(int)).max()
        assert diff <= 1, f"{sp}: max pixel difference {diff}"
        assert res.encoder_calls == st.encoder_calls
    assert {c.network for c in rec.calls} == {"encoder", "denoiser"}


def test_full_batch_reads_the_feature_cache_as_views_and_matches_the_reference(engine, model):
    """Every slot busy with guided images in slot order: the cache rows form one run (views, no gather)."""
    s, _ = make(engine, model, slots=2)
    sp = GenerationSpec(4, 2, 8, 4, 1.5, seed=50)
    job = s.submit(sp)
    s.tick()
    batch = sorted(s.scheduler.active, key=lambda x: x.slot)
    plan = s.scheduler._plan(batch)
    cache_rows = s.runner._rows(plan, [0, 1], [0, 1], {0: 0, 1: 1})[1][4]
    assert cache_rows.tolist() == [0, 1, 2, 3] and s.runner._cache_index(cache_rows) == slice(0, 4)
    run_all(s, [job])
    sched = CosineSchedule(model.cfg.logsnr_min, model.cfg.logsnr_max)
    ref, _ = dual_rate_sample(engine.encode, engine.denoise, torch.full((2,), 4), [50, 51], 8, 4, 1.5, sched,
                              model.cfg.null_label, sample_shape=model.cfg.sample_shape)
    diff = np.abs(np.stack(job.future.result().images).astype(int) - to_uint8(ref, model.cfg.output_size).astype(int)).max()
    assert diff <= 1


@pytest.mark.parametrize("align", [True, False])
def test_aligned_admission_shares_encoder_calls(engine, model, align):
    """B (K = 4) arrives one tick after A (K = 4). Aligned, B waits for A's next refresh (tick 4), so the two share
    every encoder call and each tick makes one light-network call; unaligned, B refreshes at ticks 1 and 5."""
    s, rec = make(engine, model, align=align)
    a = s.submit(GenerationSpec(1, 1, 12, 4, 1.0, seed=1))
    s.tick()
    b = s.submit(GenerationSpec(2, 1, 8, 4, 1.0, seed=2))
    run_all(s, [a, b])
    enc = [c for c in rec.calls if c.network == "encoder"]
    den = [c for c in rec.calls if c.network == "denoiser"]
    assert a.future.result().encoder_calls == 3 and b.future.result().encoder_calls == 2
    if align:
        assert s.scheduler.ticks == 12 and [c.rows for c in enc] == [1, 2, 2] and len(den) == 12
    else:
        assert s.scheduler.ticks == 12 and len(enc) == 5 and len(den) > 12


def test_continuous_batching_lets_short_requests_overtake_long_ones(engine, model):
    """A short request that arrives while a long one runs finishes first (it joins at a tick boundary)."""
    for policy, short_first in ((Policy.CONTINUOUS, True), (Policy.REQUEST, False)):
        s, _ = make(engine, model, policy, slots=2)
        long_job = s.submit(GenerationSpec(1, 1, 40, 4, 1.0, seed=1))
        s.tick()
        short_job = s.submit(GenerationSpec(2, 1, 4, 4, 1.0, seed=2))
        order = []
        for _ in range(100):
            s.tick()
            for name, j in (("long", long_job), ("short", short_job)):
                if j.future.done() and name not in order:
                    order.append(name)
            if len(order) == 2:
                break
        assert (order[0] == "short") is short_first, (policy, order)


def test_encoder_rows_run_while_light_network_runs_the_others(engine, model, monkeypatch):
    s, rec = make(engine, model, align=False)  # unaligned, so that b joins out of a's phase
    a = s.submit(GenerationSpec(1, 1, 8, 4, 1.0, seed=1))
    s.tick()  # a: step 0 (encoder due)
    b = s.submit(GenerationSpec(2, 1, 8, 4, 1.0, seed=2))
    rec.calls.clear()
    # The encoder waits until the light network has started on a's row: a scheduler that ran the encoder first and
    # the light network after would leave it waiting until the timeout.
    seen = encoder_waits_for_light_network(engine, monkeypatch)
    s.tick()  # a: step 1 (reuses), b: step 0 (due) -> one encoder call of 1 row, two denoiser calls of 1 row
    monkeypatch.undo()
    assert [ok for ok, _ in seen] == [True], "the encoder call did not overlap the light-network call"
    assert [(c.network, c.rows) for c in rec.calls] == [("denoiser", 1), ("encoder", 1), ("denoiser", 1)]
    run_all(s, [a, b])
    snap = s.snapshot()
    assert snap.encoder_rows_total == 4 and snap.denoiser_rows_total == 16
    assert snap.encoder_reuse_ratio == pytest.approx(0.75)
    assert snap.free_slots == 8


def test_without_overlap_one_light_network_call_follows_the_encoder(engine, model):
    s, rec = make(engine, model, overlap=False, align=False)
    a = s.submit(GenerationSpec(1, 1, 8, 4, 1.0, seed=1))
    s.tick()
    b = s.submit(GenerationSpec(2, 1, 8, 4, 1.0, seed=2))
    rec.calls.clear()
    s.tick()  # b due, a reusing: the encoder first, then one light-network call over both rows
    assert [(c.network, c.rows) for c in rec.calls] == [("encoder", 1), ("denoiser", 2)]
    run_all(s, [a, b])
    assert s.snapshot().encoder_rows_total == 4


def test_no_state_is_kept_per_encoder_interval_after_its_last_image(engine, model):
    """Each distinct K once added a permanent phase-table entry (3,000 distinct K grew the process by ~6 MB)."""
    s, _ = make(engine, model)
    for k in range(2, 12):
        run_all(s, [s.submit(GenerationSpec(1, 1, k, k, 1.0, seed=k))])
    s.tick()  # an idle tick: admission sees no image with any K
    assert s.scheduler.admission.phase == {}


def test_a_streamed_job_gets_every_preview_in_few_hand_overs(engine, model, monkeypatch):
    """Events are handed over at most once per PROGRESS_INTERVAL_S of the clock (and at the last step), each
    hand-over carrying the previews made since the previous one: every preview asked for arrives, in step order."""
    import itertools
    import types

    from service.core import progress

    clock = {"t": 0.0}
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(monotonic=lambda: clock["t"]))
    s, _ = make(engine, model, slots=4)
    handovers: list[tuple[float, list]] = []
    job = s.submit(GenerationSpec(3, 2, 16, 4, 1.5, seed=7), lambda ev: handovers.append((clock["t"], ev)), 2)
    for _ in range(1000):
        if job.future.done():
            break
        s.tick()
        clock["t"] += 0.1  # a tick every 0.1 s: a hand-over every third tick at most
    assert job.future.done()
    times = [t for t, _ in handovers]
    assert times[0] == 0.0  # the first tick's progress comes at once
    assert all(b - a >= progress.PROGRESS_INTERVAL_S - 1e-9 for a, b in itertools.pairwise(times[:-1]))
    assert len(handovers) <= 16 * 0.1 / progress.PROGRESS_INTERVAL_S + 2
    for _, ev in handovers:
        assert ev[-1][0] == "progress" and all(name == "preview" for name, _ in ev[:-1])
    assert handovers[-1][1][-1][1]["step"] == 16 and handovers[-1][1][-1][1]["images_done"] == 2
    previews = [(p["index"], p["step"]) for _, ev in handovers for name, p in ev if name == "preview"]
    assert sorted(previews) == [(i, st) for i in (0, 1) for st in range(2, 16, 2)]
    assert [st for i, st in previews if i == 0] == list(range(2, 16, 2))  # in order
    pictures = [p["image"].picture() for _, ev in handovers for name, p in ev if name == "preview"]
    assert all(pic.shape == (28, 28) and pic.dtype == np.uint8 for pic in pictures)


def test_streamed_jobs_get_their_events_on_the_same_ticks(engine, model, monkeypatch):
    """Every hand-over wakes the event loop: the streams share them (one per interval), whenever each job began."""
    import types

    from service.core import progress

    clock = {"t": 0.0}
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(monotonic=lambda: clock["t"]))
    s, _ = make(engine, model, slots=4)
    got: dict[str, list[float]] = {"a": [], "b": []}
    jobs = [s.submit(GenerationSpec(3, 1, 24, 4, 1.5, seed=1), lambda ev: got["a"].append(clock["t"]), 4)]
    for i in range(200):
        if all(j.future.done() for j in jobs):
            break
        if i == 2:  # the second stream starts between two hand-overs
            jobs.append(s.submit(GenerationSpec(5, 1, 24, 4, 1.5, seed=2), lambda ev: got["b"].append(clock["t"]), 4))
        s.tick()
        clock["t"] += 0.1
    assert all(j.future.done() for j in jobs)
    a = set(got["a"][:-1])  # the last one comes at the job's last step
    both = {t for t in got["b"] if t < got["a"][-1]}  # b's hand-overs while a still ran
    assert len(both) >= 3 and both <= a, (got["a"], got["b"])


def _threads_seen_by_ticks(s: EngineLoop, model) -> list[int]:
    seen: list[int] = []
    run = s.runner.run

    def spy(plan):
        seen.append(torch.get_num_threads())
        return run(plan)

    s.runner.run = spy
    s.start()
    try:
        s.submit(GenerationSpec(1, 1, 4, 2, 1.5, seed=5)).future.result(timeout=60)
    finally:
        s.shutdown(timeout=10)
    return seen


def test_ticks_run_torch_on_one_thread_beside_onnxruntime(engine, model):
    """The tick's own tensor ops are tiny; torch's intra-op pool, used from the scheduler thread, made them slower."""
    before = torch.get_num_threads()
    try:
        s, _ = make(engine, model)
        seen = _threads_seen_by_ticks(s, model)
        assert seen and set(seen) == {1}
    finally:
        torch.set_num_threads(before)  # the setting reaches threads started later: restore it for the other tests


def test_the_torch_backend_on_the_cpu_keeps_its_threads(checkpoint_dir, model):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        e = create_engine(checkpoint_dir, backend="torch", device="cpu", max_batch=16)
        s, _ = make(e, model)
        assert set(_threads_seen_by_ticks(s, model)) == {2}
        e.close()
    finally:
        torch.set_num_threads(before)
