"""A throwaway PostgreSQL cluster on loopback, for the tests and benchmarks of the job store: Debian's server
binaries, a data folder in a temporary directory, no fsync (nothing in it outlives the run), stopped by pid.
As root it runs as the `postgres` user (the server refuses root).

    with Postgres(tmp_path) as pg:
        url = pg.url          # postgresql://dualrate@127.0.0.1:PORT/jobs
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from loadtests.process import free_port


def binary(name: str) -> str | None:
    """A PostgreSQL server binary: on PATH, else Debian's /usr/lib/postgresql/<version>/bin (newest)."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return versions[-1] if versions else None


def available() -> str | None:
    """Why a cluster cannot start here (None: it can)."""
    if binary("initdb") is None or binary("postgres") is None:
        return "PostgreSQL's server is not installed (make test installs Debian's postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a postgres user to run the server as"
    return None


class Postgres:
    def __init__(self, folder: Path, database: str = "jobs") -> None:
        why = available()
        if why is not None:
            raise RuntimeError(why)
        # As root the server runs as `postgres`, which must reach its folder: a fresh one in the system's temporary
        # directory (pytest's own are private to root), removed on stop.
        self._own = os.geteuid() == 0
        self.folder = Path(tempfile.mkdtemp(prefix="dualrate-pg-")) if self._own else Path(folder)
        self.database = database
        self.data = self.folder / "data"
        self.port = free_port()
        self.url = f"postgresql://dualrate@127.0.0.1:{self.port}/{database}"
        self.proc: subprocess.Popen | None = None
        self._user: tuple[int, int] | None = None
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            self._user = (pw.pw_uid, pw.pw_gid)

    def _as_server_user(self) -> dict:
        if self._user is None:
            return {}
        uid, gid = self._user
        return {"user": uid, "group": gid, "extra_groups": []}

    def start(self) -> Postgres:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            os.chown(self.folder, *self._user)
        log = open(self.folder / "postgres.log", "wb")  # noqa: SIM115
        subprocess.run([binary("initdb"), "-D", str(self.data), "-A", "trust", "-U", "dualrate", "--no-sync",
                        "-E", "UTF8"], check=True, stdout=log, stderr=subprocess.STDOUT, cwd=self.folder,
                       **self._as_server_user())
        self.proc = subprocess.Popen(
            [binary("postgres"), "-D", str(self.data), "-h", "127.0.0.1", "-p", str(self.port), "-k", str(self.folder),
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=200"], stdout=log, stderr=subprocess.STDOUT, cwd=self.folder,
            **self._as_server_user())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("postgres exited: " + (self.folder / "postgres.log").read_text()[-2000:])
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.1)
        self._create_database()
        return self

    def _create_database(self) -> None:
        import asyncio

        import asyncpg

        async def create() -> None:
            for _ in range(50):  # the socket accepts before the server takes logins
                try:
                    conn = await asyncpg.connect(host="127.0.0.1", port=self.port, user="dualrate",
                                                 database="postgres")
                    break
                except (asyncpg.CannotConnectNowError, ConnectionError, OSError):
                    await asyncio.sleep(0.1)
            else:
                raise RuntimeError("postgres did not take logins")
            try:
                await conn.execute(f'CREATE DATABASE "{self.database}"')
            finally:
                await conn.close()

        asyncio.run(create())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._own:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Postgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
