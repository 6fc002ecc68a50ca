"""The engine core in its own process: `python -m service.core.engine_core --title engine-core` (started by the front
end, `service.core.client.spawn_core`; vLLM v1's EngineCoreProc is the model).

It owns the device, the engine, the scheduler and the runner, and knows no HTTP. One ZeroMQ ROUTER socket
(DUALRATE_CORE_ADDRESS, an ipc:// path) carries msgpack messages to and from the front ends:

    front -> core   ["submit", jid, spec, preview_every, stream]  ["cancel", jid]  ["status", rid, with_metrics]
                    ["stop_admission"]  ["abort", error]  ["shutdown"]
    core -> front   ["accepted", jid, queue_position]  ["refused", jid, error]  ["events", jid, events]
                    ["result", jid, result]  ["error", jid, error]  ["status", rid, status]

One IO thread owns the socket; the scheduler thread hands its messages (results, stream events) over an inproc
socket that the IO thread polls beside the ROUTER, so no ZeroMQ socket is shared between threads. Images travel as
raw uint8 bytes (the front end encodes the PNGs). SIGINT and SIGTERM are ignored here: the front end drains and
then sends "shutdown"; if the front end itself dies, the core exits within a second (it watches its parent).
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
from typing import Any

import msgpack
import numpy as np
import zmq
from prometheus_client import generate_latest

from service.core.handle import build_core, error_from_wire, error_to_wire
from service.core.progress import Event
from service.core.scheduler import GenerationSpec, Job, JobResult, Scheduler
from service.errors import NotReady, ServiceError
from service.metrics import PrometheusStats
from service.settings import Settings

log = logging.getLogger("service.core.engine_core")
OUTBOX = "inproc://outbox"


def set_process_title(title: str) -> None:
    """The kernel's name of this process (ps -o comm, top) where the platform has prctl (Linux)."""
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(15, title.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def pack(msg: list) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def image_to_wire(img: np.ndarray) -> list:
    return [img.tobytes(), list(img.shape)]


def result_to_wire(r: JobResult) -> dict[str, Any]:
    return {"images": [image_to_wire(im) for im in r.images], "seeds": r.seeds, "encoder_calls": r.encoder_calls,
            "denoiser_calls": r.denoiser_calls, "queue_seconds": r.queue_seconds,
            "compute_seconds": r.compute_seconds, "encoder_interval": r.encoder_interval}


class CoreServer:
    def __init__(self, settings: Settings, address: str) -> None:
        self.settings, self.address = settings, address
        self.stats = PrometheusStats(front=False, core=True)
        self.scheduler: Scheduler | None = None
        self.engine_info: dict[str, Any] = {}
        self.starting = "starting the engine core"
        self.failed: str | None = None
        self.jobs: dict[tuple[bytes, int], Job] = {}
        self.ctx = zmq.Context()
        self._local = threading.local()
        self.stop = threading.Event()
        self.parent = os.getppid()

    # ---- messages from other threads -------------------------------------------------------------------------

    def _post(self, ident: bytes, msg: list) -> None:
        """Send from any thread: through this thread's own inproc socket to the IO thread."""
        sock = getattr(self._local, "push", None)
        if sock is None:
            sock = self._local.push = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(OUTBOX)
        sock.send_multipart([ident, pack(msg)])

    def _listener(self, ident: bytes, jid: int):
        def send(events: list[Event]) -> None:  # on the scheduler thread
            wire = []
            for name, payload in events:
                if name == "preview":
                    payload = dict(payload)
                    payload["image"] = image_to_wire(payload["image"].picture())
                wire.append([name, payload])
            self._post(ident, ["events", jid, wire])

        return send

    def _done(self, ident: bytes, jid: int):
        def done(fut) -> None:
            self.jobs.pop((ident, jid), None)
            err = fut.exception()
            if err is None:
                self._post(ident, ["result", jid, result_to_wire(fut.result())])
            else:
                self._post(ident, ["error", jid, error_to_wire(err)])

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
                        reply = self.handle(ident, msgpack.unpackb(raw, raw=False))
                    except Exception:
                        log.exception("engine core: a message failed")
                        reply = None
                    if reply is not None:
                        router.send_multipart([ident, pack(reply)])
        router.close()
        outbox.close()

    def handle(self, ident: bytes, msg: list) -> list | None:
        op = msg[0]
        if op == "submit":
            _, jid, spec, preview_every, stream = msg
            if self.scheduler is None:
                return ["refused", jid, error_to_wire(NotReady(self.starting))]
            try:
                job = self.scheduler.submit(GenerationSpec(**spec), self._listener(ident, jid) if stream else None,
                                            preview_every)
            except ServiceError as e:
                return ["refused", jid, error_to_wire(e)]
            self.jobs[(ident, jid)] = job
            reply = ["accepted", jid, job.queue_position]
            # The reply goes out before any event or result of the job: both come from the outbox, polled after.
            job.future.add_done_callback(self._done(ident, jid))
            return reply
        if op == "cancel":
            found = self.jobs.get((ident, msg[1]))
            if found is not None:
                found.cancel()
            return None
        if op == "status":
            return ["status", msg[1], self.status(bool(msg[2]))]
        if op == "stop_admission" and self.scheduler is not None:
            self.scheduler.stop_admission()
        elif op == "abort" and self.scheduler is not None:
            self.scheduler.abort(error_from_wire(msg[1]))
        elif op == "shutdown":
            self.stop.set()
        return None

    def status(self, with_metrics: bool) -> dict[str, Any]:
        s = self.scheduler
        st: dict[str, Any] = {"ready": s is not None, "starting": self.starting, "failed": self.failed,
                              "engine": self.engine_info, "idle": s.idle() if s is not None else True}
        if s is not None:
            snap = s.snapshot()
            st["snapshot"] = [snap.queue_depth, snap.queued_images, snap.active_images, snap.free_slots,
                              snap.encoder_rows_total, snap.denoiser_rows_total, snap.queue_by_priority,
                              snap.paused_images, snap.preemptions_total]
            if with_metrics:
                self.stats.refresh(snap)
                st["metrics"] = generate_latest(self.stats.registry)
        return st

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
            built = build_core(self.settings, self.stats, progress=progress)
        except Exception as e:
            log.exception("engine core: start failed")
            self.failed = f"the engine core failed to start: {e}"
            time.sleep(2.0)  # let the front end read the reason
            return 3
        info = built.engine.info
        self.stats.set_engine(info, self.settings.policy.value)
        self.engine_info = {"backend": info.backend, "device": info.device, "precision": info.precision,
                            "providers": list(info.providers), "max_batch": info.max_batch}
        self.scheduler = built.scheduler
        log.info("engine core ready (pid %d): backend=%s device=%s precision=%s fused tick=%s", os.getpid(),
                 info.backend, info.device, info.precision, built.scheduler.runner.fused is not None)
        self.stop.wait()
        built.scheduler.shutdown(timeout=30)
        built.engine.close()
        io.join(5)
        log.info("engine core stopped")
        return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.core.engine_core", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--title", default="engine-core", help="process name shown by ps (default engine-core)")
    p.add_argument("--address", default=os.environ.get("DUALRATE_CORE_ADDRESS", ""),
                   help="ZeroMQ address to bind (default DUALRATE_CORE_ADDRESS)")
    a = p.parse_args(argv)
    if not a.address:
        p.error("no address: pass --address or set DUALRATE_CORE_ADDRESS (the front end does both)")
    set_process_title(a.title)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # the front end drains, then says "shutdown"
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s engine-core %(name)s: %(message)s")
    return CoreServer(settings, a.address).run()


if __name__ == "__main__":
    sys.exit(main())
