"""The front end <-> engine core contract: every message type survives the codec unchanged, a malformed message is a
ProtocolError (never a half-decoded value), and errors, results and configurations come back as what they were."""

from __future__ import annotations

import numpy as np
import pytest

from engines import Backend, EngineConfig, EngineInfo, Precision
from service.core import (
    Cancelled,
    CoreConfig,
    CoreStats,
    DeadlineExceeded,
    EngineFailure,
    GenerationSpec,
    InternalError,
    JobResult,
    LimitError,
    NotReady,
    Policy,
    Priority,
    QueueFull,
    RequestLimits,
    RunnerConfig,
    SchedulerConfig,
    SchedulerSnapshot,
)
from service.core import protocol as p
from service.core.stats import NetworkCall, RequestDone, TickStats


def status() -> p.CoreStatus:
    stats = CoreStats()
    stats.network_call(NetworkCall("encoder", 6, 0.004))
    stats.network_call(NetworkCall("denoiser", 12, None))
    stats.tick(TickStats(6, 6, 12, 0.02))
    stats.request_done(RequestDone("ok", 2, 0.1, 0.9, "batch"))
    return p.CoreStatus(ready=True, engine=EngineInfo(Backend.ONNXRUNTIME, "cpu", Precision.FP32, ("CPU",), 32),
                        idle=False, snapshot=SchedulerSnapshot(2, 3, 4, 4, 10, 40, {"interactive": 1, "batch": 1}, 1, 2),
                        metrics=stats.metrics())


IMAGE = p.WireImage.of(np.arange(28 * 28 * 3, dtype=np.uint8).reshape(28, 28, 3))
SPEC = GenerationSpec(3, 2, 16, 4, 1.5, 42, deadline=123.5, auto=True, priority=Priority.BATCH)
MESSAGES: list[p.ToCore | p.ToFront] = [
    p.Submit(1, SPEC, preview_every=4, stream=True),
    p.Cancel(1),
    p.Status(7),
    p.StopAdmission(),
    p.Abort(p.WireError.of(NotReady("the drain timed out"))),
    p.Shutdown(),
    p.Accepted(1, 3),
    p.Refused(2, p.WireError.of(QueueFull(4.0))),
    p.Events(1, [p.WireEvent("progress", {"step": 4, "of": 16, "images_done": 0, "num_images": 2,
                                          "encoder_calls": 1}),
                 p.WireEvent("preview", {"index": 1, "step": 3}, IMAGE)]),
    p.Result(1, p.WireResult([IMAGE, IMAGE], [42, 43], 4, 16, 0.25, 1.5, 4)),
    p.Failed(3, p.WireError.of(EngineFailure("abc123def456", "engine failure (error id abc123def456)"))),
    p.StatusReply(7, status()),
    p.StatusReply(8, p.CoreStatus(ready=False, starting="warming up the networks")),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_type_round_trips(msg):
    decode = p.decode_to_core if isinstance(msg, p.ToCore) else p.decode_to_front
    back = decode(p.encode(msg))
    assert type(back) is type(msg) and back == msg


def test_the_two_directions_cover_every_message_and_refuse_each_other():
    to_core = {type(m) for m in MESSAGES if isinstance(m, p.ToCore)}
    to_front = {type(m) for m in MESSAGES if isinstance(m, p.ToFront)}
    assert to_core == set(p.ToCore.__args__) and to_front == set(p.ToFront.__args__)
    with pytest.raises(p.ProtocolError):
        p.decode_to_front(p.encode(p.Shutdown()))  # a core-bound message is not one the front end takes
    with pytest.raises(p.ProtocolError):
        p.decode_to_core(p.encode(p.Accepted(1, 0)))


@pytest.mark.parametrize("raw", [
    b"",  # nothing
    b"\xc1",  # not msgpack
    p.encode(p.Cancel(1))[:-1],  # cut short
    b"\x92\xa6submit\x01",  # a known tag with fields missing
    b"\x92\xa6cancel\xa3one",  # a field of the wrong type
    b"\x92\xa5hello\x01",  # an unknown tag
    b"\x93\xa6submit\x01\x01",  # a positional list of the old kind
], ids=["empty", "not-msgpack", "truncated", "missing-fields", "wrong-type", "unknown-tag", "old-positional"])
def test_a_malformed_message_is_a_protocol_error(raw):
    with pytest.raises(p.ProtocolError):
        p.decode_to_core(raw)


def test_errors_cross_as_the_same_classes_with_their_fields():
    cases = [QueueFull(7.5), NotReady("draining"), DeadlineExceeded("late"), Cancelled("gone"),
             EngineFailure("e1", "engine failure (error id e1)"), InternalError("e2"),
             LimitError([("steps", "must be <= 8"), ("num_images", "must be <= 2")])]
    for err in cases:
        back = p.decode_to_front(p.encode(p.Failed(1, p.WireError.of(err)))).error.error()  # type: ignore[union-attr]
        assert type(back) is type(err) and str(back) == str(err)
        for field in ("retry_after_s", "error_id", "fields"):
            assert getattr(back, field, None) == getattr(err, field, None)
    assert isinstance(p.WireError.of(RuntimeError("boom")).error(), InternalError)  # never leaks a foreign error


def test_a_result_keeps_its_pictures_bit_for_bit():
    gray = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    rgb = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    r = JobResult([gray, rgb], [5, 6], 2, 8, 0.1, 0.2, 4)
    back = p.decode_to_front(p.encode(p.Result(9, p.WireResult.of(r)))).result.result()  # type: ignore[union-attr]
    assert [im.shape for im in back.images] == [(28, 28), (16, 16, 3)]
    assert all(np.array_equal(a, b) for a, b in zip(back.images, r.images, strict=True))
    assert (back.seeds, back.encoder_calls, back.encoder_interval) == ([5, 6], 2, 4)


def test_the_core_configuration_round_trips_as_json():
    config = CoreConfig("checkpoints/mnist-dualrate",
                        EngineConfig(Backend.TORCH, "cuda:0", 64, Precision.BF16, compile=True, buckets=(8, 16)),
                        SchedulerConfig(32, 64, Policy.REQUEST, reserved_slots=4, small_cost=8.0),
                        RunnerConfig(overlap_encoder=False, fused=True),
                        RequestLimits(10, 16, 256, 120.0, distilled=(8, 2), auto_ks=(1, 2, 4)), warmup=False)
    back = CoreConfig.from_json(config.to_json())
    assert back == config and back.engine.backend is Backend.TORCH and back.scheduler.policy is Policy.REQUEST
    with pytest.raises(p.ProtocolError, match="engine core configuration"):
        CoreConfig.from_json('{"checkpoint": 3}')
