"""ASGI middleware in front of the app (beside `service.http_limits`, which bounds the HTTP layer below it): the
request's id (`RequestContext`, outermost), the body limit, the JSON checks the parser cannot name, the
API key before the body, and `nosniff` on every answer."""

from __future__ import annotations

import json
import re

from fastapi import APIRouter
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.deps import authorize, key_ok
from service.core import REQUEST_ID, REQUEST_ID_HEADER, TRACING, accept_request_id

_HEADER = REQUEST_ID_HEADER.encode()


class RequestContext:
    """Every HTTP request's id: the client's `X-Request-ID` when it is 1-128 plain characters, else a new one
    (`service.core.accept_request_id`). It is set as the request's context (`service.core.REQUEST_ID`: the log lines
    about the request, the error bodies, the stream's events and the spec sent to the engine core read it there) and
    echoed in the answer's X-Request-ID header. (The request's trace span is FastAPI's own: `service.app`.)"""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = accept_request_id(Headers(scope=scope).get(REQUEST_ID_HEADER))
        # Not reset afterwards: each request runs in its own task (a copy of the context), and the 500 handler, which
        # Starlette runs outside this middleware, still reads it (service.api.answers adds the header there).
        REQUEST_ID.set(rid)
        echo = (_HEADER, rid.encode())
        if TRACING.tracer is not None:  # on FastAPI's server span of this request
            from opentelemetry import trace

            trace.get_current_span().set_attribute("dualrate.request_id", rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start" and not any(
                    k.lower() == _HEADER for k, _ in message.get("headers", [])):
                message = {**message, "headers": [*message.get("headers", []), echo]}
            await send(message)

        await self.app(scope, receive, send_with_id)


def huge_number_message(text: str) -> str:
    """What to tell a client whose JSON body holds a number of more digits than Python reads (4,300): which field,
    how long it is, and what the field takes."""
    m = re.search(r'"([^"\\]{1,64})"\s*:\s*-?(\d{4000,})', text)
    field, digits = (m.group(1), len(m.group(2))) if m else ("a number", None)
    what = f"{field}: a number of {digits} digits" if digits else "a number in the JSON body has thousands of digits"
    return (f"{what} is far beyond what any field takes: seed is an integer from 0 to {2**53 - 1} (16 digits), the "
            "other numbers are small (see /v1/model's limits)")


def protected_paths(routers: list[APIRouter]) -> frozenset[str]:
    """The paths of the routes that depend on the API key (`Depends(authorize)` on the route or on its router)."""
    out = set()
    for router in routers:
        whole = any(d.dependency is authorize for d in router.dependencies)
        for r in router.routes:
            if isinstance(r, APIRoute) and (whole or any(d.call is authorize for d in r.dependant.dependencies)):
                out.add(r.path)
    return frozenset(out)


class BodyLimit:
    """Refuses request bodies over `max_bytes` (413) without reading past the limit: by Content-Length when the client
    sends one, else by counting the chunks. A JSON body is read whole on the app's first `receive` and checked for
    what the JSON parser would only call "an error parsing the body": not UTF-8 (RFC 8259 JSON is UTF-8; Python's
    parser would also take UTF-16 and UTF-32), nested too deeply for the parser, or a number of more digits than
    Python converts; each gets a 400 that names it. (Syntax errors go on to the app's 422, with their position.) The
    errors are raised from `receive`, so the app's error handler (the one place errors become answers) answers and
    counts them. Starlette's own limiter answers in plain text instead. Every answer carries X-Content-Type-Options:
    nosniff."""

    def __init__(self, app: ASGIApp, max_bytes: int, keys: list[bytes] | None = None,
                 protected: frozenset[str] = frozenset()) -> None:
        """`protected`: the paths whose routes declare the API key (`service.api.deps.Authorized`), read off the
        routes by `protected_paths`: which routes need a key is said once, where each route is declared."""
        self.app, self.max_bytes, self.keys, self.protected = app, max_bytes, keys or [], protected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        is_json = headers.get("content-type", "").split(";")[0].strip().lower().endswith("json")
        seen = 0
        whole: list[Message] = []

        async def read() -> Message:
            nonlocal seen
            if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                raise StarletteHTTPException(413)
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise StarletteHTTPException(413)
            return message

        # The API key before the body: a request without a valid key learns nothing about its body (401, not 422).
        protected = scope["path"] in self.protected
        key_checked = not protected or key_ok(self.keys, headers.get("authorization", ""))

        async def limited() -> Message:
            if not key_checked:  # an HTTPException: FastAPI turns other errors while reading the body into 400
                raise StarletteHTTPException(401, headers={"WWW-Authenticate": "Bearer"})
            if not is_json or whole:
                return await read()
            parts, message = [], await read()
            while message["type"] == "http.request":
                parts.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
                message = await read()
            if message["type"] != "http.request":
                return message  # the client went away mid-body
            body = b"".join(parts)
            _check_json(body)
            whole.append(message)
            return {"type": "http.request", "body": body, "more_body": False}

        async def send_nosniff(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-content-type-options", b"nosniff")]}
            await send(message)

        await self.app(scope, limited, send_nosniff)


def _check_json(body: bytes) -> None:
    """400 for a JSON body the parser cannot take for a reason other than its syntax (see BodyLimit)."""
    if not body:
        return
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise StarletteHTTPException(400, f"the body is not UTF-8 (byte {e.start}): JSON bodies must be UTF-8 encoded"
                                     ) from None
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return  # the app answers 422 with the position
    except RecursionError:
        raise StarletteHTTPException(400, "the JSON body is nested too deeply to parse (keep it under ~900 levels)"
                                     ) from None
    except ValueError:
        raise StarletteHTTPException(400, huge_number_message(text)) from None
