"""What ties one request together across the service's processes: its request id, the log lines about it (text or
JSON), and its OpenTelemetry trace. Both processes use it (the HTTP front end and the engine core), so it lives in the
core, which imports nothing of the front end.

- **Request id** (`REQUEST_ID`, a context variable): the front end accepts a client's `X-Request-ID` when it is short
  and plain (`accept_request_id`), else makes one; it travels with the request into the core (`GenerationSpec`),
  where the core's log lines about the request carry it (`log_extra`).
- **Logs** (`setup_logging`): text (the default) or one JSON object per line (`DUALRATE_LOG_FORMAT=json`); every
  record about a request has its `request_id`, and the request's own fields where it has them (`extra=`).
- **Traces** (`Tracing`): off unless the standard OpenTelemetry variables ask for them (`OTEL_EXPORTER_OTLP_ENDPOINT`,
  `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_TRACES_EXPORTER`; `OTEL_SDK_DISABLED=true` wins). Off, no SDK is
  loaded and every hook is one attribute test. On, spans go to an OTLP/HTTP collector through a batch processor (a
  background thread: exporting never blocks the tick loop or the event loop). The request's server span is FastAPI's
  own instrumentation (`fastapi_config`); the route adds `validate` and `encode_png`, the engine core `core.queue`
  and `core.generate`, under the server span, whose context crosses the process boundary as a W3C `traceparent`
  string inside the request.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from contextlib import AbstractContextManager, nullcontext
from contextvars import ContextVar
from typing import Any

REQUEST_ID: ContextVar[str] = ContextVar("dualrate_request_id", default="")
REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID = 128
_ID_CHARS = re.compile(r"[A-Za-z0-9._~:@+=/-]{1," + str(MAX_REQUEST_ID) + "}")
LOG_FORMATS = ("text", "json")
# The standard variables that configure traces here (docker-compose passes them through; docs/operations.md).
OTEL_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER",
                  "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES")

# Attributes every LogRecord has; anything else on a record came from `extra=` (the request's fields).
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime",
                                                                                     "request_id", "rid"}


def accept_request_id(value: str | None) -> str:
    """The client's X-Request-ID if it is 1-128 characters of letters, digits and ._~:@+=/- (safe in a log line, a
    header and a JSON string), else a new random one (32 hex digits)."""
    if value and _ID_CHARS.fullmatch(value):
        return value
    return uuid.uuid4().hex


def log_extra(request_id: str, **fields: Any) -> dict[str, Any]:
    """`extra=` for a log line about a request logged outside its context (the engine core's thread)."""
    return {"request_id": request_id, **fields}


class RequestIdFilter(logging.Filter):
    """Puts the request id on every record: the one given in `extra=`, else the current request's (the context
    variable the front end sets per request), else none. `rid` is its text form (" request_id=..." or "")."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = getattr(record, "request_id", None) or REQUEST_ID.get()
        record.request_id = rid
        record.rid = f" request_id={rid}" if rid else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601 with milliseconds), level, logger, process (the front end, a
    worker, or the engine core), message, request_id where the record is about a request, the fields passed in
    `extra=`, and the exception's traceback where there is one."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        t = time.gmtime(record.created)
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "process": self.process,
            "pid": record.process,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", "")
        if rid:
            out["request_id"] = rid
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                out[key] = value
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            _, method, path, _, status = record.args  # uvicorn's access record: client, method, path, version, status
            out.update(method=method, path=path, status=status)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def setup_logging(level: str, fmt: str = "text", process: str = "") -> None:
    """The root logger of this process: `fmt` "text" (`time LEVEL [process ]logger: message request_id=...`) or
    "json" (JsonFormatter). `process` names it in each line ("" for a single front end)."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter(process or "service"))
    else:
        who = f"{process} " if process else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {who}%(name)s: %(message)s%(rid)s"))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


# ---- traces ------------------------------------------------------------------------------------------------------


def tracing_requested(env: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Whether the standard OpenTelemetry variables ask for traces."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return bool(exporter or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


class Tracing:
    """This process's tracer, or none. `tracer is None` (the default, and whenever OTEL_* do not ask for traces) is
    the only test the hot paths make."""

    def __init__(self) -> None:
        self.tracer: Any = None
        self._provider: Any = None

    def start(self, process: str, env: dict[str, str] | os._Environ[str] = os.environ) -> bool:
        """Start exporting if the environment asks for it: OTLP over HTTP/protobuf to OTEL_EXPORTER_OTLP_ENDPOINT
        (its /v1/traces) or ..._TRACES_ENDPOINT, or the console (`OTEL_TRACES_EXPORTER=console`). The resource's
        service.name is OTEL_SERVICE_NAME or "dualrate"; `process` becomes dualrate.process."""
        if not tracing_requested(env):
            return False
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

        exporter: SpanExporter
        kind = env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
        if kind == "console":
            exporter = ConsoleSpanExporter()
        elif kind == "otlp":
            protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", env.get("OTEL_EXPORTER_OTLP_PROTOCOL",
                                                                            "http/protobuf"))
            if protocol != "http/protobuf":
                raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol}: this service exports traces over "
                                 "http/protobuf only (point it at the collector's OTLP/HTTP port, 4318)")
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        else:
            raise ValueError(f"OTEL_TRACES_EXPORTER={kind}: this service knows otlp, console and none")
        resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", "dualrate"),
                                    "dualrate.process": process, "process.pid": os.getpid()})
        self._provider = TracerProvider(resource=resource)
        self._provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self._provider.get_tracer("dualrate")
        return True

    def fastapi_config(self, quiet_paths: frozenset[str] = frozenset()) -> dict[str, Any]:
        """FastAPI's own OpenTelemetry instrumentation (`FastAPI(telemetry=...)`): with traces on, a server span per
        request on this process's provider (named after its route, child of the client's `traceparent`, current
        while the route runs), none for `quiet_paths` (probes, scrapes); no per-dependency spans, no OpenTelemetry
        metrics or logs (Prometheus and the log lines have those). Off: nothing."""
        if self._provider is None:
            return {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}
        return {"tracer_provider": self._provider, "tracing": True, "metrics": False, "logs": False,
                "operation_spans": False, "exclude": lambda scope: scope.get("path") in quiet_paths}

    def shutdown(self) -> None:
        """Export what is left (at most a few seconds) and stop."""
        if self._provider is not None:
            self._provider.shutdown()
            self._provider, self.tracer = None, None

    # The helpers below are called only where `tracer` is set.

    @staticmethod
    def parent(traceparent: str) -> Any:
        """The context of a W3C traceparent string ("" or malformed: a new trace)."""
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        return TraceContextTextMapPropagator().extract({"traceparent": traceparent} if traceparent else {})

    @staticmethod
    def traceparent(span: Any) -> str:
        """The W3C traceparent of `span`, for the core on the other side of the process boundary."""
        ctx = span.get_span_context()
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"

    def span_between(self, name: str, traceparent: str, start_mono: float, end_mono: float,
                     attributes: dict[str, Any]) -> None:
        """A finished span `name` under `traceparent`, from and to time.monotonic() readings (the core's clock)."""
        offset = time.time_ns() - time.monotonic_ns()
        span = self.tracer.start_span(name, context=self.parent(traceparent), attributes=attributes,
                                      start_time=offset + int(start_mono * 1e9))
        span.end(end_time=offset + int(end_mono * 1e9))


TRACING = Tracing()  # this process's


def span(name: str, **attributes: Any) -> AbstractContextManager[Any]:
    """A child span of the current one around a block (nothing when tracing is off)."""
    if TRACING.tracer is None:
        return nullcontext()
    return TRACING.tracer.start_as_current_span(name, attributes=attributes)


def current_traceparent() -> str:
    """The W3C traceparent of the current span (in a route: the request's server span), sent with the request to the
    engine core, whose spans of it hang under it ("" when tracing is off)."""
    if TRACING.tracer is None:
        return ""
    from opentelemetry import trace

    current = trace.get_current_span()
    return TRACING.traceparent(current) if current.get_span_context().is_valid else ""
