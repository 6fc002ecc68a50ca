"""A real OTLP/HTTP trace receiver on loopback, for the tests and the tracing benchmark: it takes what an
OpenTelemetry exporter POSTs to `/v1/traces` (protobuf `ExportTraceServiceRequest`, or its JSON form), decodes it
with the OpenTelemetry proto package, and keeps every span with its resource's attributes.

    with OtlpReceiver() as rx:                  # OTEL_EXPORTER_OTLP_ENDPOINT=rx.endpoint for the service
        ...
        spans = rx.wait_for(lambda spans: len(spans) >= 5, timeout=10)
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from google.protobuf.json_format import Parse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


@dataclass
class Span:
    name: str
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str  # "" for a root span
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)
    resource: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


class OtlpReceiver:
    """Listens on 127.0.0.1 (a free port) until closed; `spans` holds every span received, in arrival order."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.requests = 0
        self._cv = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                msg = ExportTraceServiceRequest()
                if "json" in self.headers.get("content-type", ""):
                    Parse(body, msg)
                else:
                    msg.ParseFromString(body)
                receiver._add(msg)
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True)
        self._thread.start()

    def _add(self, msg: ExportTraceServiceRequest) -> None:
        got = []
        for rs in msg.resource_spans:
            resource = _attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(Span(s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.kind,
                                    s.start_time_unix_nano, s.end_time_unix_nano, _attrs(s.attributes), resource))
        with self._cv:
            self.requests += 1
            self.spans.extend(got)
            self._cv.notify_all()

    def wait_for(self, done: Callable[[list[Span]], bool], timeout: float = 10.0) -> list[Span]:
        """The spans once `done(spans)` holds; the spans so far after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while not done(self.spans) and time.monotonic() < deadline:
                self._cv.wait(max(0.0, deadline - time.monotonic()))
            return list(self.spans)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> OtlpReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
