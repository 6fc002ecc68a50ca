"""Caches that several processes share (a volume mounted by every replica) or that a kill can interrupt: a cache
folder is built in a private staging folder beside it and its files moved into place one `os.replace` each, the
completion marker (a sidecar that readers check first) last. A reader sees either no marker or whole files; two
builders racing each publish whole files of the same key."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_folder(out: Path, marker: str) -> Iterator[Path]:
    """Yield a private staging folder beside `out`; on success move its files into `out` (`marker` last), on error
    leave `out` as it was. The staging folder is removed either way."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".staging", dir=out.parent))
    try:
        yield stage
        if not (stage / marker).is_file():
            raise FileNotFoundError(f"{stage / marker}: the build wrote no completion marker")
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(stage.iterdir(), key=lambda p: p.name == marker):  # the marker last
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_atomically(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all (a temporary file beside it, then `os.replace`)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
