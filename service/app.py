"""Assembles the FastAPI app: lifespan (load engine, warm up, start the scheduler; drain on shutdown), routes, and
the single place where domain errors become HTTP responses."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import math
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, disable_created_metrics, generate_latest
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dualrate.checkpoint import load_checkpoint, read_card
from dualrate.config import ModelConfig
from dualrate.diffusion import CosineSchedule
from engines import Engine, EngineConfig, create_engine
from service.errors import Cancelled, DeadlineExceeded, EngineFailure, NotReady, QueueFull, ServiceError
from service.metrics import PrometheusStats
from service.scheduler import GenerationSpec, Scheduler
from service.schemas import ErrorBody, GenerateRequest, GenerateResponse, ImageOut, ModelInfo, Timings
from service.settings import Settings

log = logging.getLogger("service")
disable_created_metrics()  # no *_created series: they clutter the dashboard queries


class AppState:
    """Everything the routes need; built in the lifespan."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ready = False
        self.draining = False
        self.engine: Engine | None = None
        self.scheduler: Scheduler | None = None
        self.metrics = PrometheusStats()
        self.model_card: dict = {}
        self.defaults: dict = {}
        self.null_label = 10


def _error(status: int, kind: str, message: str, *, error_id: str | None = None, details: list | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorBody(error=kind, message=message, error_id=error_id, details=details)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


# Statuses that the framework raises (routing, body reading) -> the error kind of the documented error body.
HTTP_KINDS = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
              415: "unsupported_media_type"}


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _validation_details(exc: RequestValidationError) -> tuple[int, str, str, list[dict]]:
    """-> (status, kind, message, details) for a request that failed parsing or validation."""
    errors = exc.errors()
    bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if bad_json is not None:
        pos = bad_json["loc"][-1]
        why = (bad_json.get("ctx") or {}).get("error", "JSON decode error")
        msg = f"the body is not valid JSON: {why} at position {pos}"
        return 422, "invalid_request", msg, [{"field": "body", "message": msg}]
    details = []
    for e in errors:
        field = ".".join(str(p) for p in e["loc"] if p != "body")
        message = e["msg"]
        if e.get("type") == "finite_number":
            message = "must be a finite number (NaN and infinity are not accepted)"
        elif e.get("type") == "missing" and not field:
            message = "a JSON object body is required"
        details.append({"field": field or "body", "message": message})
    fields = ", ".join(d["field"] for d in details)
    return 422, "invalid_request", f"invalid field(s): {fields}", details


def encode_pngs(images: list[np.ndarray]) -> list[str]:
    """uint8 pictures, (H, W) grayscale or (H, W, 3) RGB -> base64 PNGs of the same mode."""
    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img, mode="L" if img.ndim == 2 else "RGB").save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def create_app(settings: Settings | None = None,
               engine_factory: Callable[[Path, EngineConfig], Engine] = create_engine) -> FastAPI:
    """`engine_factory(checkpoint, engine config)` builds the engine: `engines.create_engine`, or a wrapper around it
    (a failing engine double in the failure tests)."""
    settings = settings or Settings()
    state = AppState(settings)
    cfg = ModelConfig.from_dict(read_card(settings.checkpoint)["config"])  # geometry and labels, before the weights
    state.null_label = cfg.null_label

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model = await asyncio.to_thread(load_checkpoint, settings.checkpoint)
        state.model_card = model.card
        state.defaults = {"steps": model.defaults.steps, "encoder_interval": model.defaults.encoder_interval,
                          "guidance_scale": model.defaults.guidance_scale}
        state.engine = await asyncio.to_thread(engine_factory, settings.checkpoint, settings.engine_config())
        if settings.warmup:
            await asyncio.to_thread(state.engine.warmup, (1, 2 * settings.max_active_images))
        state.scheduler = Scheduler(
            state.engine, CosineSchedule(model.cfg.logsnr_min, model.cfg.logsnr_max), model.cfg.null_label,
            settings.max_active_images, settings.queue_size, settings.policy, state.metrics,
            overlap_encoder=settings.overlap_encoder, align_encoder=settings.align_encoder,
            output_size=model.cfg.output_size,
        )
        state.scheduler.start()
        state.metrics.set_engine(state.engine.info, settings.policy.value)
        state.ready = True
        log.info("ready: backend=%s device=%s policy=%s slots=%d queue=%d", state.engine.info.backend,
                 state.engine.info.device, settings.policy, settings.max_active_images, settings.queue_size)
        try:
            yield
        finally:
            state.ready = False
            await drain(state)
            state.scheduler.shutdown(timeout=30)
            state.engine.close()
            log.info("stopped")

    app = FastAPI(
        title="Dual-Rate Diffusion service",
        version="0.1.0",
        description="Class-conditional MNIST digits from a Dual-Rate Diffusion model: a heavy context encoder every "
        "K-th step, a light denoiser every step, batched at the step level.",
        lifespan=lifespan,
    )
    app.state.dualrate = state
    _integer_limits_in_openapi(app, {"class_label": cfg.num_classes - 1})
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    keys = [k.get_secret_value().encode("utf-8") for k in settings.api_keys]

    def authorize(request: Request) -> None:
        if not keys:
            return
        header = request.headers.get("authorization", "")
        token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        # Compare bytes: compare_digest refuses non-ASCII str, and a client may send any header bytes (latin-1).
        presented = token.encode("utf-8", errors="surrogateescape")
        if not any(secrets.compare_digest(presented, k) for k in keys):
            raise _Unauthorized()

    auth = [Depends(authorize)]

    def answer(status: int, kind: str, message: str, seconds: float = 0.0, **kw) -> JSONResponse:
        """The one place an error becomes an HTTP answer, and is counted in dualrate_requests_total by kind."""
        state.metrics.request_answered(kind, seconds)
        return _error(status, kind, message, **kw)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        if request.method == "POST" and not _is_json(request.headers.get("content-type")):
            got = request.headers.get("content-type") or "no content type"
            return answer(415, "unsupported_media_type",
                          f"expected a JSON body with content-type application/json, got {got}")
        status, kind, message, details = _validation_details(exc)
        return answer(status, kind, message, details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = HTTP_KINDS.get(exc.status_code, "invalid_request" if exc.status_code < 500 else "internal")
        message = str(exc.detail)
        if exc.status_code == 400 and message == "There was an error parsing the body":
            message = "the body could not be read as JSON (it must be UTF-8 encoded JSON)"
        elif exc.status_code == 404:
            message = f"no such path: {request.url.path} (see /docs)"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        elif exc.status_code == 413:
            message = f"the request body is larger than {settings.max_body_bytes} bytes (DUALRATE_MAX_BODY_BYTES)"
        return answer(exc.status_code, kind, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(_Unauthorized)
    async def _unauth(request: Request, exc: Exception) -> JSONResponse:
        return answer(401, "unauthorized", "missing or wrong API key: send Authorization: Bearer <key>",
                      headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        error_id = uuid.uuid4().hex[:12]
        log.exception("internal error %s on %s %s", error_id, request.method, request.url.path)
        return answer(500, "internal", f"internal error (error id {error_id})", error_id=error_id)

    @app.get("/health/live", tags=["health"])
    async def live() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/health/ready", tags=["health"], responses={503: {"model": ErrorBody}})
    async def ready() -> Response:
        if not state.ready or state.draining:
            return _error(503, "unavailable", "draining" if state.draining else "starting")
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", tags=["ops"], response_class=Response)
    async def metrics() -> Response:
        if state.scheduler is not None:
            state.metrics.refresh(state.scheduler.snapshot())
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/model", response_model=ModelInfo, tags=["model"], dependencies=auth)
    async def model_info() -> ModelInfo:
        if state.engine is None:
            raise NotReady("the engine is not loaded yet")
        info = state.engine.info
        limits = {"max_images_per_request": settings.max_images_per_request, "max_steps": settings.max_steps,
                  "max_timeout_s": settings.max_timeout_s, "default_timeout_s": settings.default_timeout_s,
                  "max_active_images": settings.max_active_images, "queue_size": settings.queue_size}
        image = {"channels": cfg.channels, "sample_size": cfg.image_size, "output_size": cfg.output_size,
                 "png_mode": "L" if cfg.channels == 1 else "RGB", "num_classes": cfg.num_classes}
        return ModelInfo(name=state.model_card.get("name", settings.checkpoint.name), card=state.model_card,
                         backend=info.backend, device=info.device, precision=info.precision,
                         providers=list(info.providers), policy=settings.policy.value, limits=limits,
                         defaults=state.defaults, image=image)

    @app.post(
        "/generate", response_model=GenerateResponse, tags=["generate"], dependencies=auth,
        responses={401: {"model": ErrorBody}, 413: {"model": ErrorBody}, 415: {"model": ErrorBody},
                   422: {"model": ErrorBody}, 429: {"model": ErrorBody},
                   500: {"model": ErrorBody}, 503: {"model": ErrorBody}, 504: {"model": ErrorBody}},
    )
    async def generate(req: GenerateRequest, request: Request) -> Response:
        t0 = time.monotonic()
        try:
            resp = await _generate(req, request, t0)
        except ServiceError as e:
            return _service_error(e, time.monotonic() - t0)
        state.metrics.request_answered("ok", time.monotonic() - t0, len(resp.images))
        return JSONResponse(resp.model_dump())

    async def _generate(req: GenerateRequest, request: Request, t0: float) -> GenerateResponse:
        if not state.ready or state.draining or state.scheduler is None:
            raise NotReady("the service is draining" if state.draining else "the service is starting")
        limit_errors = []
        if req.class_label is not None and req.class_label >= cfg.num_classes:
            limit_errors.append(("class_label", f"must be < {cfg.num_classes} (this model's classes) or null"))
        if req.num_images > settings.max_images_per_request:
            limit_errors.append(("num_images", f"must be <= {settings.max_images_per_request}"))
        steps = req.steps or state.defaults["steps"]
        if steps > settings.max_steps:
            limit_errors.append(("steps", f"must be <= {settings.max_steps}"))
        k = req.encoder_interval or state.defaults["encoder_interval"]
        if k > steps:
            limit_errors.append(("encoder_interval", f"must be <= steps ({steps}): K = steps already runs the "
                                 "encoder once"))
        if limit_errors:
            raise _LimitError(limit_errors)
        g = state.defaults["guidance_scale"] if req.guidance_scale is None else req.guidance_scale
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        timeout = min(req.timeout_s or settings.default_timeout_s, settings.max_timeout_s)
        label = state.null_label if req.class_label is None else req.class_label
        spec = GenerationSpec(label, req.num_images, steps, k, g, seed, deadline=t0 + timeout)
        job = state.scheduler.submit(spec)
        fut = asyncio.wrap_future(job.future)
        # Wait for the result or the client going away, whichever comes first, without polling: a poll per request
        # every 0.1 s was measurable GIL time beside the scheduler thread at 100+ open requests. The scheduler enforces
        # the deadline at its next tick; the wait's own limit only guards against a scheduler that stopped ticking.
        gone = asyncio.create_task(_disconnected(request))
        try:
            done, _ = await asyncio.wait({fut, gone}, timeout=timeout + 30.0, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if fut not in done:
            job.cancel()
            # The scheduler still resolves the job (Cancelled at its next tick); nobody awaits the wrapper any more,
            # so retrieve its outcome when it comes instead of leaving asyncio to log "exception never retrieved".
            fut.add_done_callback(_consume)
            if gone in done:
                raise Cancelled("client disconnected")
            raise DeadlineExceeded("no result within the deadline")
        result = fut.result()
        pngs = await asyncio.to_thread(encode_pngs, result.images)  # PNG encoding stays off the event loop
        total = time.monotonic() - t0
        return GenerateResponse(
            images=[ImageOut(png_base64=p, seed=s) for p, s in zip(pngs, result.seeds, strict=True)],
            class_label=req.class_label, steps=steps, encoder_interval=k, guidance_scale=g,
            encoder_calls=result.encoder_calls, denoiser_calls=result.denoiser_calls,
            timings=Timings(queue_ms=1000 * result.queue_seconds, compute_ms=1000 * result.compute_seconds,
                            total_ms=1000 * total),
        )

    def _service_error(e: ServiceError, seconds: float = 0.0) -> JSONResponse:
        if isinstance(e, _LimitError):
            return answer(422, "invalid_request", f"invalid field(s): {', '.join(f for f, _ in e.fields)}", seconds,
                          details=[{"field": f, "message": m} for f, m in e.fields])
        if isinstance(e, QueueFull):
            return answer(429, e.kind, str(e), seconds, headers={"Retry-After": str(math.ceil(e.retry_after_s))})
        if isinstance(e, EngineFailure):
            return answer(500, e.kind, str(e), seconds, error_id=e.error_id)
        return answer(e.status, e.kind, str(e), seconds)

    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError) -> JSONResponse:
        return _service_error(exc)

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
            props = schema["components"]["schemas"]["GenerateRequest"]["properties"]
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


class _Unauthorized(Exception):
    pass


class _LimitError(ServiceError):
    status, kind = 422, "invalid_request"

    def __init__(self, fields: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{f} {m}" for f, m in fields))
        self.fields = fields


def _consume(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone: after the body is read, the server's next message is http.disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def drain(state: AppState, poll_s: float = 0.05) -> None:
    """Stop admission (503) and wait until every accepted request has its answer."""
    state.draining = True
    if state.scheduler is None:
        return
    state.scheduler.stop_admission()
    while not state.scheduler.idle():
        await asyncio.sleep(poll_s)
