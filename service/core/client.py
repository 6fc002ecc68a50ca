"""The front end's side of the engine core in its own process: spawn it, talk to it, notice when it dies.

`RemoteCore` has the interface of `service.core.CoreHandle`. Its socket (a ZeroMQ DEALER, asyncio flavour) lives on
the event loop: sends happen there, and one reader task resolves submissions, status queries, stream events and
results as they arrive. A watcher task polls the child process; if the core exits while the front end is not
shutting down, every open request is answered 503, /health/live and /health/ready turn 503, and `on_death` is
called (the server then exits non-zero, so Docker or Kubernetes restart the pair).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq
import zmq.asyncio

from engines import Backend, EngineInfo, Precision
from service.core.handle import error_from_wire, error_to_wire
from service.core.progress import Event, Listener
from service.core.scheduler import GenerationSpec, JobResult
from service.core.stats import SchedulerSnapshot
from service.errors import NotReady, ServiceError

log = logging.getLogger("service.core.client")
ROOT = Path(__file__).resolve().parents[2]  # the repository: the child runs `python -m service.core.engine_core` there
SHARED_CORE_ENV = "DUALRATE_SHARED_CORE"  # set by service.supervisor for its front-end workers: the core's address


class CoreDied(NotReady):
    """The engine core process exited: the request cannot be served (503); the service restarts."""


def _image(w: list) -> np.ndarray:
    data, shape = w
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


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
        self.core._send(["cancel", self.jid])


def spawn_core(env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str, str]:
    """Start `python -m service.core.engine_core` with this process's settings. -> (process, address, socket folder)."""
    folder = tempfile.mkdtemp(prefix="dualrate-core-")
    address = f"ipc://{folder}/core.sock"
    child_env = {**os.environ, **(env or {}), "DUALRATE_CORE_ADDRESS": address}
    child_env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the core keeps its own registry (gauges, info)
    proc = subprocess.Popen([sys.executable, "-m", "service.core.engine_core", "--title", "engine-core"], cwd=ROOT,
                            env=child_env)
    log.info("engine core started (pid %d) at %s", proc.pid, address)
    return proc, address, folder


class RemoteCore:
    """`proc` given: this front end started the core and owns it (watches it, shuts it down after the drain).
    None: a front-end worker of several (service.supervisor owns the core and signals its death: `died`)."""

    def __init__(self, proc: subprocess.Popen | None, address: str, folder: str | None = None) -> None:
        self.proc, self.address, self.folder = proc, address, folder
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.jobs: dict[int, RemoteJob] = {}
        self.submits: dict[int, asyncio.Future] = {}
        self.queries: dict[int, asyncio.Future] = {}
        self.ids = itertools.count(1)
        self.engine_info = EngineInfo(Backend.AUTO, "unknown", Precision.FP32)  # until the core reports its engine
        self.closing = False
        self.dead: str | None = None
        self.on_death: Callable[[str], None] | None = None
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._reader())]
        if self.proc is not None:
            self._tasks.append(asyncio.create_task(self._watch()))

    def _send(self, msg: list) -> None:
        if self.dead is None:
            self.sock.send(msgpack.packb(msg, use_bin_type=True))  # asyncio socket: never blocks (DEALER queues)

    # ---- the interface -------------------------------------------------------------------------------------------

    async def submit(self, spec: GenerationSpec, listener: Listener | None = None, preview_every: int = 0) -> RemoteJob:
        if self.dead is not None:
            raise CoreDied(self.dead)
        jid = next(self.ids)
        job = RemoteJob(self, jid, listener)
        accepted: asyncio.Future = asyncio.get_running_loop().create_future()
        self.submits[jid] = accepted
        self.jobs[jid] = job
        self._send(["submit", jid, asdict(spec), preview_every, listener is not None])
        try:
            job.queue_position = await accepted
        except BaseException:
            self.jobs.pop(jid, None)
            raise
        finally:
            self.submits.pop(jid, None)
        return job

    async def status(self, with_metrics: bool = False, timeout: float = 5.0) -> dict[str, Any]:
        if self.dead is not None:
            raise CoreDied(self.dead)
        rid = next(self.ids)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self.queries[rid] = fut
        self._send(["status", rid, with_metrics])
        try:
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            self.queries.pop(rid, None)

    async def snapshot(self) -> SchedulerSnapshot:
        st = await self.status()
        return SchedulerSnapshot(*st.get("snapshot", [0, 0, 0, 0, 0, 0]))

    async def idle(self) -> bool:
        if self.dead is not None:
            return not self.jobs
        return bool((await self.status())["idle"]) and not self.jobs

    def stop_admission(self) -> None:
        self._send(["stop_admission"])

    def abort(self, err: ServiceError) -> None:
        self._send(["abort", error_to_wire(err)])

    async def metrics_text(self) -> bytes:
        try:
            return bytes((await self.status(with_metrics=True)).get("metrics", b""))
        except (TimeoutError, ServiceError):
            return b""

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
            if st.get("failed"):
                raise RuntimeError(st["failed"])
            if st["ready"]:
                e = st["engine"]
                self.engine_info = EngineInfo(e["backend"], e["device"], e["precision"], tuple(e["providers"]),
                                              e["max_batch"])
                return
            progress(st["starting"])
            await asyncio.sleep(poll_s)

    async def close(self, timeout: float = 30.0) -> int | None:
        """Tell the core to stop (after the drain) if this front end owns it, wait for it, then stop the reader.
        -> its exit code (None: not ours)."""
        self.closing = True
        code = None
        if self.proc is not None:
            self._send(["shutdown"])
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
        if self.folder:
            for p in Path(self.folder).glob("*"):
                p.unlink(missing_ok=True)
            Path(self.folder).rmdir()
        return code

    # ---- background tasks ------------------------------------------------------------------------------------

    async def _reader(self) -> None:
        while True:
            raw = await self.sock.recv()
            try:
                self._dispatch(msgpack.unpackb(raw, raw=False))
            except Exception:
                log.exception("a message from the engine core failed")

    def _dispatch(self, msg: list) -> None:
        op, key = msg[0], msg[1]
        if op == "status":
            fut = self.queries.get(key)
            if fut is not None and not fut.done():
                fut.set_result(msg[2])
        elif op in ("accepted", "refused"):
            fut = self.submits.get(key)
            if fut is not None and not fut.done():
                fut.set_result(msg[2]) if op == "accepted" else fut.set_exception(error_from_wire(msg[2]))
        elif op == "events":
            job = self.jobs.get(key)
            if job is not None and job.listener is not None:
                events = []
                for name, payload in msg[2]:
                    if name == "preview":
                        payload["image"] = _Picture(_image(payload["image"]))
                    events.append(Event(name, payload))
                job.listener(events)
        elif op in ("result", "error"):
            job = self.jobs.pop(key, None)
            if job is None or job.future.done():
                return
            if op == "error":
                job.future.set_exception(error_from_wire(msg[2]))
            else:
                r = msg[2]
                job.future.set_result(JobResult(
                    images=[_image(w) for w in r["images"]], seeds=r["seeds"], encoder_calls=r["encoder_calls"],
                    denoiser_calls=r["denoiser_calls"], queue_seconds=r["queue_seconds"],
                    compute_seconds=r["compute_seconds"], encoder_interval=r["encoder_interval"]))

    async def _watch(self, poll_s: float = 0.1) -> None:
        assert self.proc is not None
        while self.proc.poll() is None:
            await asyncio.sleep(poll_s)
        if not self.closing:
            self.died(f"the engine core stopped (exit code {self.proc.returncode}); the service is restarting")

    def died(self, why: str) -> None:
        """The core is gone: every open request gets 503 now; then `on_death`. On the event loop."""
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
        if self.on_death is not None:
            self.on_death(self.dead)
