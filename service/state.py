"""What the routes share: the service's state (built in the app's lifespan) and the drain."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from dualrate.config import ModelConfig
from engines import Engine
from service.core.autok import AutoK
from service.core.handle import CoreHandle
from service.core.scheduler import Scheduler
from service.metrics import PrometheusStats
from service.settings import Settings


class AppState:
    """Everything the routes need; built in the lifespan."""

    def __init__(self, settings: Settings, cfg: ModelConfig) -> None:
        self.settings = settings
        self.cfg = cfg  # geometry and labels, from the model card (known before the weights load)
        self.ready = False
        self.starting = "starting"  # what the start-up is doing (GET /health/ready while not ready)
        self.draining = False
        self.engine: Engine | None = None
        self.scheduler: Scheduler | None = None  # in-process core only
        self.core: CoreHandle | None = None  # the engine core, here or in its own process (service.core.handle)
        self.core_dead: str | None = None  # why the engine core process stopped, once it has
        self.on_core_death: Callable[[str], None] | None = None  # set by the server: exit non-zero
        # With the engine core in its own process the front end counts only its own series (service.core.handle).
        self.metrics = PrometheusStats(core=not settings.use_engine_process)
        self.model_card: dict = {}
        self.distilled: tuple[int, int] | None = None  # (steps, K) of a distilled student (dualrate.distill)
        self.defaults: dict = {}
        self.autok: AutoK | None = None  # encoder_interval "auto" (built in the lifespan from the card)
        self.open_streams = 0  # /generate/stream responses still sending


    def core_died(self, why: str) -> None:
        """The engine core process stopped: not live, not ready; the server exits non-zero (on_core_death)."""
        self.core_dead = why
        self.ready = False
        log.error("%s", why)
        if self.on_core_death is not None:
            self.on_core_death(why)


log = logging.getLogger("service")


async def drain(state: AppState, poll_s: float = 0.05) -> None:
    """Stop admission (503) and wait until every accepted request has its answer (streams: their last event)."""
    state.draining = True
    if state.core is None:
        return
    state.core.stop_admission()
    while state.core_dead is None and (not await state.core.idle() or state.open_streams):
        await asyncio.sleep(poll_s)
