"""Assembles the service (the fastapi full-stack template's `main.py`): settings and state, the lifespan (load the
engine, warm up, start the scheduler; drain on shutdown), middleware, the routes per resource (`service.api`), the
error handlers (`service.api.answers`: the one place a service error becomes an HTTP answer), offline API docs."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from prometheus_client import disable_created_metrics

from export.card import model_spec
from service.api import ROUTERS, api_router
from service.api.answers import install_error_handlers
from service.api.routes.pages import mount_static
from service.core import (
    SHARED_CORE_ENV,
    TRACING,
    Built,
    CoreStats,
    EngineFactory,
    LocalCore,
    QualityBudget,
    RemoteCore,
    build_core,
    spawn_core,
)
from service.middleware import BodyLimit, RequestContext, protected_paths
from service.settings import Settings
from service.state import AppState, ModelEntry, drain, drain_or_stop_cores

__all__ = ["AppState", "create_app", "drain"]

log = logging.getLogger("service")
disable_created_metrics()  # no *_created series: they clutter the dashboard queries


def create_app(settings: Settings | None = None, engine_factory: EngineFactory | None = None) -> FastAPI:
    """`engine_factory(checkpoint, engine config)` builds the engine (in-process core only): `engines.create_engine`,
    or a wrapper around it (a failing engine double in the failure tests)."""
    settings = settings or Settings()
    entries = []
    for name, folder in settings.served_models.items():  # the front end reads cards only: the engines load weights
        card = settings.model_card(name)
        spec = model_spec(card)
        entries.append(ModelEntry(name, folder, spec, card, settings.core_config(card, name),
                                  QualityBudget.from_card(card, settings.quality_budget,
                                                          spec.defaults.encoder_interval)))
    state = AppState(settings, entries)
    for entry in entries:
        state.metrics.set_model(entry.name, entry.spec.num_classes, entry.spec.class_names)
    several = len(entries) > 1

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        def starting(line: str) -> None:  # what /health/ready says while not ready (from any thread)
            state.starting = line

        remotes: list[RemoteCore] = []
        built: list[Built] = []
        shared = os.environ.get(SHARED_CORE_ENV)  # a front-end worker of several: the supervisor's core
        for entry in entries:
            say = (lambda line, n=entry.name: starting(f"model {n}: {line}")) if several else starting
            if shared or settings.use_engine_process:
                beat = settings.core_heartbeat_timeout_s
                remote = (RemoteCore(None, shared, heartbeat_timeout_s=beat) if shared
                          else RemoteCore(*spawn_core(entry.core_config), heartbeat_timeout_s=beat))
                remote.on_death = (lambda why, n=entry.name: state.core_died(f"model {n}: {why}")) if several \
                    else state.core_died
                remote.start()
                entry.core = remote
                remotes.append(remote)
                await remote.wait_ready(say)
            else:
                stats = CoreStats()
                b = await asyncio.to_thread(build_core, entry.core_config, stats, engine_factory, say)
                built.append(b)
                entry.core = LocalCore(b.loop, b.engine.info, stats, settings.core_heartbeat_timeout_s)
        if settings.api_keys:
            log.info("API keys: %d configured: every API route (/generate, /generate/stream, /v1/...) needs one",
                     len(settings.api_keys))
        elif settings.listens_beyond_loopback:
            log.warning("API keys: none, and the service listens on %s (not loopback): the API is open to whoever "
                        "reaches the port; set DUALRATE_API_KEYS (in a container, unless its port is published on "
                        "127.0.0.1 only)", settings.host)
        else:
            log.info("API keys: none (DUALRATE_API_KEYS unset): the API is open to whoever reaches %s",
                     settings.host)
        worker_task = None
        if settings.job_store != "off":
            from service.jobs.store import JobStore
            from service.jobs.worker import JobWorker

            store = JobStore(settings.job_store)
            await store.open()
            state.jobs, state.job_worker = store, JobWorker(store, state)
            worker_task = asyncio.create_task(state.job_worker.run(), name="job-worker")
            log.info("jobs: replica %s, store %s (lease %g s, checkpoints every %g s, kept %g s)",
                     state.job_worker.replica, store.engine.url.render_as_string(hide_password=True),
                     settings.job_lease_s, settings.job_checkpoint_s, settings.job_ttl_s)
        state.ready = True
        described = []
        for entry in entries:
            info = entry.core.engine_info  # type: ignore[union-attr]
            rc = entry.core if isinstance(entry.core, RemoteCore) else None
            described.append(f"{entry.name} ({entry.spec.format}; backend={info.backend} device={info.device} "
                             f"precision={info.precision} slots={settings.slots(entry.name)}; engine core "
                             + ("in this process" if rc is None else f"in its own process (pid {rc.proc.pid})"
                                if rc.proc is not None else f"shared by the front-end workers at {rc.address}") + ")")
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        log.info("ready on http://%s:%d: %s %s; policy=%s queue=%d", host, settings.port,
                 "models" if several else "model", "; ".join(described), settings.policy, settings.queue_size)
        try:
            yield
        finally:
            state.ready = False
            if worker_task is not None:
                if state.job_worker is not None and not state.job_worker.stopping:
                    await state.job_worker.release()
                worker_task.cancel()
            if state.core_killed:  # a forced drain found a core frozen: nothing of them is waited for again
                for remote in remotes:
                    await remote.close(timeout=5)
            else:
                # Bounded: a core that froze after a signal's drain had finished (or with no signal at all) would
                # keep this drain waiting for good; it gets the drain's time and the heartbeat's, then it is stopped.
                bound = settings.effective_drain_timeout_s + settings.core_heartbeat_timeout_s
                await drain_or_stop_cores(state, bound, f"the engine core did not answer the shutdown's drain within "
                                          f"{bound:.0f} s (DUALRATE_DRAIN_TIMEOUT_S + DUALRATE_CORE_HEARTBEAT_TIMEOUT_S)")
                for remote in remotes:
                    if remote.dead is None:
                        code = await remote.close()
                        log.info("engine core exited with %s", code)
                for b in built:
                    b.loop.shutdown(timeout=30)
                    b.engine.close()
            if state.jobs is not None:
                await state.jobs.close()
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
        # FastAPI's own OpenTelemetry server spans, on this process's tracer when OTEL_* turned traces on (service.core
        # .telemetry); probes and scrapes get none.
        telemetry=TRACING.fastapi_config(frozenset({"/health/live", "/health/ready", "/metrics"})),
    )
    app.state.dualrate = state
    # The published schema carries this server's live limits, so a schema-valid request is one the server takes.
    # A distilled student samples at the steps it was distilled for, with the encoder at most as rarely as then.
    maxima: dict[str, float] = {}
    for entry in entries:  # the loosest over the served models: each request is then held to its own model's
        for k, v in entry.limits.maxima().items():
            maxima[k] = max(maxima.get(k, v), v)
    minima = {k: min(e.limits.minima()[k] for e in entries) for k in entries[0].limits.minima()
              if all(k in e.limits.minima() for e in entries)}
    _limits_in_openapi(app, maxima, state.default.spec.class_names if not several else None, minima, list(state.models),
                       protected_paths(ROUTERS) if settings.api_keys else frozenset(), settings.webhook_allow)
    install_error_handlers(app)
    # Starlette would answer /static with a redirect to http://<Host header>/static/: an absolute URL built from what
    # the client sent. No slash redirects: a path is served as written or 404.
    app.router.redirect_slashes = False
    app.include_router(api_router)
    mount_static(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, keys=settings.api_key_bytes,
                       protected=protected_paths(ROUTERS))
    app.add_middleware(RequestContext)  # added last: outermost, so every answer and log line has the request's id
    return app


def _limits_in_openapi(app: FastAPI, maxima: dict[str, float], names: list[str] | None = None,
                       minima: dict[str, float] | None = None, models: list[str] | None = None,
                       protected: frozenset[str] = frozenset(), webhook_allow: list[str] | None = None) -> None:
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
            for model in ("GenerateRequest", "StreamRequest", "JobRequest"):
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
                for variant in props["model"].get("anyOf", [props["model"]]) if models else ():
                    if variant.get("type") == "string":  # the served models by name: a valid request names one
                        variant["enum"] = models
                if models and len(models) > 1:  # several served: `model` is required and names one of them
                    string = next(v for v in props["model"]["anyOf"] if v.get("type") == "string")
                    props["model"] = {**{k: v for k, v in props["model"].items() if k != "anyOf"}, **string}
                    schema["components"]["schemas"][model].setdefault("required", []).append("model")
            jobs = schema["components"]["schemas"].get("JobRequest", {}).get("properties", {})
            if "webhook" in jobs:  # the hosts this server may call, or none: a schema-valid webhook is one it takes
                hosts = [h for h in webhook_allow or [] if not h.startswith("*.")]
                wild = [h[2:] for h in webhook_allow or [] if h.startswith("*.")]
                if not webhook_allow:
                    jobs["webhook"] = {"type": "null", "description": "webhooks are off on this server "
                                       "(DUALRATE_WEBHOOK_ALLOW)"}
                else:
                    alts = [re.escape(h) for h in hosts] + [r"[A-Za-z0-9.-]+\." + re.escape(w) for w in wild]
                    for variant in jobs["webhook"].get("anyOf", [jobs["webhook"]]):
                        if variant.get("type") == "string":
                            variant["pattern"] = rf"^https?://({'|'.join(alts)})(:[0-9]{{1,5}})?(/[!-~]*)?$"
            if protected:  # keys are set: an HTTP bearer scheme on the routes that need one (Swagger UI's Authorize)
                schema.setdefault("components", {})["securitySchemes"] = {"bearer": {
                    "type": "http", "scheme": "bearer",
                    "description": "one of DUALRATE_API_KEYS, sent as Authorization: Bearer <key>"}}
                for path in protected:
                    for operation in schema["paths"].get(path, {}).values():
                        operation["security"] = [{"bearer": []}]
            for param in schema["paths"].get("/v1/models/{name}", {}).get("get", {}).get("parameters", []):
                if param.get("name") == "name" and models:
                    param["schema"]["enum"] = models
            fix(schema)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


