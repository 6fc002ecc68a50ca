"""POST /generate (JSON) and POST /generate/stream (Server-Sent Events): one request body, one validation, one
response builder; the stream's `done` event is exactly the body /generate answers.

Stream events, in order: `queued` (requests ahead), then `preview` (image `index`, `step`, `png_base64` of the
current x0 estimate) every `preview_every` steps and `progress` (the least advanced image's completed steps `step`
of `of`, images done, encoder calls so far), then `done` or `error` (the error body /generate would send, plus its
`status`); every event's data has the request's `request_id`. Previews and progress come in batches, at most one per
0.25 s for all streams together (service.core.progress.Handover); the last step's progress comes with `done`, in one
write. A request refused before it is queued (invalid, 401, 429, 503) gets the same HTTP error as /generate, not a
stream. A client that goes away frees its slots at the next tick.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from service.api.answers import error_event, service_error_response
from service.api.deps import Authorized, StateDep
from service.core import (
    REQUEST_ID,
    Cancelled,
    CoreHandle,
    DeadlineExceeded,
    Event,
    GenerationSpec,
    InternalError,
    JobHandle,
    JobResult,
    LimitError,
    Listener,
    NotReady,
    Outcome,
    Priority,
    ServiceError,
    current_traceparent,
    new_error_id,
    span,
)
from service.png import encode_pngs
from service.schemas import ErrorBody, GenerateRequest, GenerateResponse, ImageOut, StreamRequest, Timings
from service.state import AppState, ModelEntry

log = logging.getLogger("service")
router = APIRouter(tags=["generate"], dependencies=[Authorized])

# Every status these routes answer, documented with the error body (408, 431 and the connection cap's 503 come from
# service.http_limits before the app).
ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody}
                                           for s in (400, 401, 404, 408, 413, 415, 422, 429, 431, 500, 503, 504)}
STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}},
          "description": "Server-Sent Events: queued, progress, preview, then done (the /generate body) or error (its "
          "error body plus status)"}}
INLINE_PNG_BYTES = 16_384  # pictures (of an answer or a tick's previews) up to this size are encoded on the event loop
LATE_S = 0.5  # at a deadline: how long the core may take to answer it itself, and to answer a probe after that


async def pngs(images: list[np.ndarray]) -> list[str]:
    """base64 PNGs of `images`: small ones (MNIST: 6-23 us each) encoded here, on the event loop, where a trip to a
    worker thread and back costs more wake-ups than that; large ones in a thread, off the event loop."""
    if sum(img.nbytes for img in images) <= INLINE_PNG_BYTES:
        return encode_pngs(images)
    return await asyncio.to_thread(encode_pngs, images)


def prepare(req: GenerateRequest, state: AppState, t0: float,
            traceparent: str = "") -> tuple[ModelEntry, CoreHandle, GenerationSpec, float]:
    """Check the request against this server and its model, fill the defaults. -> (the model, its engine core,
    spec, timeout). `traceparent`: the request's span, for the core's spans of it."""
    settings = state.settings
    entry = state.model(req.model)
    if state.core_dead is not None:
        raise NotReady(state.core_dead)
    core = entry.core
    if core is not None and (frozen := core.frozen) is not None:
        raise NotReady(frozen)
    if not state.ready or state.draining or core is None:
        raise NotReady("the service is draining" if state.draining else "the service is starting")
    steps = req.steps or entry.sampling.steps
    auto = req.encoder_interval == "auto"
    k = (entry.sampling.encoder_interval if req.encoder_interval is None or auto else int(req.encoder_interval))
    # K > steps runs the encoder once, at step 0, exactly as K = steps does: accepted (a JSON schema cannot tie K to
    # steps, and a schema-valid request must not be refused); the answer reports the K asked for.
    problems = entry.limits.problems(req.class_label, req.num_images, steps, k, auto, req.timeout_s,
                                     req.guidance_scale)
    if problems:
        raise LimitError(problems)
    g = entry.sampling.guidance_scale if req.guidance_scale is None else req.guidance_scale
    seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
    timeout = req.timeout_s or settings.default_timeout_s
    label = entry.spec.null_label if req.class_label is None else req.class_label
    priority = Priority(req.priority) if req.priority is not None else settings.default_priority
    spec = GenerationSpec(label, req.num_images, steps, k, g, seed, deadline=t0 + timeout, auto=auto,
                          priority=priority, request_id=REQUEST_ID.get(), traceparent=traceparent)
    return entry, core, spec, timeout


async def respond(req: GenerateRequest, spec: GenerationSpec, result: JobResult, t0: float,
                  model: str) -> GenerateResponse:
    with span("encode_png", images=len(result.images)):
        encoded = await pngs(result.images)
    return GenerateResponse(
        model=model,
        images=[ImageOut(png_base64=p, seed=s) for p, s in zip(encoded, result.seeds, strict=True)],
        class_label=req.class_label, steps=spec.steps, encoder_interval=result.encoder_interval,
        encoder_interval_auto=spec.auto, guidance_scale=spec.guidance_scale, encoder_calls=result.encoder_calls,
        denoiser_calls=result.denoiser_calls,
        timings=Timings(queue_ms=1000 * result.queue_seconds, compute_ms=1000 * result.compute_seconds,
                        total_ms=1000 * (time.monotonic() - t0)),
    )


def served(state: AppState, resp: GenerateResponse, seconds: float) -> None:
    """Count an answered request: outcome ok, its images, the K it ran at, whether it met the latency target."""
    state.metrics.request_answered(Outcome.OK, seconds, len(resp.images), model=resp.model)
    state.metrics.class_served(resp.model, resp.class_label, len(resp.images))
    state.metrics.served(resp.encoder_interval, resp.encoder_interval_auto, seconds <= state.settings.latency_target_s,
                         resp.model)


async def submit_within(core: CoreHandle, spec: GenerationSpec, deadline: float, listener: Listener | None = None,
                        preview_every: int = 0) -> JobHandle:
    """Submit; a core that does not take the request by its deadline (monotonic) answers it 503 (504 if it does
    answer by then: it was busy, not frozen)."""
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            return await core.submit(spec, listener, preview_every)
    except TimeoutError:
        raise await late(core) from None


async def late(core: CoreHandle) -> ServiceError:
    """The error of a request whose deadline passed without its answer: 503 where the core does not answer a probe
    now (frozen), else 504."""
    why = core.frozen
    if why is None and not await core.responsive(LATE_S):
        why = f"the engine core did not answer within {LATE_S:g} s of the request's deadline"
    return NotReady(why) if why is not None else DeadlineExceeded("no result within the deadline")


def abandon(job: JobHandle, fut: asyncio.Future) -> None:
    """Nobody waits for `job` any more: free its slots at the next tick. The scheduler still resolves it
    (Cancelled); retrieve that outcome, so asyncio does not log "exception never retrieved"."""
    job.cancel()
    fut.add_done_callback(_consume)


@router.post("/generate", response_model=GenerateResponse, responses=ERRORS)
async def generate(req: GenerateRequest, request: Request, state: StateDep) -> Response:
    t0 = time.monotonic()
    try:
        parent = current_traceparent()  # the request's server span (before the validate span below is current)
        with span("validate"):
            entry, core, spec, timeout = prepare(req, state, t0, parent)
        job = await submit_within(core, spec, t0 + timeout)
        fut = asyncio.wrap_future(job.future)
        # Wait for the result or the client going away, whichever comes first, without polling: a poll per request
        # every 0.1 s was measurable GIL time beside the scheduler thread at 100+ open requests. At the deadline the
        # core answers 504 itself at its next tick; one that does not, within LATE_S, is asked whether it is frozen.
        gone = asyncio.create_task(_disconnected(request))
        try:
            done, _ = await asyncio.wait({fut, gone}, timeout=max(0.0, t0 + timeout - time.monotonic()) + LATE_S,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if fut not in done:
            abandon(job, fut)
            raise Cancelled("client disconnected") if gone in done else await late(core)
        resp = await respond(req, spec, fut.result(), t0, entry.name)
    except ServiceError as e:
        return service_error_response(state, e, time.monotonic() - t0, state.model_label(req.model))
    served(state, resp, time.monotonic() - t0)
    return JSONResponse(resp.model_dump())


@router.post("/generate/stream", response_class=EventSourceResponse, responses={**ERRORS, **STREAM_DOC})
async def generate_stream(req: StreamRequest, request: Request, state: StateDep) -> Response:
    t0 = time.monotonic()
    settings = state.settings
    every = settings.default_preview_every if req.preview_every is None else req.preview_every
    every = max(every, settings.min_preview_every) if every else 0
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[list[Event] | None] = asyncio.Queue()

    def listener(tick_events: list[Event]) -> None:  # on the scheduler thread (or this loop): one hand-over
        loop.call_soon_threadsafe(events.put_nowait, tick_events)

    try:
        parent = current_traceparent()  # the request's server span (before the validate span below is current)
        with span("validate"):
            entry, core, spec, timeout = prepare(req, state, t0, parent)
        job = await submit_within(core, spec, t0 + timeout, listener, every)
    except ServiceError as e:
        return service_error_response(state, e, time.monotonic() - t0, state.model_label(req.model))
    response = EventSourceResponse(_stream(req, state, entry.name, core, spec, job, events, timeout, t0), ping=15)
    # sse-starlette always says keep-alive; an HTTP/1.0 client or one that asked to close gets one Connection header.
    if request.scope.get("http_version") == "1.0" or "close" in request.headers.get("connection", "").lower():
        response.headers["connection"] = "close"
    return response


async def _stream(req: StreamRequest, state: AppState, model: str, core: CoreHandle, spec: GenerationSpec,
                  job: JobHandle,
                  events: asyncio.Queue, timeout: float, t0: float) -> AsyncIterator[ServerSentEvent | bytes]:
    state.open_streams += 1  # the drain waits for this stream's last event
    fut = asyncio.wrap_future(job.future)
    # The scheduler sends a job's events before it resolves the job, and both reach this loop in order, so the end
    # marker comes after the job's last event.
    fut.add_done_callback(lambda _: events.put_nowait(None))
    give_up = asyncio.get_running_loop().time() + (t0 + timeout - time.monotonic()) + LATE_S
    answered = False
    last = b""  # the last step's events leave with `done` (or `error`), in one write
    try:
        yield _event("queued", {"position": job.queue_position})
        while True:
            async with asyncio.timeout_at(give_up):  # no task per event, unlike asyncio.wait_for
                tick_events = await events.get()
            if tick_events is None:
                break
            previews = [p for name, p in tick_events if name == "preview"]
            if previews:
                # The pictures are made here, off the tick loop (service.core.runner.PreviewRows).
                for p, png in zip(previews, await pngs([p.pop("image").picture() for p in previews]), strict=True):
                    p["png_base64"] = png
            # A tick's events leave in one write (sse-starlette frames each; bytes pass through as they are).
            chunk = last + b"".join(_event(name, payload).encode() for name, payload in tick_events)
            last = b""
            if any(e.final for e in tick_events):
                last = chunk  # the job's last tick: its answer follows
            else:
                yield chunk
        try:
            resp = await respond(req, spec, fut.result(), t0, model)
        except ServiceError as e:
            answered = True
            yield last + _event("error", error_event(state, e, time.monotonic() - t0, model)).encode()
            return
        answered = True
        served(state, resp, time.monotonic() - t0)
        yield last + ServerSentEvent(event="done", data=resp.model_dump_json()).encode()
    except TimeoutError:
        abandon(job, fut)
        answered = True
        yield last + _event("error", error_event(state, await late(core), time.monotonic() - t0, model)).encode()
    except Exception:  # a bug here: the client gets the error event /generate's 500 would have been
        error_id = new_error_id()
        log.exception("internal error %s in a stream", error_id)
        abandon(job, fut)
        answered = True
        yield last + _event("error", error_event(state, InternalError(error_id), time.monotonic() - t0,
                                                 model)).encode()
    finally:
        state.open_streams -= 1
        if not answered:  # the client went away (sse-starlette cancelled this generator)
            if not fut.done():
                abandon(job, fut)
            state.metrics.request_answered(Cancelled.kind, time.monotonic() - t0, model=model)


def _event(name: str, payload: dict[str, Any]) -> ServerSentEvent:
    """An event; each carries the request's id (as `done` does: the /generate body has it)."""
    return ServerSentEvent(event=name, data=json.dumps({**payload, "request_id": REQUEST_ID.get()},
                                                       separators=(",", ":")))


def _consume(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone: after the body is read, the server's next message is http.disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
