"""The runner on the shared real ONNX Runtime engine, one plan at a time: what it writes into the slots' state, what
it reads back, and the order of the two within a tick (a slot paused and reused in one plan)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dualrate.data import to_uint8
from dualrate.diffusion import CosineSchedule, step_times
from dualrate.sampler import draw_noise
from service.core import RunnerConfig
from service.core.runner import Runner, TickPlan


@pytest.fixture(scope="module")
def runner(engine, model):
    return Runner(engine, CosineSchedule(model.cfg.logsnr_min, model.cfg.logsnr_max), model.cfg.null_label, 4,
                  RunnerConfig(), model.cfg.output_size)


def plan_for(slots, steps, seeds, n_steps=8, label=3, guidance=1.5, preview=(), **extra) -> TickPlan:
    times = step_times(n_steps).float().tolist()
    k = len(slots)
    return TickPlan(slots=tuple(slots), seeds=tuple(seeds), steps=tuple(steps), labels=(label,) * k,
                    guidance=(guidance,) * k, guided=(guidance != 1.0,) * k, t=tuple(times[s] for s in steps),
                    s=tuple(times[s + 1] for s in steps), tau=tuple(times[s] for s in steps), due=(True,) * k,
                    last=tuple(s + 1 == n_steps for s in steps), preview=preview, **extra)


def test_an_admitted_slot_starts_from_noise_draw_zero(runner, model):
    out = runner.run(plan_for([], [], [], admitted=((2, 77),)))
    assert not out.finished and not out.previews and out.denoiser_rows == 0
    assert torch.equal(runner.z[2], draw_noise([77], [0], model.cfg.sample_shape)[0])


def test_a_paused_slot_is_read_before_the_same_plan_reuses_it(runner, model):
    runner.run(plan_for([], [], [], admitted=((1, 5),)))
    before = runner.z[1].clone()
    out = runner.run(plan_for([1], [0], [9], admitted=((1, 9),), paused=(1,)))
    assert np.array_equal(out.paused[1], before.numpy())  # the old image's sample, not the new one's noise
    resumed = runner.run(plan_for([], [], [], resumed=((3, out.paused[1]),)))
    assert not resumed.paused and torch.equal(runner.z[3], before)


def test_the_last_step_returns_the_delivered_picture_and_previews_only_when_asked(runner, model):
    runner.run(plan_for([], [], [], admitted=((0, 11),)))
    plain = runner.run(plan_for([0], [6], [11]))
    assert not plain.finished and not plain.previews and plain.encoder_rows == 2 and plain.denoiser_rows == 2
    asked = runner.run(plan_for([0], [7], [11], preview=(True,)))
    assert list(asked.finished) == [0] and asked.finished[0].dtype == np.uint8
    assert np.array_equal(asked.finished[0], to_uint8(runner.z[0:1], model.cfg.output_size)[0])
    assert asked.previews[0].picture().shape == asked.finished[0].shape


def test_the_fused_tick_is_refused_by_a_backend_without_the_capability(engine, model):
    with pytest.raises(ValueError, match="fused_tick capability"):
        Runner(engine, CosineSchedule(model.cfg.logsnr_min, model.cfg.logsnr_max), model.cfg.null_label, 4,
               RunnerConfig(fused=True))
