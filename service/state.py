"""What the routes share: the service's state (built in the app's lifespan) and the drain."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from dualrate.checkpoint import card_defaults
from export.card import ModelCard
from service.core import CoreHandle, QualityBudget, RequestLimits
from service.metrics import PrometheusStats
from service.settings import Settings

log = logging.getLogger("service")


class AppState:
    """Everything the routes need; built with the app, the core attached in the lifespan."""

    def __init__(self, settings: Settings, spec: ModelCard, card: dict[str, Any], limits: RequestLimits,
                 budget: QualityBudget) -> None:
        self.settings = settings
        self.spec = spec  # geometry, labels and defaults, from the model card (known before the weights load)
        self.model_card = card
        self.sampling = card_defaults({"defaults": vars(spec.defaults)})  # the model card's steps, encoder_interval and guidance_scale
        self.defaults = dict(vars(self.sampling))  # as /v1/model publishes them
        self.limits = limits  # every limit a request is held to (service.core.RequestLimits)
        self.budget = budget  # what encoder_interval "auto" may pick (the model card's sweep and the quality budget)
        self.ready = False
        self.starting = "starting"  # what the start-up is doing (GET /health/ready while not ready)
        self.draining = False
        self.core: CoreHandle | None = None  # the engine core, here or in its own process (service.core.handle)
        self.core_dead: str | None = None  # why the engine core process stopped, once it has
        self.core_killed = False  # a forced drain found the core frozen and stopped it (service.__main__)
        self.on_core_death: Callable[[str], None] | None = None  # set by the server: exit non-zero
        self.metrics = PrometheusStats(settings.policy.value)
        self.open_streams = 0  # /generate/stream responses still sending

    def core_died(self, why: str) -> None:
        """The engine core process stopped: not live, not ready; the server exits non-zero (on_core_death)."""
        self.core_dead = why
        self.ready = False
        log.error("%s", why)
        if self.on_core_death is not None:
            self.on_core_death(why)


async def drain(state: AppState, poll_s: float = 0.05) -> None:
    """Stop admission (503) and wait until every accepted request has its answer (streams: their last event)."""
    state.draining = True
    if state.core is None:
        return
    state.core.stop_admission()
    while state.core_dead is None and (not await state.core.idle() or state.open_streams):
        await asyncio.sleep(poll_s)
