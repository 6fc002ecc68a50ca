"""Dependencies of the routes, as `Annotated` aliases: the service state, and the API-key check."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

from service.state import AppState


# Both are `async def`: FastAPI runs a plain `def` dependency in a worker thread, a round trip per request that the
# event loop pays for (and on two cores takes from the tick loop).
async def get_state(request: Request) -> AppState:
    return request.app.state.dualrate


StateDep = Annotated[AppState, Depends(get_state)]


class Unauthorized(Exception):
    """Missing or wrong API key; answered 401 by `service.api.answers`."""


async def authorize(request: Request, state: StateDep) -> None:
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
