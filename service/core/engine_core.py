"""The engine core in its own process: `python -m service.core.engine_core --title engine-core` (started by the front
end, `service.core.client.spawn_core`; vLLM v1's EngineCoreProc is the model).

It owns the device, the engine and the engine loop (scheduler + runner), and knows no HTTP: it is configured by a
`CoreConfig` (DUALRATE_CORE_CONFIG, written by the front end) and its metrics travel in its status. One ZeroMQ ROUTER
socket (DUALRATE_CORE_ADDRESS, an ipc:// path) carries the messages of `service.core.protocol` to and from the front
ends.

One IO thread owns the socket; the engine loop's thread hands its messages (results, stream events) over an inproc
socket that the IO thread polls beside the ROUTER, so no ZeroMQ socket is shared between threads. Images travel as
raw uint8 bytes (the front end encodes the PNGs). SIGINT and SIGTERM are ignored here: the front end drains and
then sends `Shutdown`; if the front end itself dies, the core exits within a second (it watches its parent).
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future

import zmq

from engines import EngineInfo
from service.core import protocol as p
from service.core.errors import NotReady, ServiceError
from service.core.handle import build_core
from service.core.loop import EngineLoop
from service.core.progress import Event
from service.core.request import Job
from service.core.stats import CoreStats
from service.core.telemetry import TRACING, setup_logging

log = logging.getLogger("service.core.engine_core")
OUTBOX = "inproc://outbox"


def set_process_title(title: str) -> None:
    """The kernel's name of this process (ps -o comm, top) where the platform has prctl (Linux)."""
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(15, title.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


class CoreServer:
    def __init__(self, config: p.CoreConfig, address: str) -> None:
        self.config, self.address = config, address
        self.stats = CoreStats()
        self.loop: EngineLoop | None = None
        self.engine_info: EngineInfo | None = None
        self.starting = "starting the engine core"
        self.failed: str | None = None
        self.jobs: dict[tuple[bytes, int], Job] = {}
        self.ctx = zmq.Context()
        self._local = threading.local()
        self.stop = threading.Event()
        self.parent = os.getppid()

    # ---- messages from other threads -------------------------------------------------------------------------

    def _post(self, ident: bytes, msg: p.ToFront) -> None:
        """Send from any thread: through this thread's own inproc socket to the IO thread."""
        sock = getattr(self._local, "push", None)
        if sock is None:
            sock = self._local.push = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(OUTBOX)
        sock.send_multipart([ident, p.encode(msg)])

    def _listener(self, ident: bytes, jid: int):
        def send(events: list[Event]) -> None:  # on the engine loop's thread
            wire = []
            for name, payload in events:
                if name == "preview":
                    rest = {k: v for k, v in payload.items() if k != "image"}
                    wire.append(p.WireEvent(name, rest, p.WireImage.of(payload["image"].picture())))
                else:
                    wire.append(p.WireEvent(name, payload))
            self._post(ident, p.Events(jid, wire))

        return send

    def _done(self, ident: bytes, jid: int):
        def done(fut: Future) -> None:
            self.jobs.pop((ident, jid), None)
            err = fut.exception()
            if err is None:
                self._post(ident, p.Result(jid, p.WireResult.of(fut.result())))
            else:
                self._post(ident, p.Failed(jid, p.WireError.of(err)))

        return done

    # ---- the IO thread ---------------------------------------------------------------------------------------

    def io_loop(self) -> None:
        router = self.ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 1000)
        router.bind(self.address)
        outbox = self.ctx.socket(zmq.PULL)
        outbox.bind(OUTBOX)
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(outbox, zmq.POLLIN)
        self.ready_to_serve.set()
        while not self.stop.is_set():
            events = dict(poller.poll(1000))
            if os.getppid() != self.parent:
                log.error("the front end (pid %d) is gone: exiting", self.parent)
                os._exit(1)
            if outbox in events:
                while True:
                    try:
                        router.send_multipart(outbox.recv_multipart(zmq.NOBLOCK))
                    except zmq.Again:
                        break
            if router in events:
                while True:
                    try:
                        ident, raw = router.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        reply = self.handle(ident, p.decode_to_core(raw))
                    except Exception:
                        log.exception("engine core: a message failed")
                        reply = None
                    if reply is not None:
                        router.send_multipart([ident, p.encode(reply)])
        router.close()
        outbox.close()

    def handle(self, ident: bytes, msg: p.ToCore) -> p.ToFront | None:
        loop = self.loop
        match msg:
            case p.Submit(jid=jid, spec=spec, preview_every=every, stream=stream):
                if loop is None:
                    return p.Refused(jid, p.WireError.of(NotReady(self.starting)))
                try:
                    job = loop.submit(spec, self._listener(ident, jid) if stream else None, every)
                except ServiceError as e:
                    return p.Refused(jid, p.WireError.of(e))
                self.jobs[(ident, jid)] = job
                # The reply goes out before any event or result of the job: both come from the outbox, polled after.
                job.future.add_done_callback(self._done(ident, jid))
                return p.Accepted(jid, job.queue_position)
            case p.Cancel(jid=jid):
                found = self.jobs.get((ident, jid))
                if found is not None:
                    found.cancel()
            case p.Status(rid=rid):
                return p.StatusReply(rid, self.status())
            case p.StopAdmission() if loop is not None:
                loop.stop_admission()
            case p.Abort(error=error) if loop is not None:
                loop.abort(error.error())
            case p.Shutdown():
                self.stop.set()
        return None

    def status(self) -> p.CoreStatus:
        loop = self.loop
        if loop is None:
            return p.CoreStatus(ready=False, starting=self.starting, failed=self.failed)
        return p.CoreStatus(ready=True, engine=self.engine_info, idle=loop.idle(), snapshot=loop.snapshot(),
                            metrics=self.stats.metrics(), stalled_s=loop.stalled_for())

    # ---- the process -----------------------------------------------------------------------------------------

    def run(self) -> int:
        self.ready_to_serve = threading.Event()
        io = threading.Thread(target=self.io_loop, name="core-io", daemon=True)
        io.start()
        self.ready_to_serve.wait()

        def progress(line: str) -> None:
            self.starting = line
            log.info("engine core: %s", line)

        try:
            built = build_core(self.config, self.stats, progress=progress)
        except Exception as e:
            log.exception("engine core: start failed")
            self.failed = f"the engine core failed to start: {e}"
            time.sleep(2.0)  # let the front end read the reason
            return 3
        info = self.engine_info = built.engine.info
        self.loop = built.loop
        log.info("engine core ready (pid %d): backend=%s device=%s precision=%s fused tick=%s", os.getpid(),
                 info.backend, info.device, info.precision, built.loop.runner.fused is not None)
        self.stop.wait()
        built.loop.shutdown(timeout=30)
        built.engine.close()
        io.join(5)
        log.info("engine core stopped")
        return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m service.core.engine_core", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--title", default="engine-core", help="process name shown by ps (default engine-core)")
    ap.add_argument("--address", default=os.environ.get("DUALRATE_CORE_ADDRESS", ""),
                    help="ZeroMQ address to bind (default DUALRATE_CORE_ADDRESS)")
    a = ap.parse_args(argv)
    if not a.address:
        ap.error("no address: pass --address or set DUALRATE_CORE_ADDRESS (the front end does both)")
    raw = os.environ.get(p.CORE_CONFIG_ENV)
    if not raw:
        ap.error(f"no configuration: {p.CORE_CONFIG_ENV} holds the CoreConfig the front end writes")
    config = p.CoreConfig.from_json(raw)
    set_process_title(a.title)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # the front end drains, then sends Shutdown
    setup_logging(config.log_level, config.log_format, "engine-core")
    try:
        TRACING.start("engine core")  # on where the front end's environment (OTEL_*) asks for traces
    except ValueError as e:
        log.error("traces off: %s", e)
    try:
        return CoreServer(config, a.address).run()
    finally:
        TRACING.shutdown()


if __name__ == "__main__":
    sys.exit(main())
