"""Run the service: `python -m service` (settings from DUALRATE_* environment variables; see README).

Signals (SIGTERM or SIGINT, alone or sent to the whole process group):

- the first starts a drain: new requests get 503 and /health/ready turns 503 while the socket stays open; every
  accepted request is answered; then the process exits with status 0.
- repeats within DUALRATE_SIGNAL_GRACE_S (default 5 s) of the first are logged and ignored: `make serve` forwards
  Ctrl-C to Python, which also gets it from the terminal, so one Ctrl-C arrives twice.
- a repeat after that grace period, or a drain longer than DUALRATE_DRAIN_TIMEOUT_S (default max_timeout_s + 10),
  cancels what is still queued or running (those requests get 503) and exits with status 1. The drain's clock is
  its own: nothing else's timeout stands in for it. If the engine core does not answer the cancellation within
  DUALRATE_CORE_HEARTBEAT_TIMEOUT_S (a frozen core), it is killed and every open request gets 503: every path of
  the drain ends in an exit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from types import FrameType

import uvicorn
from pydantic import ValidationError
from pydantic_settings import SettingsError

from service.app import AppState, create_app, drain
from service.core import TRACING, NotReady, setup_logging
from service.http_limits import bounded_protocol
from service.settings import Settings, describe_settings_error, unknown_variables
from service.state import drain_or_stop_cores
from service.supervisor import WORKER_FD_ENV, bind

log = logging.getLogger("service")


class DrainingServer(uvicorn.Server):
    """uvicorn, with the signal handling above: the drain runs while HTTP is still served (503 for new work)."""

    def __init__(self, config: uvicorn.Config, state: AppState, settings: Settings) -> None:
        super().__init__(config)
        self.state = state
        self.grace_s = settings.signal_grace_s
        self.drain_timeout_s = settings.effective_drain_timeout_s
        self.drain_started: float | None = None
        self.forced = False
        self.kill_grace_s = settings.core_heartbeat_timeout_s
        self._forced_event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:  # type: ignore[no-untyped-def]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_started is None and (not self.state.ready or self._loop is None):
            log.info("signal %d during start-up: stopping (nothing was accepted yet)", sig)
            self.should_exit = True
            return
        now = time.monotonic()
        if self.drain_started is None:
            self.drain_started = now
            log.info("signal %d: draining (new requests get 503; accepted ones finish; a repeat after %.0f s "
                     "cancels them)", sig, self.grace_s)
            assert self._loop is not None
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain_then_exit()))  # type: ignore
            return
        since = now - self.drain_started
        if self.should_exit or self.forced:
            log.info("signal %d: already stopping", sig)
        elif since < self.grace_s:
            log.info("signal %d again %.1f s after the first: ignored (within the %.0f s grace period)", sig, since,
                     self.grace_s)
        else:
            log.warning("signal %d again %.1f s into the drain: cancelling what is still running", sig, since)
            self._force("a repeated signal stopped the service")

    def _force(self, why: str) -> None:
        self.forced = True
        if self._forced_event is not None:
            self._forced_event.set()
        for _, core in self.state.cores:
            core.abort(NotReady(f"{why} before this request finished"))

    def core_died(self, why: str) -> None:
        """The engine core process stopped: its open requests were answered 503; exit soon (non-zero) so that the
        supervisor (Docker, Kubernetes, systemd) restarts the pair."""
        assert self._loop is not None
        self._loop.call_later(1.0, setattr, self, "should_exit", True)

    async def _drain_then_exit(self) -> None:
        """The drain on its own clock, then the exit, whatever happens on the way (the exit flag is set in `finally`)."""
        self._forced_event = asyncio.Event()
        if self.forced:
            self._forced_event.set()
        drained = asyncio.create_task(drain(self.state))
        forced = asyncio.create_task(self._forced_event.wait())
        try:
            done, _ = await asyncio.wait({drained, forced}, timeout=self.drain_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if drained in done and drained.exception() is None and not self.forced:
                log.info("drained; shutting down")
                return
            if not self.forced:
                why = ("the drain failed" if drained in done else
                       f"drain still busy after {self.drain_timeout_s:.0f} s (DUALRATE_DRAIN_TIMEOUT_S)")
                log.warning("%s: cancelling what is left", why)
                self._force("the drain timed out")
            await self._after_force()
        except Exception:
            log.exception("the drain failed: exiting")
            self.forced = True
        finally:
            for t in (drained, forced):
                t.cancel()
            self.should_exit = True

    async def _after_force(self) -> None:
        """The aborted requests are answered 503 at the core's next tick; a core that does not get there within the
        heartbeat timeout is frozen: kill it, answer them here."""
        await drain_or_stop_cores(self.state, self.kill_grace_s, "the engine core did not answer the cancelled drain "
                                  f"within {self.kill_grace_s:.0f} s (DUALRATE_CORE_HEARTBEAT_TIMEOUT_S)")
        await asyncio.sleep(0.2)  # let those answers go out before the sockets close


class QuietHealthProbes(logging.Filter):
    """Drops uvicorn's access lines for successful /health/* probes (Docker's HEALTHCHECK and Kubernetes probe every
    few seconds; their lines drowned the requests). Failed probes and every other request are still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 5:
            path, status = str(args[2]), args[4]
            if path.startswith("/health/") and isinstance(status, int) and status < 400:
                return False
        return True


def raise_open_file_limit() -> None:
    """Each client connection is a file descriptor; a soft limit of 1024 (a common default) is below what a few hundred
    concurrent clients plus the libraries' own files need. Raise the soft limit to the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("open-file limit raised from %d to %d", soft, target)
        except (ValueError, OSError) as e:
            log.warning("open-file limit stays %d (%s): at most about %d concurrent connections", soft, e, soft - 64)


def settings_help() -> str:
    """`python -m service --help`: what it does, then every setting (its variable, default and meaning, one line each)."""
    lines = ["usage: python -m service          (make serve: the same, after exporting the checkpoint)", "",
             "Serves a Dual-Rate Diffusion model (or a repository of them) over HTTP: POST /generate, POST",
             "/generate/stream, GET /v1/models, a demo page at /, API docs at /docs, /metrics, /health/*.",
             "Configured by environment variables (docs/configuration.md); an invalid value stops the start",
             "with one line. Example: DUALRATE_PORT=8080 DUALRATE_CHECKPOINT=checkpoints/fashion-dualrate "
             "python -m service", "", "settings (variable, default: meaning):"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, list):
            default = ",".join(map(str, default)) or "(none)"
        elif default is None:
            default = "(unset)"
        shown = str(default).replace(str(Path.cwd()) + "/", "")
        text = f"DUALRATE_{name.upper()} = {shown}: {field.description or ''}".rstrip(": ")
        lines.append("  " + text)
    return "\n".join(lines)


def main() -> int:
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(settings_help())
        return 0
    if sys.argv[1:]:
        print(f"error: python -m service takes no arguments ({' '.join(sys.argv[1:])}): it is configured by "
              "DUALRATE_* environment variables; python -m service --help lists them", file=sys.stderr)
        return 2
    try:
        settings = Settings()
    except (ValidationError, SettingsError) as e:
        for line in describe_settings_error(e):
            print(f"invalid setting: {line}", file=sys.stderr)
        return 2
    worker_fd = os.environ.get(WORKER_FD_ENV)
    setup_logging(settings.log_level, settings.log_format, f"worker {os.getpid()}" if worker_fd else "")
    logging.getLogger("uvicorn.access").addFilter(QuietHealthProbes())
    try:
        if TRACING.start("worker" if worker_fd else "front end"):
            log.info("traces: exported to %s (OpenTelemetry, OTLP over HTTP)", os.environ.get(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "the console")
    except ValueError as e:
        print(f"invalid setting: {e}", file=sys.stderr)
        return 2
    for line in unknown_variables(os.environ):
        log.warning("%s", line)
    raise_open_file_limit()
    listen: socket.socket | None = None
    if not worker_fd:
        # Bind before anything loads, so a port in use is one clear line now, not a "ready" and then a bind error.
        try:
            listen = bind(settings.host, settings.port)
        except OSError as e:
            print(f"error: cannot listen on {settings.host}:{settings.port} ({e.strerror}): another process holds it; "
                  "set DUALRATE_PORT (or DUALRATE_HOST) to a free one", file=sys.stderr)
            return 2
    if settings.frontend_workers > 1 and listen is not None:
        from service.supervisor import run

        return run(settings, listen)
    app = create_app(settings)
    # log_config=None: uvicorn's records (access lines included) go through the root handler above, in this log's
    # format; uvicorn's own formatters copy every record to colour it, ~0.4 ms per request on the event loop here.
    http = bounded_protocol(settings.max_header_bytes, settings.max_headers, settings.header_timeout_s,
                            settings.body_timeout_s)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            log_config=None, timeout_graceful_shutdown=10, http=http,
                            limit_concurrency=settings.max_connections)
    server = DrainingServer(config, app.state.dualrate, settings)
    state = app.state.dualrate
    state.on_core_death = server.core_died
    sockets = [listen] if listen is not None else None
    if worker_fd:
        sockets = [socket.socket(fileno=int(worker_fd))]

        def core_gone(sig: int, frame: FrameType | None) -> None:  # the supervisor saw the shared core die
            if server._loop is not None and state.default.core is not None:
                server._loop.call_soon_threadsafe(state.default.core.died, "the engine core stopped; the service "
                                                  "is restarting")

        signal.signal(signal.SIGUSR1, core_gone)
    try:
        server.run(sockets=sockets)
    finally:
        TRACING.shutdown()  # the last spans leave before the process does
    if app.state.dualrate.core_dead is not None:
        return 4  # the engine core died: restart
    if server.forced or app.state.dualrate.core_killed:  # a frozen core was stopped: what it held was lost
        return 1
    if server.drain_started is None and not server.started:
        return 3  # the start failed (the log says why)
    return 0


if __name__ == "__main__":
    sys.exit(main())
