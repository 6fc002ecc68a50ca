"""Liveness, readiness (503 while starting or draining) and Prometheus metrics; open without an API key."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import StateDep
from service.schemas import ErrorBody

router = APIRouter()


@router.get("/health/live", tags=["health"])
async def live() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/health/ready", tags=["health"], responses={503: {"model": ErrorBody}})
async def ready(state: StateDep) -> Response:
    if not state.ready or state.draining:
        body = ErrorBody(error="unavailable", message="draining" if state.draining else state.starting)
        return JSONResponse(body.model_dump(exclude_none=True), status_code=503)
    return JSONResponse({"status": "ready"})


@router.get("/metrics", tags=["ops"], response_class=Response)
async def metrics(state: StateDep) -> Response:
    if state.scheduler is not None:
        state.metrics.refresh(state.scheduler.snapshot())
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
