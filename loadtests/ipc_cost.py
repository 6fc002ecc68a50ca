"""What a message between the HTTP front end and the engine core costs: ZeroMQ (ipc://, DEALER/ROUTER, msgpack, as
service.core.engine_core uses) against a multiprocessing Pipe with pickle, round trips of the service's message shapes.

    python -m loadtests.ipc_cost [--n 2000] [--out docs/cpu_backends.md]

Messages: a submit (a request's spec, ~200 bytes) answered by its acceptance, and a result with 4 RGB 64x64 images
(49 KB) answered by a short acknowledgement. An echo process on the other end; median and p99 round trip in us.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import statistics
import tempfile
import time
from pathlib import Path

import msgspec
import numpy as np
import zmq

from dualrate.checkpoint import DEFAULT_CHECKPOINT
from dualrate.provenance import command_line, provenance, publish, utc_stamp

SPEC = {"label": 3, "num_images": 4, "steps": 32, "encoder_interval": 4, "guidance_scale": 1.5, "seed": 123456,
        "deadline": 12345.678, "auto": False}


def messages() -> dict[str, list]:
    img = np.zeros((64, 64, 3), dtype=np.uint8)
    result = {"images": [[img.tobytes(), [64, 64, 3]] for _ in range(4)], "seeds": [1, 2, 3, 4], "encoder_calls": 8,
              "denoiser_calls": 32, "queue_seconds": 0.1, "compute_seconds": 0.2, "encoder_interval": 4}
    return {"submit (~200 B)": ["submit", 1, SPEC, 0, False], "result, 4 x 3x64x64 (49 KB)": ["result", 1, result]}


def zmq_echo(address: str) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.bind(address)
    while True:
        ident, raw = s.recv_multipart()
        msg = msgspec.msgpack.decode(raw)
        if msg[0] == "stop":
            return
        s.send_multipart([ident, msgspec.msgpack.encode(["ack", msg[1]])])


def pipe_echo(conn) -> None:
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            return
        conn.send(["ack", msg[1]])


def time_zmq(msg: list, n: int) -> list[float]:
    folder = tempfile.mkdtemp()
    address = f"ipc://{folder}/bench.sock"
    p = mp.get_context("spawn").Process(target=zmq_echo, args=(address,))
    p.start()
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(address)
    out = []
    for i in range(n + 100):
        t0 = time.perf_counter()
        s.send(msgspec.msgpack.encode(msg))
        msgspec.msgpack.decode(s.recv())
        if i >= 100:
            out.append(time.perf_counter() - t0)
    s.send(msgspec.msgpack.encode(["stop", 0]))
    p.join()
    return out


def time_pipe(msg: list, n: int) -> list[float]:
    a, b = mp.get_context("spawn").Pipe()
    p = mp.get_context("spawn").Process(target=pipe_echo, args=(b,))
    p.start()
    out = []
    for i in range(n + 100):
        t0 = time.perf_counter()
        a.send(msg)
        a.recv()
        if i >= 100:
            out.append(time.perf_counter() - t0)
    a.send(["stop", 0])
    p.join()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.ipc_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="round trips per cell")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    cells = []
    for name, msg in messages().items():
        for kind, fn in (("ZeroMQ ipc + msgpack", time_zmq), ("multiprocessing Pipe + pickle", time_pipe)):
            ts = sorted(fn(msg, a.n))
            cells.append({"message": name, "transport": kind, "median_us": 1e6 * statistics.median(ts),
                          "p99_us": 1e6 * ts[int(0.99 * (len(ts) - 1))]})
    command = command_line("python -m loadtests.ipc_cost", argv)
    lines = [f"### Front end <-> engine core message cost, {utc_stamp()}, {platform.machine()} CPU", "",
             f"Command: `{command}`", "", f"Round trips to an echo process, {a.n} per cell after 100 warm-up.", "",
             "| message | transport | median us | p99 us |", "|---|---|---:|---:|"]
    lines += [f"| {c['message']} | {c['transport']} | {c['median_us']:.0f} | {c['p99_us']:.0f} |" for c in cells]
    publish(lines, a.out, {**provenance(DEFAULT_CHECKPOINT, command), "cells": cells})


if __name__ == "__main__":
    main()
