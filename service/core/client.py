"""The front end's side of the engine core in its own process: spawn it, talk to it, notice when it dies.

`RemoteCore` has the interface of `service.core.CoreHandle` and speaks `service.core.protocol`. Its socket (a ZeroMQ
DEALER, asyncio flavour) lives on the event loop: sends happen there, and one reader task resolves submissions,
status queries, stream events and results as they arrive. A watcher task polls the child process; if the core exits
while the front end is not shutting down, every open request is answered 503, /health/live and /health/ready turn
503, and `on_death` is called (the server then exits non-zero, so Docker or Kubernetes restart the pair).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import zmq
import zmq.asyncio

from engines import Backend, EngineInfo, Precision
from service.core import protocol as p
from service.core.errors import NotReady, ServiceError
from service.core.progress import Event, Listener
from service.core.request import GenerationSpec

log = logging.getLogger("service.core.client")
ROOT = Path(__file__).resolve().parents[2]  # the repository: the child runs `python -m service.core.engine_core` there
SHARED_CORE_ENV = "DUALRATE_SHARED_CORE"  # set by service.supervisor for its front-end workers: the core's address


class CoreDied(NotReady):
    """The engine core process exited: the request cannot be served (503); the service restarts."""


class _Picture:
    """A preview's picture, already made by the core (`.picture()` as service.core.runner.Preview has)."""

    def __init__(self, img: np.ndarray) -> None:
        self.img = img

    def picture(self) -> np.ndarray:
        return self.img


class RemoteJob:
    def __init__(self, core: RemoteCore, jid: int, listener: Listener | None) -> None:
        self.core, self.jid, self.listener = core, jid, listener
        self.future: Future = Future()
        self.queue_position = 0

    def cancel(self) -> None:
        self.core._send(p.Cancel(self.jid))


def spawn_core(config: p.CoreConfig, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str, str]:
    """Start `python -m service.core.engine_core` with `config`. -> (process, address, socket folder)."""
    folder = tempfile.mkdtemp(prefix="dualrate-core-")
    address = f"ipc://{folder}/core.sock"
    child_env = {**os.environ, **(env or {}), "DUALRATE_CORE_ADDRESS": address, p.CORE_CONFIG_ENV: config.to_json()}
    child_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "service.core.engine_core", "--title", "engine-core"], cwd=ROOT,
                            env=child_env)
    log.info("engine core started (pid %d) at %s", proc.pid, address)
    return proc, address, folder


def tell_core_to_stop(address: str) -> None:
    """Send `Shutdown` to the core at `address` from a plain (not asyncio) socket: the supervisor's last word."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(address)
    sock.send(p.encode(p.Shutdown()))
    sock.close()
    ctx.term()


class RemoteCore:
    """`proc` given: this front end started the core and owns it (watches it, shuts it down after the drain).
    None: a front-end worker of several (service.supervisor owns the core and signals its death: `died`)."""

    def __init__(self, proc: subprocess.Popen | None, address: str, folder: str | None = None,
                 heartbeat_timeout_s: float = 5.0) -> None:
        self.proc, self.address, self.folder = proc, address, folder
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.last_heard = time.monotonic()  # the core's last message of any kind
        self.heard = False  # whether the core has answered at all: a core still importing is starting, not frozen
        self.stalled_s = 0.0  # the core's own report: work and no tick for this long
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.jobs: dict[int, RemoteJob] = {}
        self.submits: dict[int, asyncio.Future] = {}
        self.queries: dict[int, asyncio.Future[p.CoreStatus]] = {}
        self.ids = itertools.count(1)
        self.engine_info = EngineInfo(Backend.AUTO, "unknown", Precision.FP32)  # until the core reports its engine
        self.closing = False
        self.dead: str | None = None
        self.on_death: Callable[[str], None] | None = None
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._reader()), asyncio.create_task(self._heartbeat())]
        if self.proc is not None:
            self._tasks.append(asyncio.create_task(self._watch()))

    @property
    def frozen(self) -> str | None:
        """Why the core counts as frozen: no answer to the heartbeat, or work and no tick, for the heartbeat timeout."""
        if self.dead is not None or not self.heard:
            return None  # dead, not frozen (`dead` says why); or not started yet (readiness says so)
        silent = time.monotonic() - self.last_heard
        if silent > self.heartbeat_timeout_s:
            return (f"the engine core has not answered for {silent:.0f} s (DUALRATE_CORE_HEARTBEAT_TIMEOUT_S "
                    f"{self.heartbeat_timeout_s:g})")
        if self.stalled_s > self.heartbeat_timeout_s:
            return f"the engine core has completed no tick for {self.stalled_s:.0f} s (DUALRATE_CORE_HEARTBEAT_TIMEOUT_S)"
        return None

    async def responsive(self, timeout: float) -> bool:
        if self.dead is not None:
            return False
        try:
            st = await self.status(timeout=timeout)
        except (TimeoutError, ServiceError):
            return False
        return st.stalled_s <= self.heartbeat_timeout_s

    def kill(self, why: str) -> None:
        """SIGKILL the core (if this front end owns it) and answer every open request 503 now."""
        if self.proc is not None and self.proc.poll() is None:
            log.error("%s: killing the engine core (pid %d)", why, self.proc.pid)
            self.closing = True  # its exit is ours, not a crash to report
            self.proc.kill()
        self.died(why, notify=False)

    async def _heartbeat(self) -> None:
        """A status query every quarter of the heartbeat timeout; any message from the core counts as a beat. A
        change between responsive and frozen is logged once each way."""
        was: str | None = None
        while self.dead is None:
            try:
                st = await self.status(timeout=self.heartbeat_timeout_s)
                self.stalled_s = st.stalled_s
            except (TimeoutError, ServiceError):
                pass
            now = self.frozen
            if now and not was:
                log.error("%s: /health/live and /health/ready answer 503", now)
            elif was and not now:
                log.warning("the engine core answers again")
            was = now
            await asyncio.sleep(self.heartbeat_timeout_s / 4)

    def _send(self, msg: p.ToCore) -> None:
        if self.dead is None:
            self.sock.send(p.encode(msg))  # asyncio socket: never blocks (DEALER queues)

    # ---- the interface -------------------------------------------------------------------------------------------

    async def submit(self, spec: GenerationSpec, listener: Listener | None = None, preview_every: int = 0) -> RemoteJob:
        if self.dead is not None:
            raise CoreDied(self.dead)
        jid = next(self.ids)
        job = RemoteJob(self, jid, listener)
        accepted: asyncio.Future = asyncio.get_running_loop().create_future()
        self.submits[jid] = accepted
        self.jobs[jid] = job
        self._send(p.Submit(jid, spec, preview_every, listener is not None))
        try:
            job.queue_position = await accepted
        except BaseException as e:
            self.jobs.pop(jid, None)
            if isinstance(e, asyncio.CancelledError | TimeoutError):
                self._send(p.Cancel(jid))  # given up before the core took it: it must not run for nobody
            raise
        finally:
            self.submits.pop(jid, None)
        return job

    async def status(self, timeout: float = 5.0) -> p.CoreStatus:
        if self.dead is not None:
            raise CoreDied(self.dead)
        rid = next(self.ids)
        fut: asyncio.Future[p.CoreStatus] = asyncio.get_running_loop().create_future()
        self.queries[rid] = fut
        self._send(p.Status(rid))
        try:
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            self.queries.pop(rid, None)

    async def idle(self) -> bool:
        """No open request here and none queued or running in the core. A core that does not answer is not idle."""
        if self.dead is not None:
            return not self.jobs
        try:
            return (await self.status(timeout=1.0)).idle and not self.jobs
        except TimeoutError:
            return False

    def stop_admission(self) -> None:
        self._send(p.StopAdmission())

    def abort(self, err: ServiceError) -> None:
        self._send(p.Abort(p.WireError.of(err)))

    async def wait_ready(self, progress: Callable[[str], None], poll_s: float = 0.2) -> None:
        """Until the core says ready; `progress` gets its start-up stage. Raises RuntimeError if it fails."""
        while True:
            if self.dead is not None:
                raise RuntimeError(self.dead)
            try:
                st = await self.status(timeout=1.0)
            except TimeoutError:
                await asyncio.sleep(poll_s)
                continue
            if st.failed:
                raise RuntimeError(st.failed)
            if st.ready and st.engine is not None:
                self.engine_info = st.engine
                return
            progress(st.starting)
            await asyncio.sleep(poll_s)

    async def close(self, timeout: float = 30.0) -> int | None:
        """Tell the core to stop (after the drain) if this front end owns it, wait for it, then stop the reader.
        -> its exit code (None: not ours)."""
        self.closing = True
        code = None
        if self.proc is not None:
            self._send(p.Shutdown())
            try:
                code = await asyncio.wait_for(asyncio.to_thread(self.proc.wait), timeout)
            except TimeoutError:
                log.warning("engine core did not stop within %.0f s: killing it", timeout)
                self.proc.kill()
                code = await asyncio.to_thread(self.proc.wait)
        for t in self._tasks:
            t.cancel()
        self.sock.close()
        self.ctx.term()
        self._remove_folder()
        return code

    def _remove_folder(self) -> None:
        """The ipc socket's folder (ours when we started the core): removed on every way out, a crash included."""
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    # ---- background tasks ------------------------------------------------------------------------------------

    async def _reader(self) -> None:
        while True:
            raw = await self.sock.recv()
            self.last_heard, self.heard = time.monotonic(), True
            try:
                self._dispatch(p.decode_to_front(raw))
            except Exception:
                log.exception("a message from the engine core failed")

    def _dispatch(self, msg: p.ToFront) -> None:
        match msg:
            case p.StatusReply(rid=rid, status=status):
                fut = self.queries.get(rid)
                if fut is not None and not fut.done():
                    fut.set_result(status)
            case p.Accepted(jid=jid, queue_position=position):
                accepted = self.submits.get(jid)
                if accepted is not None and not accepted.done():
                    accepted.set_result(position)
            case p.Refused(jid=jid, error=error):
                accepted = self.submits.get(jid)
                if accepted is not None and not accepted.done():
                    accepted.set_exception(error.error())
            case p.Events(jid=jid, events=wire):
                job = self.jobs.get(jid)
                if job is not None and job.listener is not None:
                    events = []
                    for w in wire:
                        payload = dict(w.payload)
                        if w.image is not None:
                            payload["image"] = _Picture(w.image.array())
                        events.append(Event(w.name, payload))
                    job.listener(events)
            case p.Result(jid=jid, result=result):
                job = self.jobs.pop(jid, None)
                if job is not None and not job.future.done():
                    job.future.set_result(result.result())
            case p.Failed(jid=jid, error=error):
                job = self.jobs.pop(jid, None)
                if job is not None and not job.future.done():
                    job.future.set_exception(error.error())

    async def _watch(self, poll_s: float = 0.1) -> None:
        assert self.proc is not None
        while self.proc.poll() is None:
            await asyncio.sleep(poll_s)
        if not self.closing:
            self.died(f"the engine core stopped (exit code {self.proc.returncode}); the service is restarting")

    def died(self, why: str, notify: bool = True) -> None:
        """The core is gone: every open request gets 503 now; then `on_death` (unless `notify` is off: the front end
        killed it itself). On the event loop."""
        if self.dead is not None:
            return
        self.dead = why
        log.error("%s: answering %d open requests 503", self.dead, len(self.jobs))
        err = CoreDied(self.dead)
        for fut in [*self.submits.values(), *self.queries.values()]:
            if not fut.done():
                fut.set_exception(err)
        for job in list(self.jobs.values()):
            if not job.future.done():
                job.future.set_exception(err)
        self.jobs.clear()
        if self.proc is not None:
            self._remove_folder()
        if notify and self.on_death is not None:
            self.on_death(self.dead)
