"""Rough edges a new user hit (issue 9), each against a real server on loopback: parse errors, content types,
strict integers, the error shape of framework errors, the body cap, NaN, K bounds, auth with odd tokens, counting."""

from __future__ import annotations

import json

import httpx
import pytest

from loadtests.process import metric
from service.schemas import MAX_SEED


def post(server, content: bytes, content_type: str | None = "application/json") -> httpx.Response:
    headers = {"content-type": content_type} if content_type else {}
    return httpx.post(f"{server.url}/generate", content=content, headers=headers, timeout=30)


def test_malformed_json_names_the_syntax_error_and_position(server):
    r = post(server, b'{"class_label": 3,, "seed": 1}')
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "invalid_request"
    assert "not valid JSON" in body["message"] and "position 18" in body["message"], body
    assert [d["field"] for d in body["details"]] == ["body"]  # not the byte offset as a field name


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_missing_or_wrong_content_type_gives_415(server, content_type):
    r = post(server, b'{"class_label": 3}', content_type)
    assert r.status_code == 415, r.text
    assert r.json()["error"] == "unsupported_media_type"
    assert "application/json" in r.json()["message"]


@pytest.mark.parametrize(
    ("payload", "field"),
    [({"class_label": True}, "class_label"), ({"class_label": "7"}, "class_label"), ({"steps": True}, "steps"),
     ({"seed": False}, "seed"), ({"num_images": "2"}, "num_images"), ({"encoder_interval": 2.5}, "encoder_interval"),
     ({"seed": MAX_SEED + 1}, "seed")],
)
def test_integers_are_strict(server, payload, field):
    r = httpx.post(f"{server.url}/generate", json=payload, timeout=30)
    assert r.status_code == 422, r.text
    assert [d["field"] for d in r.json()["details"]] == [field]


def test_a_whole_number_written_as_a_float_is_an_integer(server):
    """JSON Schema's "integer" includes 2.0: a schema-valid request is taken."""
    r = httpx.post(f"{server.url}/generate", json={"class_label": 1.0, "steps": 4.0, "encoder_interval": 2.0,
                                                   "num_images": 1.0, "seed": 5.0}, timeout=60)
    assert r.status_code == 200, r.text
    assert (r.json()["steps"], r.json()["encoder_interval"], r.json()["images"][0]["seed"]) == (4, 2, 5)


@pytest.mark.parametrize("value", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_guidance_is_rejected_as_non_finite(server, value):
    r = post(server, b'{"class_label": 1, "guidance_scale": ' + value + b"}")
    assert r.status_code == 422, r.text
    assert "finite" in r.json()["details"][0]["message"]


def test_framework_errors_use_the_documented_error_shape(server):
    r404 = httpx.get(f"{server.url}/nope")
    r405 = httpx.get(f"{server.url}/generate")
    r400 = post(server, b'{"class_label": "\xff\xfe"}')
    for r, status, kind in ((r404, 404, "not_found"), (r405, 405, "method_not_allowed"), (r400, 400, "invalid_request")):
        assert r.status_code == status, r.text
        body = r.json()
        assert set(body) == {"error", "message", "request_id"} and body["error"] == kind, body
        assert body["request_id"] == r.headers["x-request-id"]  # the request's id, in the body and the header
    assert "UTF-8" in r400.json()["message"]


def test_oversized_body_gives_413_and_is_counted(server):
    before = httpx.get(f"{server.url}/metrics").text
    big = json.dumps({"class_label": 1, "pad": "x" * 200_000}).encode()
    r = post(server, big)
    assert r.status_code == 413, r.text
    assert r.json()["error"] == "payload_too_large"
    after = httpx.get(f"{server.url}/metrics").text
    key = ("dualrate_requests_total", 'outcome="payload_too_large"')
    assert metric(after, *key) == metric(before, *key) + 1


def test_parse_errors_and_404s_are_counted(server):
    before = httpx.get(f"{server.url}/metrics").text
    post(server, b'{"class_label": "\xff"}')
    httpx.get(f"{server.url}/nope")
    after = httpx.get(f"{server.url}/metrics").text
    for outcome in ("invalid_request", "not_found"):
        key = ("dualrate_requests_total", f'outcome="{outcome}"')
        assert metric(after, *key) == metric(before, *key) + 1, outcome


@pytest.mark.parametrize("k", [10**100, 4097, 129])
def test_encoder_interval_is_bounded(server, k):
    r = httpx.post(f"{server.url}/generate", json={"class_label": 1, "steps": 8, "encoder_interval": k}, timeout=30)
    assert r.status_code == 422, r.text
    assert r.json()["details"][0]["field"] == "encoder_interval"


def test_k_equal_to_steps_is_accepted(server):
    r = httpx.post(f"{server.url}/generate", json={"class_label": 1, "steps": 4, "encoder_interval": 4}, timeout=60)
    assert r.status_code == 200 and r.json()["encoder_calls"] == 1


def test_k_above_steps_runs_like_k_equal_to_steps(server):
    body = {"class_label": 1, "steps": 4, "seed": 3}
    same = httpx.post(f"{server.url}/generate", json={**body, "encoder_interval": 4}, timeout=60).json()
    above = httpx.post(f"{server.url}/generate", json={**body, "encoder_interval": 9}, timeout=60)
    assert above.status_code == 200, above.text
    assert above.json()["encoder_calls"] == 1 and above.json()["encoder_interval"] == 9
    assert above.json()["images"][0]["png_base64"] == same["images"][0]["png_base64"]


def test_schema_publishes_integer_limits(server):
    spec = httpx.get(f"{server.url}/openapi.json").json()
    seed = spec["components"]["schemas"]["GenerateRequest"]["properties"]["seed"]["anyOf"][0]
    assert seed["maximum"] == MAX_SEED and isinstance(seed["maximum"], int)
    assert "4.6116" not in httpx.get(f"{server.url}/openapi.json").text


@pytest.fixture(scope="module")
def keyed(start_server):
    return start_server(max_active_images=2, max_images_per_request=1, api_keys="k-one, k-two")


def test_comma_separated_keys_and_odd_tokens(keyed):
    url = f"{keyed.url}/generate"
    body = {"class_label": 1, "steps": 2, "encoder_interval": 1}
    assert httpx.post(url, json=body, headers={"authorization": "Bearer k-two"}, timeout=60).status_code == 200
    odd = [b"Bearer \xd0\xba\xd0\xbb\xd1\x8e\xd1\x87", b"Bearer \xff", b"Basic abc", b"Bearer k-one-and-more"]
    for token in odd:
        r = httpx.post(url, json=body, headers={"authorization": token}, timeout=30)
        assert r.status_code == 401, (token, r.text)
        assert r.json()["error"] == "unauthorized"
    assert "Traceback" not in keyed.log()
    assert httpx.get(f"{keyed.url}/metrics").status_code == 200  # documented: /metrics stays open


def test_the_service_raises_a_low_open_file_limit():
    """A soft limit of 1024 open files caps concurrent connections below a few hundred clients plus the libraries'
    files; the service raises it to the hard limit at start."""
    import resource

    from service.__main__ import raise_open_file_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 1024:
        pytest.skip(f"the hard limit here is {hard}: nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        raise_open_file_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] > 1024
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_with_keys_the_openapi_document_has_a_bearer_scheme_on_the_protected_routes(keyed, server):
    schema = httpx.get(f"{keyed.url}/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": "one of DUALRATE_API_KEYS, sent as Authorization: Bearer <key>"}
    paths = schema["paths"]
    for path in ("/generate", "/generate/stream", "/v1/model", "/v1/models", "/v1/models/{name}"):
        assert all(op["security"] == [{"bearer": []}] for op in paths[path].values()), path
    assert "security" not in paths["/health/ready"]["get"] and "security" not in paths["/metrics"]["get"]
    # Without keys: no scheme (Swagger UI offers no Authorize).
    assert "securitySchemes" not in httpx.get(f"{server.url}/openapi.json").json()["components"]
