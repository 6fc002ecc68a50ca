"""Liveness, readiness (503 while starting or draining) and Prometheus metrics; open without an API key."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.deps import StateDep
from service.core import Outcome, ServiceError
from service.schemas import ErrorBody
from service.state import AppState

router = APIRouter()


def _core_problem(state: AppState) -> str | None:
    """Why the engine core cannot serve: it stopped, or it is frozen (no heartbeat, or work and no tick)."""
    if state.core_dead is not None:
        return state.core_dead
    return state.frozen()


def _unavailable(why: str) -> JSONResponse:
    body = ErrorBody(error=Outcome.UNAVAILABLE, message=why)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=503, headers={"Retry-After": "5"})


@router.get("/health/live", tags=["health"], responses={503: {"model": ErrorBody}})
async def live(state: StateDep) -> Response:
    """503 when the engine core stopped or froze: an orchestrator restarts the pod."""
    why = _core_problem(state)
    return _unavailable(why) if why is not None else JSONResponse({"status": "alive"})


def _not_ready(state: AppState) -> str | None:
    """Why this replica takes no requests now (GET /health/ready's 503), or None."""
    why = _core_problem(state)
    if why is None and (not state.ready or state.draining):
        why = "draining" if state.draining else state.starting
    return why


@router.get("/health/ready", tags=["health"], responses={503: {"model": ErrorBody}})
async def ready(state: StateDep) -> Response:
    why = _not_ready(state)
    return _unavailable(why) if why is not None else JSONResponse({"status": "ready"})


@router.get("/metrics", tags=["ops"], response_class=Response)
async def metrics(state: StateDep) -> Response:
    healthy = state.core_dead is None
    for name, core in state.cores:
        status = None
        if healthy and core.frozen is None:
            try:
                status = await core.status()
            except (TimeoutError, ServiceError):
                status = None  # this core's series are left out of this scrape; the front end's are there
        state.metrics.core_status(status, name)
    state.metrics.core.ready = _not_ready(state) is None
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
