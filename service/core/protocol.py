"""Every message between the HTTP front end and the engine core, as typed values with one codec (msgspec, msgpack).

Front end -> core (`ToCore`): `Submit`, `Cancel`, `Status`, `StopAdmission`, `Abort`, `Shutdown`.
Core -> front end (`ToFront`): `Accepted`, `Refused`, `Events`, `Result`, `Failed`, `StatusReply`.

Each is a tagged struct (array-like on the wire: its tag, then its fields in order), decoded into its own type or
refused with `ProtocolError`; no positional lists or bare strings are compared on either side. `CoreConfig` is the
core's whole configuration (the front end resolves the settings into it and hands it to the core process in
DUALRATE_CORE_CONFIG). Errors cross as `WireError` and become the same `ServiceError` classes again; images as raw
uint8 bytes with their shape (the front end encodes the PNGs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from engines import EngineConfig, EngineInfo
from service.core.errors import Cancelled, DeadlineExceeded, EngineFailure, InternalError, LimitError, NotReady, QueueFull, ServiceError
from service.core.request import GenerationSpec, JobResult, RequestLimits
from service.core.runner import RunnerConfig
from service.core.scheduler import SchedulerConfig
from service.core.stats import CoreMetrics, SchedulerSnapshot

CORE_CONFIG_ENV = "DUALRATE_CORE_CONFIG"  # the core process reads its CoreConfig (JSON) from here


class ProtocolError(ValueError):
    """A message that is not one of this protocol's (malformed, unknown tag, wrong field types)."""


@dataclass(frozen=True)
class CoreConfig:
    """Everything the engine core is built with, resolved by the front end from its settings (service.settings)."""

    checkpoint: str
    engine: EngineConfig
    scheduler: SchedulerConfig
    runner: RunnerConfig
    limits: RequestLimits
    quality_budget: float = 1.15
    latency_target_s: float = 2.0
    warmup: bool = True
    log_level: str = "info"
    log_format: str = "text"  # text | json (service.core.telemetry.setup_logging)

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()

    @classmethod
    def from_json(cls, text: str | bytes) -> CoreConfig:
        try:
            return msgspec.json.decode(text, type=cls)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise ProtocolError(f"invalid engine core configuration: {e}") from e


# ---- values inside messages ----------------------------------------------------------------------------------------


class WireImage(msgspec.Struct, array_like=True, frozen=True):
    data: bytes
    shape: tuple[int, ...]

    @classmethod
    def of(cls, img: np.ndarray) -> WireImage:
        return cls(np.ascontiguousarray(img, dtype=np.uint8).tobytes(), tuple(img.shape))

    def array(self) -> np.ndarray:
        return np.frombuffer(self.data, dtype=np.uint8).reshape(self.shape)


class WireError(msgspec.Struct, array_like=True, frozen=True):
    kind: str
    message: str
    retry_after_s: float | None = None
    error_id: str | None = None
    fields: list[tuple[str, str]] | None = None  # a LimitError's (field, what is wrong)

    @classmethod
    def of(cls, e: BaseException) -> WireError:
        if not isinstance(e, ServiceError):
            e = InternalError("core")
        return cls(str(e.kind), str(e), getattr(e, "retry_after_s", None), getattr(e, "error_id", None),
                   getattr(e, "fields", None))

    def error(self) -> ServiceError:
        if self.kind == LimitError.kind:
            return LimitError(self.fields or [("request", self.message)])
        if self.kind == QueueFull.kind:
            return QueueFull(self.retry_after_s if self.retry_after_s is not None else 1.0, self.message)
        if self.kind == EngineFailure.kind:
            return EngineFailure(self.error_id or "", self.message)
        if self.kind == InternalError.kind:
            return InternalError(self.error_id or "core")
        plain: dict[str, type[ServiceError]] = {NotReady.kind: NotReady, DeadlineExceeded.kind: DeadlineExceeded,
                                                Cancelled.kind: Cancelled}
        cls = plain.get(self.kind)
        return cls(self.message) if cls is not None else InternalError("core")


class WireEvent(msgspec.Struct, array_like=True, frozen=True):
    """A stream event (service.core.progress.Event): a preview's picture travels as `image`, not in the payload."""

    name: str
    payload: dict[str, Any]
    image: WireImage | None = None


class WireResult(msgspec.Struct, array_like=True, frozen=True):
    images: list[WireImage]
    seeds: list[int]
    encoder_calls: int
    denoiser_calls: int
    queue_seconds: float
    compute_seconds: float
    encoder_interval: int

    @classmethod
    def of(cls, r: JobResult) -> WireResult:
        return cls([WireImage.of(im) for im in r.images], list(r.seeds), r.encoder_calls, r.denoiser_calls,
                   r.queue_seconds, r.compute_seconds, r.encoder_interval)

    def result(self) -> JobResult:
        return JobResult([w.array() for w in self.images], list(self.seeds), self.encoder_calls, self.denoiser_calls,
                         self.queue_seconds, self.compute_seconds, self.encoder_interval)


class CoreStatus(msgspec.Struct, frozen=True):
    """The core's state: starting (what it is doing), failed (why), or ready with its engine, its scheduler's
    snapshot and its metrics."""

    ready: bool
    starting: str = ""
    failed: str | None = None
    engine: EngineInfo | None = None
    idle: bool = True
    snapshot: SchedulerSnapshot | None = None
    metrics: CoreMetrics | None = None
    stalled_s: float = 0.0  # seconds the engine loop has had work and completed no tick (0 when it is idle)


# ---- front end -> core -------------------------------------------------------------------------------------------


class Submit(msgspec.Struct, tag="submit", array_like=True, frozen=True):
    jid: int
    spec: GenerationSpec
    preview_every: int = 0
    stream: bool = False


class Cancel(msgspec.Struct, tag="cancel", array_like=True, frozen=True):
    jid: int


class Status(msgspec.Struct, tag="status", array_like=True, frozen=True):
    rid: int


class StopAdmission(msgspec.Struct, tag="stop_admission", array_like=True, frozen=True):
    pass


class Abort(msgspec.Struct, tag="abort", array_like=True, frozen=True):
    error: WireError


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True, frozen=True):
    pass


ToCore = Submit | Cancel | Status | StopAdmission | Abort | Shutdown


# ---- core -> front end -------------------------------------------------------------------------------------------


class Accepted(msgspec.Struct, tag="accepted", array_like=True, frozen=True):
    jid: int
    queue_position: int


class Refused(msgspec.Struct, tag="refused", array_like=True, frozen=True):
    jid: int
    error: WireError


class Events(msgspec.Struct, tag="events", array_like=True, frozen=True):
    jid: int
    events: list[WireEvent]


class Result(msgspec.Struct, tag="result", array_like=True, frozen=True):
    jid: int
    result: WireResult


class Failed(msgspec.Struct, tag="failed", array_like=True, frozen=True):
    jid: int
    error: WireError


class StatusReply(msgspec.Struct, tag="status_reply", array_like=True, frozen=True):
    rid: int
    status: CoreStatus


ToFront = Accepted | Refused | Events | Result | Failed | StatusReply

_encoder = msgspec.msgpack.Encoder()
_to_core = msgspec.msgpack.Decoder(ToCore)  # type: ignore[arg-type]
_to_front = msgspec.msgpack.Decoder(ToFront)  # type: ignore[arg-type]


def encode(msg: ToCore | ToFront) -> bytes:
    return _encoder.encode(msg)


def decode_to_core(raw: bytes) -> ToCore:
    try:
        return _to_core.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ProtocolError(f"not a message to the engine core: {e}") from e


def decode_to_front(raw: bytes) -> ToFront:
    try:
        return _to_front.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ProtocolError(f"not a message from the engine core: {e}") from e
