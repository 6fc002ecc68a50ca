"""Issue 36, items 7-9: one request tied together across the service's processes. Its X-Request-ID (accepted when
plain, else replaced) is echoed, in its error bodies and stream events, and on the log lines about it in both the
front end and the engine core process; DUALRATE_LOG_FORMAT=json writes one JSON object per line; with the standard
OTEL_* variables set, its spans reach a real OTLP/HTTP receiver on loopback from both processes, linked to the
client's traceparent."""

from __future__ import annotations

import json
import logging
import os
import re
import time

import httpx
import pytest

from loadtests.otlp import OtlpReceiver
from service.core.telemetry import REQUEST_ID, JsonFormatter, RequestIdFilter, accept_request_id, tracing_requested

HEX32 = re.compile(r"[0-9a-f]{32}")


def test_a_plain_request_id_is_kept_and_anything_else_replaced():
    assert accept_request_id("req-42_a.b:c/d@e+f=g~h") == "req-42_a.b:c/d@e+f=g~h"
    assert accept_request_id("a" * 128) == "a" * 128
    for bad in (None, "", "a" * 129, "has space", "new\nline", "quote\"", "ünïcode", "<script>"):
        got = accept_request_id(bad)
        assert HEX32.fullmatch(got), (bad, got)
    assert accept_request_id(None) != accept_request_id(None)  # a new one each time


def test_json_lines_carry_the_request_id_and_the_fields_given():
    formatter, flt = JsonFormatter("front end"), RequestIdFilter()
    record = logging.LogRecord("service", logging.INFO, __file__, 1, "answered %s", ("ok",), None)
    token = REQUEST_ID.set("abc")
    try:
        assert flt.filter(record)
    finally:
        REQUEST_ID.reset(token)
    line = json.loads(formatter.format(record))
    assert line["message"] == "answered ok" and line["request_id"] == "abc" and line["level"] == "info"
    assert line["logger"] == "service" and line["process"] == "front end" and line["time"].endswith("Z")
    # A core line about a request: its id and fields come with the record (the core's thread has no context).
    record = logging.LogRecord("service.core.loop", logging.ERROR, __file__, 1, "request failed", None, None)
    record.request_id, record.error_id = "r-7", "e1"
    flt.filter(record)
    line = json.loads(formatter.format(record))
    assert (line["request_id"], line["error_id"]) == ("r-7", "e1")
    # No request: no request_id key (not an empty one).
    record = logging.LogRecord("service", logging.INFO, __file__, 1, "ready", None, None)
    flt.filter(record)
    assert "request_id" not in json.loads(formatter.format(record))


def test_traces_are_off_unless_the_standard_variables_ask():
    assert not tracing_requested({})
    assert tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert tracing_requested({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"})
    assert tracing_requested({"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing_requested({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    assert not tracing_requested({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})


# ---- one real service: the engine core in its own process, JSON logs at debug, traces to a receiver -----------------

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def receiver():
    with OtlpReceiver() as rx:
        yield rx


@pytest.fixture(scope="module")
def traced(start_server, receiver):
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50",
           "OTEL_SERVICE_NAME": "dualrate-test"}
    env.pop("OTEL_SDK_DISABLED", None)
    return start_server(engine_process="on", log_format="json", log_level="debug", max_active_images=4,
                        max_images_per_request=2, queue_size=8, max_steps=64, env=env)


def log_lines(srv) -> list[dict]:
    lines = [ln for ln in srv.log().splitlines() if ln.strip()]
    parsed = [json.loads(ln) for ln in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "process", "message"} <= set(p) for p in parsed)
    return parsed


def test_a_request_id_is_echoed_and_on_the_log_lines_of_both_processes(traced):
    r = httpx.post(f"{traced.url}/generate", json={"class_label": 3, "steps": 8, "seed": 1},
                   headers={"X-Request-ID": "it-took-both-processes"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "it-took-both-processes" == r.json()["request_id"]
    # The core writes its line after it has handed the result over: on a busy machine it may land just after the
    # answer. Read the log until both processes' lines are there (or 10 s pass).
    deadline = time.monotonic() + 10
    while True:
        lines = [ln for ln in log_lines(traced) if ln.get("request_id") == "it-took-both-processes"]
        by_process = {ln["process"] for ln in lines}
        if {"engine-core", "service"} <= by_process or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert "engine-core" in by_process and "service" in by_process, lines
    (core_line,) = [ln for ln in lines if ln["process"] == "engine-core"]
    assert core_line["outcome"] == "ok" and core_line["images"] == 1  # the request's fields, not only its id
    (access,) = [ln for ln in lines if ln["logger"] == "uvicorn.access"]
    assert (access["method"], access["path"], access["status"]) == ("POST", "/generate", 200)
    pids = {ln["pid"] for ln in lines}
    assert len(pids) == 2  # two processes


def test_a_bad_request_id_is_replaced_and_error_bodies_carry_it(traced):
    r = httpx.post(f"{traced.url}/generate", json={"class_label": 99}, headers={"X-Request-ID": "no spaces allowed"},
                   timeout=30)
    assert r.status_code == 422
    rid = r.headers["x-request-id"]
    assert HEX32.fullmatch(rid) and r.json()["request_id"] == rid
    r = httpx.get(f"{traced.url}/no-such-path", headers={"X-Request-ID": "nf-1"}, timeout=30)
    assert r.status_code == 404 and r.json()["request_id"] == "nf-1" and r.headers["x-request-id"] == "nf-1"
    r = httpx.get(f"{traced.url}/health/ready", timeout=30)  # every answer, probes too
    assert HEX32.fullmatch(r.headers["x-request-id"])


def test_every_stream_event_carries_the_request_id(traced):
    with httpx.stream("POST", f"{traced.url}/generate/stream", json={"class_label": 1, "steps": 8,
                                                                     "preview_every": 4},
                      headers={"X-Request-ID": "stream-1"}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["x-request-id"] == "stream-1"
        data = [json.loads(ln[5:]) for ln in r.iter_lines() if ln.startswith("data:")]
    assert len(data) >= 3 and all(d["request_id"] == "stream-1" for d in data)


def test_one_requests_spans_link_across_both_processes_under_the_clients_trace(traced, receiver):
    r = httpx.post(f"{traced.url}/generate", json={"class_label": 5, "num_images": 2, "steps": 8, "seed": 3},
                   headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", "X-Request-ID": "traced-1"},
                   timeout=60)
    assert r.status_code == 200
    names = {"POST /generate", "validate", "encode_png", "core.queue", "core.generate"}

    def complete(spans) -> bool:
        return names <= {s.name for s in spans if s.trace_id == CLIENT_TRACE}

    spans = {s.name: s for s in receiver.wait_for(complete, timeout=20) if s.trace_id == CLIENT_TRACE}
    assert names <= set(spans), sorted(spans)
    server = spans["POST /generate"]
    assert server.parent_span_id == CLIENT_SPAN  # the client's traceparent honoured
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["dualrate.request_id"] == "traced-1"
    for child in ("validate", "encode_png", "core.queue", "core.generate"):
        assert spans[child].parent_span_id == server.span_id, child
    # The core's spans come from the engine core process, the others from the front end.
    front, core = server.resource["process.pid"], spans["core.generate"].resource["process.pid"]
    assert front != core
    assert spans["validate"].resource["dualrate.process"] == "front end"
    assert spans["core.generate"].resource["dualrate.process"] == "engine core"
    assert server.resource["service.name"] == "dualrate-test"
    gen = spans["core.generate"].attributes
    assert gen["dualrate.ticks"] == 8 and gen["dualrate.images"] == 2 and gen["dualrate.light_calls_per_image"] == 8
    assert gen["dualrate.encoder_calls_per_image"] >= 1 and gen["dualrate.outcome"] == "ok"
    # Nested in time: queue then generate, inside the request's span.
    assert server.start_ns <= spans["core.queue"].start_ns <= spans["core.generate"].start_ns
    assert spans["core.generate"].end_ns <= server.end_ns


@pytest.mark.slow  # a fresh interpreter importing the service (torch and all): seconds
def test_with_tracing_off_the_service_does_not_load_the_opentelemetry_sdk():
    """No OTEL_* variable: the service's modules load without OpenTelemetry's SDK or exporter (FastAPI itself imports
    the API package), and tracing does not start (the hooks test one attribute; docs/operations.md measures what that
    costs)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    code = ("import sys, service.__main__, service.app, service.core.loop, service.core.engine_core\n"
            "from service.core import TRACING\n"
            "assert not TRACING.start('test'), 'tracing started'\n"
            "loaded = [m for m in sys.modules if m.startswith(('opentelemetry.sdk', 'opentelemetry.exporter'))]\n"
            "assert not loaded, loaded\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
