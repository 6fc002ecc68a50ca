"""Which routes need a key is said once, where each route is declared (`Authorized`); the middleware that checks the
key before the body reads that list off the routers."""

from __future__ import annotations

from fastapi import APIRouter

from service.api import ROUTERS
from service.api.deps import Authorized
from service.middleware import protected_paths


def test_the_protected_paths_are_read_off_the_route_declarations():
    assert protected_paths(ROUTERS) == {"/generate", "/generate/stream", "/v1/model", "/v1/models", "/v1/models/{name}",
                                        "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events",
                                        "/v1/jobs/{job_id}/images/{index}.png"}
    whole, one = APIRouter(dependencies=[Authorized]), APIRouter()
    whole.add_api_route("/a", lambda: None)
    one.add_api_route("/b", lambda: None, dependencies=[Authorized])
    one.add_api_route("/open", lambda: None)
    assert protected_paths([whole, one]) == {"/a", "/b"}
