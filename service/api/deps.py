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


def key_ok(keys: list[bytes], authorization: str) -> bool:
    """Whether an Authorization header value carries one of `keys` (none configured: every request passes). The
    scheme is case-insensitive (RFC 9110): Bearer, bearer, BEARER."""
    if not keys:
        return True
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    # Compare bytes: compare_digest refuses non-ASCII str, and a client may send any header bytes (latin-1).
    presented = token.strip().encode("utf-8", errors="surrogateescape")
    return any(secrets.compare_digest(presented, k) for k in keys)


async def authorize(request: Request, state: StateDep) -> None:
    if not key_ok(state.settings.api_key_bytes, request.headers.get("authorization", "")):
        raise Unauthorized()


Authorized = Depends(authorize)
