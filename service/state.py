"""What the routes share: the service's state (built in the app's lifespan) and the drain."""

from __future__ import annotations

import asyncio

from dualrate.config import ModelConfig
from engines import Engine
from service.autok import AutoK
from service.metrics import PrometheusStats
from service.scheduler import Scheduler
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
        self.scheduler: Scheduler | None = None
        self.metrics = PrometheusStats()
        self.model_card: dict = {}
        self.defaults: dict = {}
        self.autok: AutoK | None = None  # encoder_interval "auto" (built in the lifespan from the card)
        self.open_streams = 0  # /generate/stream responses still sending


async def drain(state: AppState, poll_s: float = 0.05) -> None:
    """Stop admission (503) and wait until every accepted request has its answer (streams: their last event)."""
    state.draining = True
    if state.scheduler is None:
        return
    state.scheduler.stop_admission()
    while not state.scheduler.idle() or state.open_streams:
        await asyncio.sleep(poll_s)
