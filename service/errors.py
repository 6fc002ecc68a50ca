"""The service's domain errors; translated to HTTP in exactly one place (service.api.answers). Each carries its HTTP
status and the `kind` that names it in the error body and in `dualrate_requests_total{outcome}`."""

from __future__ import annotations

import uuid


def new_error_id() -> str:
    """The id an unexpected failure is logged under and answered with (12 hex digits)."""
    return uuid.uuid4().hex[:12]


class ServiceError(Exception):
    status = 500
    kind = "internal"


class QueueFull(ServiceError):
    status, kind = 429, "queue_full"

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"the request queue is full; retry after {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


class NotReady(ServiceError):
    status, kind = 503, "unavailable"


class DeadlineExceeded(ServiceError):
    status, kind = 504, "timeout"


class Cancelled(ServiceError):
    status, kind = 499, "cancelled"  # the client went away; nobody reads the answer


class EngineFailure(ServiceError):
    status, kind = 500, "engine_error"

    def __init__(self, error_id: str, message: str) -> None:
        super().__init__(message)
        self.error_id = error_id


class InternalError(ServiceError):
    status, kind = 500, "internal"

    def __init__(self, error_id: str) -> None:
        super().__init__(f"internal error (error id {error_id})")
        self.error_id = error_id
