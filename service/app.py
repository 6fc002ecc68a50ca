"""Assembles the service (the fastapi full-stack template's `main.py`): settings and state, the lifespan (load the
engine, warm up, start the scheduler; drain on shutdown), middleware, the routes per resource (`service.api`), the
error handlers (`service.api.answers`: the one place a service error becomes an HTTP answer), offline API docs."""

from __future__ import annotations

import asyncio
import json
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

from dualrate.checkpoint import card_defaults, class_names, distilled_schedule, read_card
from dualrate.config import ModelConfig
from engines import Engine, EngineConfig, create_engine
from service.api import api_router
from service.api.answers import install_error_handlers
from service.api.deps import key_ok
from service.api.routes.pages import mount_static
from service.core.autok import AutoK, QualityBudget
from service.core.client import SHARED_CORE_ENV, RemoteCore, spawn_core
from service.core.handle import LocalCore, build_core
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
    card = read_card(settings.checkpoint)  # all the front end needs of the checkpoint: the engine loads the weights
    cfg = ModelConfig.from_dict(card["config"])
    state = AppState(settings, cfg)
    state.metrics.set_model(cfg.num_classes, class_names(card))
    state.distilled = distilled_schedule(card)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        defaults = card_defaults(card)
        state.model_card = card
        state.defaults = {"steps": defaults.steps, "encoder_interval": defaults.encoder_interval,
                          "guidance_scale": defaults.guidance_scale}
        budget = QualityBudget.from_card(card, settings.quality_budget, defaults.encoder_interval)
        state.autok = AutoK(budget, settings.latency_target_s)  # the front end's copy: the limits of "auto"

        def starting(line: str) -> None:  # what /health/ready says while not ready (from any thread)
            state.starting = line

        remote: RemoteCore | None = None
        built = None
        shared = os.environ.get(SHARED_CORE_ENV)  # a front-end worker of several: the supervisor's core
        if shared:
            remote = RemoteCore(None, shared)
            remote.on_death = state.core_died
            remote.start()
            state.core = remote
            await remote.wait_ready(starting)
        elif settings.use_engine_process:
            remote = RemoteCore(*spawn_core())
            remote.on_death = state.core_died
            remote.start()
            state.core = remote
            await remote.wait_ready(starting)
        else:
            built = await asyncio.to_thread(build_core, settings, state.metrics, engine_factory, starting)
            state.engine, state.scheduler = built.engine, built.scheduler
            state.core = LocalCore(built.scheduler, built.engine.info, state.metrics.refresh)
            state.metrics.set_engine(built.engine.info, settings.policy.value)
        info = state.core.engine_info
        if settings.api_keys:
            log.info("API keys: %d configured: /generate, /generate/stream and /v1/model need one",
                     len(settings.api_keys))
        elif settings.listens_beyond_loopback:
            log.warning("API keys: none, and the service listens on %s (not loopback): the API is open to whoever "
                        "reaches the port; set DUALRATE_API_KEYS (in a container, unless its port is published on "
                        "127.0.0.1 only)", settings.host)
        else:
            log.info("API keys: none (DUALRATE_API_KEYS unset): the API is open to whoever reaches %s",
                     settings.host)
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
    # The published schema carries this server's live limits, so a schema-valid request is one the server takes.
    # A distilled student samples at the steps it was distilled for, with the encoder at most as rarely as then.
    distilled = distilled_schedule(card)
    steps_max, k_max = distilled or (settings.max_steps, settings.max_steps)
    _limits_in_openapi(app, {"class_label": cfg.num_classes - 1, "num_images": settings.max_images_per_request,
                             "steps": steps_max, "encoder_interval": k_max, "timeout_s": settings.max_timeout_s},
                       class_names(card), {"steps": distilled[0]} if distilled else {})
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, keys=settings.api_key_bytes)
    install_error_handlers(app)
    # Starlette would answer /static with a redirect to http://<Host header>/static/: an absolute URL built from what
    # the client sent. No slash redirects: a path is served as written or 404.
    app.router.redirect_slashes = False
    app.include_router(api_router)
    mount_static(app)
    return app


def _limits_in_openapi(app: FastAPI, maxima: dict[str, float], names: list[str] | None = None,
                       minima: dict[str, float] | None = None) -> None:
    """FastAPI's OpenAPI model stores minimum/maximum as floats (2**53 - 1 came out as 9007199254740991.0 and 2**62
    as 4.611686018427388e+18); give integer fields integer limits so a schema-driven client sends valid values.
    `maxima`: request fields whose maximum depends on the model or the settings (class_label < num_classes,
    num_images, steps, encoder_interval and timeout_s), written into each numeric variant of the field. `names`: the
    model's class names, listed in class_label's description. `minima`: fields whose minimum depends on the model
    (a distilled student's steps)."""
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
                        if variant.get("type") in ("integer", "number"):
                            variant["maximum"] = maximum
                            variant.pop("exclusiveMaximum", None)
                for name, minimum in (minima or {}).items():
                    for variant in props[name].get("anyOf", [props[name]]):
                        if variant.get("type") in ("integer", "number"):
                            variant["minimum"] = minimum
                            variant.pop("exclusiveMinimum", None)
                if names:
                    props["class_label"]["description"] = (props["class_label"].get("description", "") + ". This "
                                                           "model's classes: " + ", ".join(
                                                               f"{i} = {n}" for i, n in enumerate(names)))
            fix(schema)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


PROTECTED_PREFIXES = ("/generate", "/v1/")  # the routes behind the API key (service.api.deps.Authorized)


class BodyLimit:
    """Refuses request bodies over `max_bytes` (413) without reading past the limit: by Content-Length when the client
    sends one, else by counting the chunks. A JSON body is read whole on the app's first `receive` and checked for
    what the JSON parser would only call "an error parsing the body": not UTF-8 (RFC 8259 JSON is UTF-8; Python's
    parser would also take UTF-16 and UTF-32), nested too deeply for the parser, or a number of more digits than
    Python converts; each gets a 400 that names it. (Syntax errors go on to the app's 422, with their position.) The
    errors are raised from `receive`, so the app's error handler (the one place errors become answers) answers and
    counts them. Starlette's own limiter answers in plain text instead. Every answer carries X-Content-Type-Options:
    nosniff."""

    def __init__(self, app: ASGIApp, max_bytes: int, keys: list[bytes] | None = None) -> None:
        self.app, self.max_bytes, self.keys = app, max_bytes, keys or []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        is_json = headers.get("content-type", "").split(";")[0].strip().lower().endswith("json")
        seen = 0
        whole: list[Message] = []

        async def read() -> Message:
            nonlocal seen
            if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                raise StarletteHTTPException(413)
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise StarletteHTTPException(413)
            return message

        # The API key before the body: a request without a valid key learns nothing about its body (401, not 422).
        protected = scope["path"].startswith(PROTECTED_PREFIXES)
        key_checked = not protected or key_ok(self.keys, headers.get("authorization", ""))

        async def limited() -> Message:
            if not key_checked:  # an HTTPException: FastAPI turns other errors while reading the body into 400
                raise StarletteHTTPException(401, headers={"WWW-Authenticate": "Bearer"})
            if not is_json or whole:
                return await read()
            parts, message = [], await read()
            while message["type"] == "http.request":
                parts.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
                message = await read()
            if message["type"] != "http.request":
                return message  # the client went away mid-body
            body = b"".join(parts)
            _check_json(body)
            whole.append(message)
            return {"type": "http.request", "body": body, "more_body": False}

        async def send_nosniff(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-content-type-options", b"nosniff")]}
            await send(message)

        await self.app(scope, limited, send_nosniff)


def _check_json(body: bytes) -> None:
    """400 for a JSON body the parser cannot take for a reason other than its syntax (see BodyLimit)."""
    if not body:
        return
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise StarletteHTTPException(400, f"the body is not UTF-8 (byte {e.start}): JSON bodies must be UTF-8 encoded"
                                     ) from None
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return  # the app answers 422 with the position
    except RecursionError:
        raise StarletteHTTPException(400, "the JSON body is nested too deeply to parse (keep it under ~900 levels)"
                                     ) from None
    except ValueError as e:
        raise StarletteHTTPException(400, f"a number in the JSON body is too large to read: {e}") from None
