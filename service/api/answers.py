"""The one place a service error becomes an HTTP answer and its outcome is counted (dualrate_requests_total by
kind): for plain responses (`error_response`, the exception handlers) and for the `error` event of a stream
(`error_event`), which carries the same kind and status."""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.deps import Unauthorized
from service.core import (
    EngineFailure,
    InternalError,
    LimitError,
    Outcome,
    QueueFull,
    ServiceError,
    UnknownModel,
    new_error_id,
)
from service.schemas import ErrorBody
from service.state import AppState

log = logging.getLogger("service")

# Statuses that the framework raises (routing, body reading) -> the error kind of the documented error body.
HTTP_KINDS = {400: Outcome.INVALID_REQUEST, 401: Outcome.UNAUTHORIZED, 404: Outcome.NOT_FOUND,
              405: Outcome.METHOD_NOT_ALLOWED, 413: Outcome.PAYLOAD_TOO_LARGE, 415: Outcome.UNSUPPORTED_MEDIA_TYPE}


UNAUTHORIZED_MESSAGE = "missing or wrong API key: send Authorization: Bearer <key>"


def error_response(state: AppState, status: int, kind: str, message: str, seconds: float = 0.0, *,
                   error_id: str | None = None, details: list | None = None,
                   headers: dict[str, str] | None = None, model: str = "") -> JSONResponse:
    """An error answer in the documented body, counted by kind (and model: "" where none is known)."""
    state.metrics.request_answered(kind, seconds, model=model)
    body = ErrorBody(error=kind, message=message, error_id=error_id, details=details)
    if body.request_id:  # also set by service.middleware.RequestContext, except on the 500 answered outside it
        headers = {**(headers or {}), "X-Request-ID": body.request_id}
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


def describe(e: ServiceError) -> tuple[int, ErrorBody, dict[str, str] | None]:
    """A service error -> (HTTP status, error body, headers). The status and kind are the error class's own."""
    if isinstance(e, LimitError):
        return e.status, ErrorBody(error=e.kind, message=f"invalid field(s): {', '.join(f for f, _ in e.fields)}",
                                   details=[{"field": f, "message": m} for f, m in e.fields]), None
    if isinstance(e, UnknownModel):
        return e.status, ErrorBody(error=e.kind, message=str(e), details=[{"field": "model", "message": str(e),
                                                                           "models": e.models}]), None
    if isinstance(e, QueueFull):
        return e.status, ErrorBody(error=e.kind, message=str(e)), {"Retry-After": str(math.ceil(e.retry_after_s))}
    if isinstance(e, EngineFailure | InternalError):
        return e.status, ErrorBody(error=e.kind, message=str(e), error_id=e.error_id), None
    return e.status, ErrorBody(error=e.kind, message=str(e)), None


def service_error_response(state: AppState, e: ServiceError, seconds: float = 0.0, model: str = "") -> JSONResponse:
    status, body, headers = describe(e)
    return error_response(state, status, body.error, body.message, seconds, error_id=body.error_id,
                          details=body.details, headers=headers, model=model)


def error_event(state: AppState, e: ServiceError, seconds: float, model: str = "") -> dict[str, Any]:
    """The payload of a stream's `error` event: the error body /generate would send, plus its status; counted."""
    status, body, _ = describe(e)
    state.metrics.request_answered(body.error, seconds, model=model)
    return {"status": status, **body.model_dump(exclude_none=True)}


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


# Fields whose schema is a choice (an integer or a string): pydantic's message names each alternative's failure ("Input
# should be greater than or equal to 1 or Input should be 'auto'"); the client is told what the field takes instead.
FIELD_MESSAGES = {
    "encoder_interval": 'must be an integer K >= 1 (the heavy encoder runs every K-th step; 1 = every step) or "auto" '
                        "(the service picks K by load), or left out (the model card's K)",
}


def _validation_details(exc: RequestValidationError) -> tuple[str, list[dict]]:
    """-> (message, details) for a request that failed parsing or validation (422)."""
    errors = exc.errors()
    bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if bad_json is not None:
        pos = bad_json["loc"][-1]
        why = (bad_json.get("ctx") or {}).get("error", "JSON decode error")
        msg = f"the body is not valid JSON: {why} at position {pos}"
        return msg, [{"field": "body", "message": msg}]
    # One detail per request field: a field with alternatives (encoder_interval: an integer or "auto") fails once per
    # alternative, with the alternative's tag in its location; those become one message.
    by_field: dict[str, list[str]] = {}
    for e in errors:
        loc = [p for p in e["loc"] if p != "body"]
        field = str(loc[0]) if loc else ""
        message = e["msg"]
        if e.get("type") == "finite_number":
            message = "must be a finite number (NaN and infinity are not accepted)"
        elif e.get("type") == "missing" and not field:
            message = "a JSON object body is required"
        elif field in FIELD_MESSAGES and e.get("type") != "missing":
            message = FIELD_MESSAGES[field]
        by_field.setdefault(field or "body", []).append(message)
    details = [{"field": f, "message": " or ".join(dict.fromkeys(m))} for f, m in by_field.items()]
    return f"invalid field(s): {', '.join(d['field'] for d in details)}", details


def allowed_methods(request: Request) -> list[str]:
    """The methods of every route whose path matches the request's (a 405's Allow header)."""
    from starlette.routing import Match

    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match in (Match.FULL, Match.PARTIAL):
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app or the framework raises is answered here, in the documented error body."""

    def state_of(request: Request) -> AppState:
        return request.app.state.dualrate

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        state = state_of(request)
        if request.method == "POST" and not _is_json(request.headers.get("content-type")):
            got = request.headers.get("content-type") or "no content type"
            return error_response(state, 415, "unsupported_media_type",
                                  f"expected a JSON body with content-type application/json, got {got}")
        message, details = _validation_details(exc)
        return error_response(state, 422, "invalid_request", message, details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        state = state_of(request)
        kind = HTTP_KINDS.get(exc.status_code, Outcome.INVALID_REQUEST if exc.status_code < 500 else Outcome.INTERNAL)
        message = str(exc.detail)
        if exc.status_code == 400 and message == "There was an error parsing the body":
            message = "the body could not be read as JSON"
        elif exc.status_code == 401:
            message = UNAUTHORIZED_MESSAGE
        elif exc.status_code == 404:
            message = f"no such path: {request.url.path} (see /docs)"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # every method the path takes (Starlette names only the first route's)
            headers["Allow"] = ", ".join(allowed_methods(request))
        if exc.status_code == 413:
            message = f"the request body is larger than {state.settings.max_body_bytes} bytes (DUALRATE_MAX_BODY_BYTES)"
            headers["Connection"] = "close"  # the rest of the body is not read: the connection ends with this answer
        return error_response(state, exc.status_code, kind, message, headers=headers or None)

    @app.exception_handler(Unauthorized)
    async def _unauth(request: Request, exc: Exception) -> JSONResponse:
        return error_response(state_of(request), 401, "unauthorized", UNAUTHORIZED_MESSAGE,
                              headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError) -> JSONResponse:
        return service_error_response(state_of(request), exc)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        error_id = new_error_id()
        log.exception("internal error %s on %s %s", error_id, request.method, request.url.path)
        return error_response(state_of(request), 500, "internal", f"internal error (error id {error_id})",
                              error_id=error_id)
