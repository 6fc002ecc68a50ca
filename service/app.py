"""Assembles the service (the fastapi full-stack template's `main.py`): settings and state, the lifespan (load the
engine, warm up, start the scheduler; drain on shutdown), middleware, the routes per resource (`service.api`), the
error handlers (`service.api.answers`: the one place a service error becomes an HTTP answer), offline API docs."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from prometheus_client import disable_created_metrics
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dualrate.checkpoint import load_checkpoint, read_card
from dualrate.config import ModelConfig
from engines import Engine, EngineConfig, create_engine
from service.api import api_router
from service.api.answers import install_error_handlers
from service.api.routes.pages import mount_static
from service.autok import AutoK, QualityBudget
from service.core import LocalCore, build_core
from service.core_client import SHARED_CORE_ENV, RemoteCore, spawn_core
from service.settings import Settings
from service.state import AppState, drain

__all__ = ["AppState", "create_app", "drain"]

log = logging.getLogger("service")
disable_created_metrics()  # no *_created series: they clutter the dashboard queries


def create_app(settings: Settings | None = None,
               engine_factory: Callable[[Path, EngineConfig], Engine] = create_engine) -> FastAPI:
    """`engine_factory(checkpoint, engine config)` builds the engine: `engines.create_engine`, or a wrapper around it
    (a failing engine double in the failure tests)."""
    settings = settings or Settings()
    cfg = ModelConfig.from_dict(read_card(settings.checkpoint)["config"])  # geometry and labels, before the weights
    state = AppState(settings, cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model = await asyncio.to_thread(load_checkpoint, settings.checkpoint)
        state.model_card = model.card
        state.defaults = {"steps": model.defaults.steps, "encoder_interval": model.defaults.encoder_interval,
                          "guidance_scale": model.defaults.guidance_scale}
        budget = QualityBudget.from_card(model.card, settings.quality_budget, model.defaults.encoder_interval)
        state.autok = AutoK(budget, settings.latency_target_s)  # the front end's copy: the limits of "auto"
        remote: RemoteCore | None = None
        built = None
        shared = os.environ.get(SHARED_CORE_ENV)  # a front-end worker of several: the supervisor's core
        if shared:
            remote = RemoteCore(None, shared)
            remote.on_death = state.core_died
            remote.start()
            state.core = remote
            await remote.wait_ready(lambda line: setattr(state, "starting", line))
        elif settings.use_engine_process:
            remote = RemoteCore(*spawn_core())
            remote.on_death = state.core_died
            remote.start()
            state.core = remote

            def progress(line: str) -> None:
                state.starting = line

            await remote.wait_ready(progress)
        else:
            def progress_threadsafe(line: str) -> None:
                state.starting = line

            built = await asyncio.to_thread(build_core, settings, state.metrics, engine_factory, progress_threadsafe)
            state.engine, state.scheduler = built.engine, built.scheduler
            state.core = LocalCore(built.scheduler, built.engine.info, state.metrics.refresh)
            state.metrics.set_engine(built.engine.info, settings.policy.value)
        info = state.core.engine_info
        state.ready = True
        log.info("ready: backend=%s device=%s precision=%s policy=%s slots=%d queue=%d engine core %s",
                 info.backend, info.device, info.precision, settings.policy, settings.max_active_images,
                 settings.queue_size, "in this process" if remote is None else
                 f"in its own process (pid {remote.proc.pid})" if remote.proc is not None else
                 f"shared by the front-end workers at {remote.address}")
        try:
            yield
        finally:
            state.ready = False
            if remote is not None and remote.dead is None:
                await drain(state)
                code = await remote.close()
                log.info("engine core exited with %s", code)
            elif built is not None:
                await drain(state)
                built.scheduler.shutdown(timeout=30)
                built.engine.close()
            log.info("stopped")

    # FastAPIOffline: /docs and /redoc load Swagger UI and ReDoc from the service itself (fastapi-offline ships them),
    # so the API docs work without internet access.
    app = FastAPIOffline(
        title="Dual-Rate Diffusion service",
        version="0.1.0",
        description="Images from a Dual-Rate Diffusion model: a heavy context encoder every K-th step, a light "
        "denoiser every step, batched at the step level. A demo page is at `/`.",
        lifespan=lifespan,
        static_url="/static-docs",
    )
    app.state.dualrate = state
    _integer_limits_in_openapi(app, {"class_label": cfg.num_classes - 1})
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    install_error_handlers(app)
    app.include_router(api_router)
    mount_static(app)
    return app


def _integer_limits_in_openapi(app: FastAPI, maxima: dict[str, int]) -> None:
    """FastAPI's OpenAPI model stores minimum/maximum as floats (2**53 - 1 came out as 9007199254740991.0 and 2**62
    as 4.611686018427388e+18); give integer fields integer limits so a schema-driven client sends valid values.
    `maxima`: request fields whose maximum depends on the model (class_label < num_classes)."""
    build = app.openapi

    def fix(node: object) -> None:
        if isinstance(node, dict):
            if node.get("type") == "integer":
                for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                    if isinstance(node.get(key), float) and node[key].is_integer():
                        node[key] = int(node[key])
            for v in node.values():
                fix(v)
        elif isinstance(node, list):
            for v in node:
                fix(v)

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for model in ("GenerateRequest", "StreamRequest"):
                props = schema["components"]["schemas"][model]["properties"]
                for name, maximum in maxima.items():
                    for variant in props[name].get("anyOf", [props[name]]):
                        if variant.get("type") == "integer":
                            variant["maximum"] = maximum
            fix(schema)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


class BodyLimit:
    """Refuses request bodies over `max_bytes` (413) without reading past the limit: by Content-Length when the client
    sends one, else by counting the chunks. The 413 is raised from `receive`, so the app's error handler (the one
    place errors become answers) answers and counts it. Starlette's own limiter answers in plain text instead."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                raise StarletteHTTPException(413)
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise StarletteHTTPException(413)
            return message

        await self.app(scope, limited, send)
