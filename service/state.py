"""What the routes share: the service's state (built in the app's lifespan) and the drain."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dualrate.checkpoint import card_defaults
from export.card import ModelCard
from service.core import CoreConfig, CoreHandle, QualityBudget, UnknownModel
from service.metrics import PrometheusStats
from service.settings import Settings

if TYPE_CHECKING:
    from service.jobs.store import JobStore
    from service.jobs.worker import JobWorker

log = logging.getLogger("service")


class ModelEntry:
    """One served model: its card and contract, its limits, and its engine core (attached in the lifespan)."""

    def __init__(self, name: str, folder: Path, spec: ModelCard, card: dict[str, Any], core_config: CoreConfig,
                 budget: QualityBudget) -> None:
        self.name, self.folder = name, folder
        self.spec = spec  # geometry, labels and defaults, from the model card (known before the weights load)
        self.model_card = card
        self.sampling = card_defaults({"defaults": vars(spec.defaults)})  # the card's steps, K and guidance
        self.defaults = dict(vars(self.sampling))  # as /v1/model publishes them
        self.core_config = core_config
        self.limits = core_config.limits  # every limit a request is held to (service.core.RequestLimits)
        self.budget = budget  # what encoder_interval "auto" may pick (the model card's sweep and the quality budget)
        self.core: CoreHandle | None = None  # its engine core, here or in its own process (service.core.handle)


class AppState:
    """Everything the routes need; built with the app, the cores attached in the lifespan. `default` is the default
    model's entry (the first served)."""

    def __init__(self, settings: Settings, models: list[ModelEntry]) -> None:
        self.settings = settings
        self.models = {m.name: m for m in models}
        self.default = models[0]
        self.ready = False
        self.starting = "starting"  # what the start-up is doing (GET /health/ready while not ready)
        self.draining = False
        self.core_dead: str | None = None  # why the engine core process stopped, once it has
        self.core_killed = False  # a drain found the core frozen and stopped it (service.__main__, service.app)
        self.on_core_death: Callable[[str], None] | None = None  # set by the server: exit non-zero
        self.metrics = PrometheusStats(settings.policy.value)
        self.open_streams = 0  # /generate/stream responses still sending
        self.jobs: JobStore | None = None  # the durable job store (/v1/jobs), None while starting or with jobs off
        self.job_worker: JobWorker | None = None  # claims and runs jobs on this replica

    @property
    def cores(self) -> list[tuple[str, CoreHandle]]:
        """(model, engine core) of every served model whose core is attached."""
        return [(m.name, m.core) for m in self.models.values() if m.core is not None]

    def frozen(self) -> str | None:
        """Why a served model's core is frozen (named when several are served), or None."""
        for name, core in self.cores:
            if (why := core.frozen) is not None:
                return f"model {name}: {why}" if len(self.models) > 1 else why
        return None

    def model(self, name: str | None) -> ModelEntry:
        """The served model a request names (the only one when it names none and one is served)."""
        if name is None and len(self.models) == 1:
            return self.default
        if name not in self.models:
            raise UnknownModel(name, list(self.models))
        return self.models[name]

    def model_label(self, name: str | None) -> str:
        """The `model` label of a request's series: the served model it names (or the only one), else ""."""
        if name is None and len(self.models) == 1:
            return self.default.name
        return name if name in self.models else ""

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
    if state.job_worker is not None:  # running jobs go back to the store, for another replica or this one's restart
        try:
            await state.job_worker.release()
        except Exception:
            log.exception("jobs: handing the running jobs back failed (their leases lapse instead)")
    cores = [core for _, core in state.cores]
    if not cores:
        return
    for core in cores:
        core.stop_admission()

    async def idle() -> bool:
        return all([await core.idle() for core in cores])

    while state.core_dead is None and (not await idle() or state.open_streams):
        await asyncio.sleep(poll_s)


async def drain_or_stop_cores(state: AppState, seconds: float, why: str) -> None:
    """drain(), for at most `seconds`: a core that has not answered by then is frozen: each core is stopped (its
    open requests answered 503 here), `state.core_killed` is set (the exit is non-zero), and `why` is logged."""
    try:
        async with asyncio.timeout(seconds):
            await drain(state)
    except TimeoutError:
        log.error("%s: stopping it and answering what is left 503", why)
        for _, core in state.cores:
            core.kill(why)
        state.core_killed = True
