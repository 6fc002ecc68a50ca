"""Dependencies of the routes, as `Annotated` aliases: the service state, and the API-key check."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

from service.state import AppState


def get_state(request: Request) -> AppState:
    return request.app.state.dualrate


StateDep = Annotated[AppState, Depends(get_state)]


class Unauthorized(Exception):
    """Missing or wrong API key; answered 401 by `service.api.answers`."""


def authorize(request: Request, state: StateDep) -> None:
    keys = state.settings.api_key_bytes
    if not keys:
        return
    header = request.headers.get("authorization", "")
    token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
    # Compare bytes: compare_digest refuses non-ASCII str, and a client may send any header bytes (latin-1).
    presented = token.encode("utf-8", errors="surrogateescape")
    if not any(secrets.compare_digest(presented, k) for k in keys):
        raise Unauthorized()


Authorized = Depends(authorize)
