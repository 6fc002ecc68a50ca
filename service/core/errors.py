"""The service's domain errors; translated to HTTP in exactly one place (service.api.answers). Each carries its HTTP
status and the `kind` that names it in the error body and in `dualrate_requests_total{outcome}`."""

from __future__ import annotations

import uuid
from enum import StrEnum


def new_error_id() -> str:
    """The id an unexpected failure is logged under and answered with (12 hex digits)."""
    return uuid.uuid4().hex[:12]


class Outcome(StrEnum):
    """How a request ended: the `error` of its error body and the `outcome` label of dualrate_requests_total."""

    OK = "ok"
    INVALID_REQUEST = "invalid_request"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    QUEUE_FULL = "queue_full"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    UNAVAILABLE = "unavailable"
    ENGINE_ERROR = "engine_error"
    INTERNAL = "internal"


class ServiceError(Exception):
    status = 500
    kind = Outcome.INTERNAL


class QueueFull(ServiceError):
    status, kind = 429, Outcome.QUEUE_FULL

    def __init__(self, retry_after_s: float, message: str | None = None) -> None:
        super().__init__(message or f"the request queue is full; retry after {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


class NotReady(ServiceError):
    status, kind = 503, Outcome.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    status, kind = 504, Outcome.TIMEOUT


class Cancelled(ServiceError):
    status, kind = 499, Outcome.CANCELLED  # the client went away; nobody reads the answer


class EngineFailure(ServiceError):
    status, kind = 500, Outcome.ENGINE_ERROR

    def __init__(self, error_id: str, message: str) -> None:
        super().__init__(message)
        self.error_id = error_id


class InternalError(ServiceError):
    status, kind = 500, Outcome.INTERNAL

    def __init__(self, error_id: str) -> None:
        super().__init__(f"internal error (error id {error_id})")
        self.error_id = error_id


class UnknownModel(ServiceError):
    """A request names a model this service does not serve, or names none while several are served (404, with the
    list)."""

    status, kind = 404, Outcome.NOT_FOUND

    def __init__(self, name: str | None, models: list[str]) -> None:
        what = f"no model {name!r} is served here" if name is not None else "several models are served: name one"
        super().__init__(f"{what} (model: {', '.join(models)}; GET /v1/models lists them)")
        self.name, self.models = name, models


class LimitError(ServiceError):
    """Fields valid in themselves but beyond this server's limits or this model (422, naming each field)."""

    status, kind = 422, Outcome.INVALID_REQUEST

    def __init__(self, fields: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{f} {m}" for f, m in fields))
        self.fields = fields
