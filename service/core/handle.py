"""What the HTTP front end sees of the engine core (scheduler + runner + device), wherever the core runs.

`LocalCore` runs an `EngineLoop` in this process (the CPU default); `service.core.client.RemoteCore` talks to the core
in its own process (`service.core.engine_core`) over ZeroMQ with the messages of `service.core.protocol`. Both have the
same awaitable interface (`CoreHandle`), so the routes, the drain and /metrics do not know which one they have.
`build_core` builds the engine and the loop from a `CoreConfig`, in whichever process owns the device.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Protocol

from engines import Engine, EngineConfig, EngineInfo
from service.core.errors import NotReady, ServiceError
from service.core.loop import EngineLoop
from service.core.progress import Listener
from service.core.protocol import CoreConfig, CoreStatus
from service.core.request import GenerationSpec, Job
from service.core.stats import CoreStats

EngineFactory = Callable[[Path, EngineConfig], Engine]


class JobHandle(Protocol):
    future: Future  # resolved with a JobResult or a ServiceError (from any thread)
    queue_position: int

    def cancel(self) -> None: ...


class CoreHandle(Protocol):
    engine_info: EngineInfo

    @property
    def frozen(self) -> str | None:
        """Why the core counts as frozen (no heartbeat, or work and no tick, for the heartbeat timeout); None if not."""
        ...

    async def responsive(self, timeout: float) -> bool:
        """Does the core answer (and tick) now? Asked at a request's deadline: 503 if not, 504 if it does."""
        ...

    def kill(self, why: str) -> None:
        """The core did not answer a forced drain: stop it for good and answer every open request 503."""
        ...

    async def submit(self, spec: GenerationSpec, listener: Listener | None = None, preview_every: int = 0) -> JobHandle:
        """Queue a request; raises QueueFull / NotReady at once when it cannot be queued."""
        ...

    async def status(self) -> CoreStatus:
        """The core's state, its scheduler's snapshot and its metrics."""
        ...

    async def idle(self) -> bool: ...

    def stop_admission(self) -> None: ...

    def abort(self, err: ServiceError) -> None: ...


class LocalCore:
    """The engine loop in this process."""

    def __init__(self, loop: EngineLoop, engine_info: EngineInfo, stats: CoreStats,
                 heartbeat_timeout_s: float = 5.0) -> None:
        self.loop, self.engine_info, self.stats = loop, engine_info, stats
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._jobs: weakref.WeakSet[Job] = weakref.WeakSet()  # open jobs, for kill()

    @property
    def frozen(self) -> str | None:
        stalled = self.loop.stalled_for()
        if stalled > self.heartbeat_timeout_s:
            return f"the engine core has completed no tick for {stalled:.0f} s (DUALRATE_CORE_HEARTBEAT_TIMEOUT_S)"
        return None

    async def responsive(self, timeout: float) -> bool:
        return self.frozen is None

    def kill(self, why: str) -> None:
        err = NotReady(why)
        for job in list(self._jobs):
            if not job.future.done():
                job.future.set_exception(err)

    async def submit(self, spec: GenerationSpec, listener: Listener | None = None, preview_every: int = 0) -> JobHandle:
        job = self.loop.submit(spec, listener, preview_every)
        self._jobs.add(job)
        return job

    async def status(self) -> CoreStatus:
        return CoreStatus(ready=True, engine=self.engine_info, idle=self.loop.idle(), snapshot=self.loop.snapshot(),
                          metrics=self.stats.metrics(), stalled_s=self.loop.stalled_for())

    async def idle(self) -> bool:
        return self.loop.idle()

    def stop_admission(self) -> None:
        self.loop.stop_admission()

    def abort(self, err: ServiceError) -> None:
        self.loop.abort(err)


class Built:
    """What `build_core` made: the warmed engine and the started engine loop."""

    def __init__(self, engine: Engine, loop: EngineLoop) -> None:
        self.engine, self.loop = engine, loop


def build_core(config: CoreConfig, stats: CoreStats, engine_factory: EngineFactory | None = None,
               progress: Callable[[str], None] | None = None) -> Built:
    """Build and warm the engine from the checkpoint (compiling where configured; `progress(line)` hears each
    stage), start the engine loop. Runs in whichever process owns the device; only the engine loads the weights."""
    from dualrate.checkpoint import read_card
    from engines import create_engine
    from export.card import model_spec
    from service.core.autok import AutoK, CostModel, QualityBudget

    checkpoint = Path(config.checkpoint)
    card = read_card(checkpoint)
    spec = model_spec(card)
    defaults = spec.defaults
    engine = (engine_factory or create_engine)(checkpoint, config.engine)
    if config.warmup:
        if progress is not None:
            progress("warming up the networks")
        engine.warmup((1, 2 * config.scheduler.max_active_images),
                      (lambda line: progress(f"compiling the networks: {line}")) if progress is not None else None)
    autok = AutoK(QualityBudget.from_card(card, config.quality_budget, defaults.encoder_interval),
                  config.latency_target_s, cost=CostModel(slots=config.scheduler.max_active_images))
    loop = EngineLoop(engine, spec.schedule(), spec.null_label, config.scheduler, stats, output_size=spec.output_hw,
                      autok=autok, runner=config.runner, limits=config.limits, prediction=spec.diffusion.prediction)
    loop.start()
    return Built(engine, loop)
