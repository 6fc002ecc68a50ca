"""Several HTTP front-end workers over one engine core (DUALRATE_FRONTEND_WORKERS > 1).

The supervisor (`python -m service`) binds the listening socket once, starts the engine core
(`service.core.engine_core`), then starts the workers: each is `python -m service` again with the socket inherited
(DUALRATE_WORKER_FD) and the core's address (DUALRATE_SHARED_CORE); the kernel spreads connections over them. Each
worker validates, submits to the core over its own ZeroMQ socket, encodes PNGs and streams events. Their Prometheus
series are pooled through prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR); /metrics on any worker
adds the core's own series.

Signals: SIGTERM or SIGINT reach the workers (forwarded; a process group's signal reaches them directly as well,
and their grace period ignores the repeat), each drains as a lone server does. When every worker has exited the
supervisor tells the core to stop and exits with the workers' worst status. If the core dies, the workers are told
(SIGUSR1): they answer 503, exit, and the supervisor exits 4. If a worker dies, the others are stopped too (exit 4):
the orchestrator restarts the whole pod or container.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from service.core import SHARED_CORE_ENV, spawn_core, tell_core_to_stop
from service.settings import Settings

log = logging.getLogger("service.supervisor")
ROOT = Path(__file__).resolve().parents[1]  # the repository: the workers run `python -m service` there
WORKER_FD_ENV = "DUALRATE_WORKER_FD"


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run(settings: Settings, sock: socket.socket) -> int:
    """`sock`: the listening socket, already bound by `python -m service`."""
    metrics_dir = tempfile.mkdtemp(prefix="dualrate-metrics-")
    core, address, folder = spawn_core(settings.core_config(settings.model_card()))
    env = {**os.environ, WORKER_FD_ENV: str(sock.fileno()), SHARED_CORE_ENV: address,
           "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    workers = [subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env, pass_fds=(sock.fileno(),))
               for _ in range(settings.frontend_workers)]
    log.info("supervisor (pid %d): %d front-end workers %s on %s:%d, engine core pid %d", os.getpid(), len(workers),
             [w.pid for w in workers], settings.host, settings.port, core.pid)
    stopping = {"signals": 0}

    def forward(sig: int, _frame: object) -> None:
        stopping["signals"] += 1
        for w in workers:
            if w.poll() is None:
                w.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 0
    core_reported = False
    while any(w.poll() is None for w in workers):
        if core.poll() is not None and not core_reported:
            core_reported = True
            log.error("the engine core exited (%s): telling the workers", core.returncode)
            for w in workers:
                if w.poll() is None:
                    w.send_signal(signal.SIGUSR1)
            code = 4
        gone = [w for w in workers if w.poll() is not None and w.returncode != 0]
        if gone and not stopping["signals"] and not core_reported:
            log.error("front-end worker %d exited with %s: stopping the others", gone[0].pid, gone[0].returncode)
            stopping["signals"] += 1
            for w in workers:
                if w.poll() is None:
                    w.send_signal(signal.SIGTERM)
            code = 4
        time.sleep(0.1)
    code = max([code, *(w.returncode or 0 for w in workers)])
    if core.poll() is None:
        tell_core_to_stop(address)
        try:
            core.wait(30)
        except subprocess.TimeoutExpired:
            core.kill()
            core.wait()
        log.info("engine core exited with %s", core.returncode)
    shutil.rmtree(metrics_dir, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    sock.close()
    return code
