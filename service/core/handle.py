"""What the HTTP front end sees of the engine core (scheduler + runner + device), wherever the core runs.

`LocalCore` wraps a `Scheduler` in this process (the CPU default); `service.core.client.RemoteCore` talks to the
core in its own process (`service.core.engine_core`) over ZeroMQ + msgpack. Both have the same awaitable interface, so
the routes, the drain and /metrics do not know which one they have. Errors cross the process boundary as
(kind, message, fields) and become the same `ServiceError` classes again (`error_to_wire` / `error_from_wire`).
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Protocol

from engines import EngineInfo
from service.core.progress import Listener
from service.core.scheduler import GenerationSpec, Scheduler
from service.core.stats import SchedulerSnapshot
from service.errors import Cancelled, DeadlineExceeded, EngineFailure, InternalError, NotReady, QueueFull, ServiceError


class JobHandle(Protocol):
    future: Future  # resolved with a JobResult or a ServiceError (from any thread)
    queue_position: int

    def cancel(self) -> None: ...


class CoreHandle(Protocol):
    engine_info: EngineInfo

    async def submit(self, spec: GenerationSpec, listener: Listener | None = None, preview_every: int = 0) -> JobHandle:
        """Queue a request; raises QueueFull / NotReady at once when it cannot be queued."""
        ...

    async def snapshot(self) -> SchedulerSnapshot: ...

    async def idle(self) -> bool: ...

    def stop_admission(self) -> None: ...

    def abort(self, err: ServiceError) -> None: ...

    async def metrics_text(self) -> bytes:
        """The core's own Prometheus series (b"" when they are in the front end's registry already)."""
        ...


class LocalCore:
    """The scheduler in this process."""

    def __init__(self, scheduler: Scheduler, engine_info: EngineInfo, refresh: Any = None) -> None:
        self.scheduler, self.engine_info, self._refresh = scheduler, engine_info, refresh

    async def submit(self, spec: GenerationSpec, listener: Listener | None = None, preview_every: int = 0) -> JobHandle:
        return self.scheduler.submit(spec, listener, preview_every)

    async def snapshot(self) -> SchedulerSnapshot:
        return self.scheduler.snapshot()

    async def idle(self) -> bool:
        return self.scheduler.idle()

    def stop_admission(self) -> None:
        self.scheduler.stop_admission()

    def abort(self, err: ServiceError) -> None:
        self.scheduler.abort(err)

    async def metrics_text(self) -> bytes:
        if self._refresh is not None:
            self._refresh(self.scheduler.snapshot())  # the gauges, into the one shared registry
        return b""


def error_to_wire(e: BaseException) -> dict[str, Any]:
    if not isinstance(e, ServiceError):
        e = InternalError("core")
    wire: dict[str, Any] = {"kind": e.kind, "message": str(e)}
    for field in ("retry_after_s", "error_id"):
        if hasattr(e, field):
            wire[field] = getattr(e, field)
    return wire


def error_from_wire(w: dict[str, Any]) -> ServiceError:
    kind, msg = w.get("kind"), str(w.get("message", ""))
    if kind == QueueFull.kind:
        return QueueFull(float(w.get("retry_after_s", 1.0)))
    if kind == EngineFailure.kind:
        return EngineFailure(str(w.get("error_id", "")), msg)
    if kind == InternalError.kind:
        return InternalError(str(w.get("error_id", "core")))
    plain: dict[str, type[ServiceError]] = {NotReady.kind: NotReady, DeadlineExceeded.kind: DeadlineExceeded,
                                            Cancelled.kind: Cancelled}
    cls = plain.get(str(kind))
    return cls(msg) if cls is not None else InternalError("core")




class Built:
    """What `build_core` made: the warmed engine and the started scheduler."""

    def __init__(self, engine: Any, scheduler: Scheduler) -> None:
        self.engine, self.scheduler = engine, scheduler


def build_core(settings: Any, stats: Any, engine_factory: Any = None, progress: Any = None) -> Built:
    """Build and warm the engine from the checkpoint (compiling where configured; `progress(line)` hears each
    stage), start the scheduler. Runs in whichever process owns the device; only the engine loads the weights."""
    from dualrate.checkpoint import card_defaults, read_card
    from dualrate.config import ModelConfig
    from dualrate.diffusion import CosineSchedule
    from engines import create_engine
    from service.core.autok import AutoK, QualityBudget

    card = read_card(settings.checkpoint)
    cfg, defaults = ModelConfig.from_dict(card["config"]), card_defaults(card)
    engine = (engine_factory or create_engine)(settings.checkpoint, settings.engine_config())
    if settings.warmup:
        if progress is not None:
            progress("warming up the networks")
        engine.warmup((1, 2 * settings.max_active_images),
                      (lambda line: progress(f"compiling the networks: {line}")) if progress is not None else None)
    autok = AutoK(QualityBudget.from_card(card, settings.quality_budget, defaults.encoder_interval),
                  settings.latency_target_s)
    scheduler = Scheduler(engine, CosineSchedule(cfg.logsnr_min, cfg.logsnr_max), cfg.null_label,
                          settings.scheduler_config(defaults), stats, output_size=cfg.output_size, autok=autok)
    scheduler.start()
    return Built(engine, scheduler)
