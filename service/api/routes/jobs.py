"""The asynchronous job API: POST /v1/jobs (202; the /generate body plus an optional webhook; Idempotency-Key),
GET /v1/jobs (the caller's, newest first, paged), GET /v1/jobs/{id}, GET /v1/jobs/{id}/events (Server-Sent Events),
GET /v1/jobs/{id}/images/{i}.png, DELETE /v1/jobs/{id} (cancel). Jobs live in the durable store
(`service.jobs.store`) and run on whichever replica claims them (`service.jobs.worker`); with API keys on, a job
belongs to the key that made it and any other key gets 404."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from service.api.answers import error_response
from service.api.deps import Authorized, StateDep
from service.core import MAX_STEPS, REQUEST_ID, LimitError, NotReady, Outcome, Priority, ServiceError
from service.jobs.store import (
    CANCELLED,
    FAILED,
    MAX_CURSOR,
    QUEUED,
    SUCCEEDED,
    TERMINAL,
    IdempotencyConflict,
    JobStore,
    owner_of,
)
from service.jobs.webhooks import host_allowed
from service.jobs.worker import job_status, new_seed
from service.schemas import ErrorBody, JobList, JobOut, JobRequest
from service.state import AppState

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Authorized])
ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody} for s in (400, 401, 404, 409, 413, 415, 422, 503)}
EVENT_POLL_S = 0.25


def _store(state: AppState) -> JobStore:
    if state.jobs is None:
        raise NotReady("jobs are off on this server (DUALRATE_JOB_STORE=off)")
    return state.jobs


def caller(request: Request, state: AppState) -> str:
    """The owner of the caller's jobs: a hash of its API key ("" without keys)."""
    if not state.settings.api_keys:
        return ""
    return owner_of(request.headers.get("authorization", "").strip().partition(" ")[2].strip())


def resolve(req: JobRequest, state: AppState) -> tuple[str, dict[str, Any]]:
    """The request checked against the model and the limits, its defaults filled and its seed drawn: what the job
    stores and every replica runs the same way. -> (model, resolved body)."""
    entry = state.model(req.model)
    problems: list[tuple[str, str]] = []
    if req.timeout_s is not None:
        problems.append(("timeout_s", "a job has no deadline: leave it out (cancel with DELETE /v1/jobs/{id})"))
    if req.webhook is not None:
        allow = state.settings.webhook_allow
        if not allow:
            problems.append(("webhook", "webhooks are off on this server (DUALRATE_WEBHOOK_ALLOW names the hosts it "
                             "may call)"))
        elif not host_allowed(req.webhook, allow):
            problems.append(("webhook", "this host is not one the server may call (DUALRATE_WEBHOOK_ALLOW)"))
    steps = req.steps or entry.sampling.steps
    auto = req.encoder_interval == "auto"
    k = entry.sampling.encoder_interval if req.encoder_interval is None or auto else int(req.encoder_interval)
    problems += entry.limits.problems(req.class_label, req.num_images, steps, k, auto, None, req.guidance_scale)
    if problems:
        raise LimitError(problems)
    return entry.name, {
        "class_label": req.class_label, "num_images": req.num_images, "steps": steps,
        "encoder_interval": "auto" if auto else k,
        "guidance_scale": entry.sampling.guidance_scale if req.guidance_scale is None else req.guidance_scale,
        "seed": req.seed if req.seed is not None else new_seed(),
        "priority": (req.priority or Priority.BATCH).value}


@router.post("", status_code=202, response_model=JobOut, responses={
    **ERRORS, 200: {"model": JobOut, "description": "the job an earlier submit with this Idempotency-Key made"}})
async def submit(req: JobRequest, request: Request, state: StateDep,
                 idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> Response:
    """Queue a job (batch priority: interactive /generate goes first). 202 with its status and `Location`. The same
    Idempotency-Key with the same body gives the same job (200); with another body, 409."""
    store = _store(state)
    if state.draining:
        raise NotReady("the service is draining")
    model, body = resolve(req, state)
    try:
        # Two submits are the same when their requests are (the body as sent, not the seed drawn for it).
        job, created = await store.submit(caller(request, state), body, model, req.num_images, body["steps"],
                                          req.webhook, idempotency_key, req.model_dump(mode="json"))
    except IdempotencyConflict as e:
        return error_response(state, 409, Outcome.INVALID_REQUEST, "this Idempotency-Key was used with another body "
                              f"(job {e}): use a new key for a new job")
    if created and state.job_worker is not None:
        state.job_worker.wake()
    out = await job_status(store, job)
    return JSONResponse(out, status_code=202 if created else 200, headers={"Location": out["status_url"]})


@router.get("", response_model=JobList, responses=ERRORS)
async def list_jobs(request: Request, state: StateDep, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                    after: Annotated[int | None, Query(ge=0, le=MAX_CURSOR, description="the `next` of the previous page")] = None
                    ) -> Response:
    """The caller's jobs, newest first."""
    store = _store(state)
    rows = await store.page(caller(request, state), limit + 1, after)
    page = rows[:limit]
    return JSONResponse({"jobs": [await job_status(store, j) for j in page],
                         "next": page[-1].seq if len(rows) > limit else None})


async def _job(request: Request, state: AppState, job_id: str):
    store = _store(state)
    job = await store.get(job_id, caller(request, state)) if len(job_id) <= 64 else None
    if job is None:
        raise _NoJob(job_id)
    return store, job


class _NoJob(ServiceError):
    status, kind = 404, Outcome.NOT_FOUND

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id[:64]} (jobs are kept DUALRATE_JOB_TTL_S after they end, and each is "
                         "visible only to the API key that made it)")


@router.get("/{job_id}", response_model=JobOut, responses=ERRORS)
async def get_job(job_id: str, request: Request, state: StateDep) -> Response:
    store, job = await _job(request, state, job_id)
    return JSONResponse(await job_status(store, job))


@router.delete("/{job_id}", response_model=JobOut, responses=ERRORS)
async def cancel_job(job_id: str, request: Request, state: StateDep) -> Response:
    """Cancel a queued or running job (a running one stops within a lease renewal). A finished job: 409."""
    store, job = await _job(request, state, job_id)
    if job.status in TERMINAL:
        return error_response(state, 409, Outcome.INVALID_REQUEST, f"job {job.id} has already ended ({job.status})")
    after = await store.cancel(job.id, job.owner, state.settings.job_ttl_s)
    assert after is not None
    return JSONResponse(await job_status(store, after))


@router.get("/{job_id}/images/{index}.png", response_class=Response, responses={
    **ERRORS, 200: {"content": {"image/png": {}}, "description": "the image, as /generate would encode it"}})
async def job_image(job_id: str, index: Annotated[int, Path(ge=0, le=MAX_STEPS)], request: Request,
                    state: StateDep) -> Response:
    store, job = await _job(request, state, job_id)
    png = await store.image(job.id, index)
    if png is None:
        raise _NoJob(f"{job.id} image {index} (not finished, or no such index)")
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})


@router.get("/{job_id}/events", response_class=EventSourceResponse, responses={
    **ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "queued, progress, then done (the job's "
                    "status) or error"}})
async def job_events(job_id: str, request: Request, state: StateDep) -> Response:
    """The job's progress as Server-Sent Events, from whichever replica runs it: `queued` (position), `progress`
    (least advanced image's step of steps, images done), then `done` (the job, as GET /v1/jobs/{id} answers it) or
    `error` (the error body plus its status; a cancelled job: error `cancelled`)."""
    store, job = await _job(request, state, job_id)
    return EventSourceResponse(_events(store, job.id, job.owner), ping=15)


async def _events(store: JobStore, job_id: str, owner: str):
    rid = REQUEST_ID.get()
    last: Any = None
    while True:
        job = await store.get(job_id, owner)
        if job is None:
            yield _event("error", {"status": 404, "error": Outcome.NOT_FOUND, "message": f"job {job_id} is gone"}, rid)
            return
        if job.status == SUCCEEDED:
            yield _event("done", await job_status(store, job), rid)
            return
        if job.status in (FAILED, CANCELLED):
            err = job.error or {"status": 409, "error": "cancelled", "message": f"job {job_id} was cancelled"}
            yield _event("error", err, rid)
            return
        now = (job.status, job.step, job.images_done, await store.position(job) if job.status == QUEUED else None)
        if now != last:
            if job.status == QUEUED:
                yield _event("queued", {"position": now[3]}, rid)
            else:
                yield _event("progress", {"step": job.step, "of": job.steps, "images_done": job.images_done,
                                          "num_images": job.num_images}, rid)
            last = now
        await asyncio.sleep(EVENT_POLL_S)


def _event(name: str, payload: dict[str, Any], rid: str) -> ServerSentEvent:
    return ServerSentEvent(event=name, data=json.dumps({**payload, "request_id": rid}, separators=(",", ":")))


