"""Checkpoints at the encoder boundary (issue 39): a job's image sends its sample at an encoder refresh, at most every
`checkpoint_every_s`, and an image resumed from any such checkpoint, in another engine loop and beside other work,
gives the uninterrupted image byte for byte; a resume that is not at a refresh, or of the wrong size, is refused."""

from __future__ import annotations

import pytest

from dualrate.diffusion import CosineSchedule
from service.core import GenerationSpec, LimitError, Priority, SchedulerConfig
from service.core.loop import EngineLoop


def make(engine, model, slots=4):
    return EngineLoop(engine, CosineSchedule(model.cfg.logsnr_min, model.cfg.logsnr_max), model.cfg.null_label,
                      SchedulerConfig(slots, queue_size=32), output_size=model.cfg.output_size)


def run(loop, spec, events=None):
    job = loop.submit(spec, (events.extend if events is not None else None))
    for _ in range(1000):
        if job.future.done():
            return job.future.result()
        loop.tick()
    raise AssertionError("never finished")


def test_an_image_resumed_from_any_checkpoint_is_the_uninterrupted_image(engine, model):
    spec = GenerationSpec(3, 1, 16, 4, 1.5, 1234, priority=Priority.BATCH, checkpoint_every_s=1e-9)
    events: list = []
    ref = run(make(engine, model), spec, events)
    checkpoints = [p for name, p in events if name == "checkpoint"]
    # Every refresh after the first: steps 4, 8, 12 (K = 4), each with the encoder calls made before it.
    assert [(c["step"], c["encoder_calls"]) for c in checkpoints] == [(4, 1), (8, 2), (12, 3)]
    assert all(c["encoder_interval"] == 4 and c["index"] == 0 for c in checkpoints)
    for c in checkpoints:
        loop = make(engine, model)
        other = loop.submit(GenerationSpec(7, 2, 16, 2, 1.5, 99))  # other images share the resumed one's ticks
        resumed = run(loop, GenerationSpec(3, 1, 16, 4, 1.5, 1234, priority=Priority.BATCH, start_step=c["step"],
                                           start_sample=c["sample"], start_encoder_calls=c["encoder_calls"]))
        assert resumed.images[0].tobytes() == ref.images[0].tobytes(), c["step"]
        assert resumed.encoder_calls == ref.encoder_calls == 4
        for _ in range(100):
            if other.future.done():
                break
            loop.tick()


def test_checkpoints_come_at_most_as_often_as_asked(engine, model):
    events: list = []
    run(make(engine, model), GenerationSpec(3, 1, 16, 4, 1.5, 5, checkpoint_every_s=3600.0), events)
    assert not [e for e in events if e[0] == "checkpoint"]  # a short image: none within the hour
    events.clear()
    run(make(engine, model), GenerationSpec(3, 1, 16, 4, 1.5, 5), events)
    assert not [e for e in events if e[0] == "checkpoint"]  # not asked: none


@pytest.mark.parametrize("change, field", [
    ({"start_step": 6}, "start_step"),  # not a refresh at K = 4
    ({"start_step": 16}, "start_step"),  # the last step is no place to resume
    ({"start_sample": b"\0" * 12}, "start_sample"),
    ({"num_images": 2}, "num_images"),
])
def test_a_resume_that_is_not_at_a_refresh_or_of_the_wrong_size_is_refused(engine, model, change, field):
    size = 4 * int(engine.sample_shape[0] * engine.sample_shape[1] * engine.sample_shape[2])
    base = {"label": 3, "num_images": 1, "steps": 16, "encoder_interval": 4, "guidance_scale": 1.5, "seed": 1,
            "start_step": 8, "start_sample": b"\0" * size}
    with pytest.raises(LimitError) as e:
        make(engine, model).submit(GenerationSpec(**{**base, **change}))
    assert field in {f for f, _ in e.value.fields}
