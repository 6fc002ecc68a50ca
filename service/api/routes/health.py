"""Liveness, readiness (503 while starting or draining) and Prometheus metrics; open without an API key."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.deps import StateDep
from service.core import Outcome, ServiceError
from service.schemas import ErrorBody

router = APIRouter()


@router.get("/health/live", tags=["health"], responses={503: {"model": ErrorBody}})
async def live(state: StateDep) -> Response:
    if state.core_dead is not None:  # the engine core process stopped: restart the pair
        body = ErrorBody(error=Outcome.UNAVAILABLE, message=state.core_dead)
        return JSONResponse(body.model_dump(exclude_none=True), status_code=503)
    return JSONResponse({"status": "alive"})


@router.get("/health/ready", tags=["health"], responses={503: {"model": ErrorBody}})
async def ready(state: StateDep) -> Response:
    if state.core_dead is not None or not state.ready or state.draining:
        why = state.core_dead or ("draining" if state.draining else state.starting)
        body = ErrorBody(error=Outcome.UNAVAILABLE, message=why)
        return JSONResponse(body.model_dump(exclude_none=True), status_code=503)
    return JSONResponse({"status": "ready"})


@router.get("/metrics", tags=["ops"], response_class=Response)
async def metrics(state: StateDep) -> Response:
    status = None
    if state.core is not None and state.core_dead is None:
        try:
            status = await state.core.status()
        except (TimeoutError, ServiceError):
            status = None  # the core's series are left out of this scrape; the front end's are there
    state.metrics.core_status(status)
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
