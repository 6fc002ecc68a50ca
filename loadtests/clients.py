"""The load generators the benchmarks and load tests share: closed and open loops over HTTP, fixed request counts on
httpx or lean kept-alive connections (loadtests.lean_http), the same loop straight into an in-process engine loop,
streams read whole, and percentiles. Each experiment is its own module (service_bench, overload, priorities,
cpu_share, stream_cost, distilled_serving, ...) and imports these."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from loadtests.lean_http import LeanConnection

Post = Callable[[int, dict], Awaitable[int]]  # (client index, request body) -> images in the 200 answer


async def closed_loop(url: str, clients: int, seconds: float, body: dict, num_classes: int = 10,
                      offset: int = 0) -> tuple[float, list[float]]:
    """`clients` concurrent clients, each sending one request after another, client i with label (offset + i) %
    num_classes; -> images/s, latencies."""
    latencies: list[float] = []
    images = 0
    stop = time.perf_counter() + seconds

    async def client(c: httpx.AsyncClient, i: int) -> None:
        nonlocal images
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            r = await c.post("/generate", json={**body, "class_label": (offset + i) % num_classes})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            images += len(r.json()["images"])

    t0 = time.perf_counter()
    # One connection per client: httpx's default pool (100 connections) would cap the concurrency below the clients.
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=None)) as c:
        await asyncio.gather(*[client(c, i) for i in range(clients)])
    return images / (time.perf_counter() - t0), latencies


async def open_loop_mix(url: str, seconds: float, rate: float, short: dict, long: dict, long_frac: float, *,
                        num_classes: int,
                        seed: int = 0) -> dict[str, list[float]]:
    """Poisson arrivals at `rate` req/s, a fraction of them long; -> latencies by kind."""
    rng = random.Random(seed)
    out: dict[str, list[float]] = {"short": [], "long": []}

    async def one(c: httpx.AsyncClient, kind: str, body: dict) -> None:
        t0 = time.perf_counter()
        r = await c.post("/generate", json=body)
        r.raise_for_status()
        out[kind].append(time.perf_counter() - t0)

    tasks = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        stop = time.perf_counter() + seconds
        i = 0
        while time.perf_counter() < stop:
            kind = "long" if rng.random() < long_frac else "short"
            body = {**(long if kind == "long" else short), "class_label": i % num_classes, "seed": i}
            tasks.append(asyncio.create_task(one(c, kind, body)))
            i += 1
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def httpx_post(c: httpx.AsyncClient) -> Post:
    async def post(i: int, payload: dict) -> int:
        r = await c.post("/generate", json=payload)
        r.raise_for_status()
        return len(r.json()["images"])

    return post


def lean_post(conns: list[LeanConnection]) -> Post:
    """Client i on its own kept-alive connection conns[i] (loadtests.lean_http)."""
    async def post(i: int, payload: dict) -> int:
        status, answer = await conns[i].post_json("/generate", payload)
        if status != 200:
            raise RuntimeError(f"/generate answered {status}: {answer}")
        return len(answer["images"])

    return post


async def fixed_requests(post: Post, requests: int, clients: int, body: dict, num_classes: int) -> float:
    """`requests` one-image requests over `clients` concurrent closed-loop clients; -> images/s from the first
    request sent to the last answer."""
    left = requests
    images = 0

    async def client(i: int) -> None:
        nonlocal left, images
        while left > 0:
            left -= 1
            got = await post(i, {**body, "class_label": i % num_classes})
            images += got  # not `images += await ...`: that reads `images` before the await and loses other updates

    t0 = time.perf_counter()
    await asyncio.gather(*[client(i) for i in range(clients)])
    return images / (time.perf_counter() - t0)


def core_requests(scheduler: Any, requests: int, clients: int, body: dict, num_classes: int) -> float:  # an EngineLoop
    """The same closed loop as `fixed_requests`, straight into a scheduler in this process (no HTTP, no JSON, no
    PNG): each answer submits the next request from the scheduler thread's callback; -> images/s."""
    from service.core.loop import GenerationSpec

    lock, done = threading.Lock(), threading.Event()
    sent = images = 0
    failed: list[BaseException] = []

    def submit() -> None:
        nonlocal sent
        i, sent = sent, sent + 1
        spec = GenerationSpec(i % num_classes, 1, body["steps"], body["encoder_interval"], body["guidance_scale"], seed=i)
        scheduler.submit(spec).future.add_done_callback(answered)

    def answered(f: Any) -> None:  # on the scheduler thread
        nonlocal images
        with lock:
            if f.exception() is not None:
                failed.append(f.exception())
                done.set()
                return
            images += len(f.result().images)
            if sent < requests:
                submit()
            elif images == requests:
                done.set()

    t0 = time.perf_counter()
    with lock:
        for _ in range(min(clients, requests)):
            submit()
    done.wait()
    if failed:
        raise RuntimeError(f"a request into the in-process scheduler failed: {failed[0]!r}")
    return images / (time.perf_counter() - t0)


async def read_stream(c: httpx.AsyncClient, req: dict) -> bytes:
    """POST /generate/stream and return its whole body, raw. The bytes are read as they come and events counted in
    them afterwards: parsing each event line in Python cost this load generator measurable CPU beside the service on
    two cores (docs/runs/service_bench.md)."""
    async with c.stream("POST", "/generate/stream", json=req) as r:
        r.raise_for_status()
        raw = b"".join([chunk async for chunk in r.aiter_raw()])
    if b"event: done" not in raw:
        raise RuntimeError(f"stream without done: {raw[-300:]!r}")
    return raw


async def plain_and_streams(url: str, plain: int, extra: int, streaming: bool, seconds: float, body: dict,
                            preview_every: int, *, num_classes: int) -> dict[str, float]:
    """`plain` closed-loop /generate clients beside `extra` more clients, which use /generate/stream with previews
    every `preview_every` steps (streaming) or /generate (the control: the same load shape). -> images/s of each group,
    and the previews received."""
    counts = {"plain": 0, "extra": 0, "previews": 0}
    stop = time.perf_counter() + seconds

    async def plain_client(c: httpx.AsyncClient, i: int, group: str) -> None:
        while time.perf_counter() < stop:
            r = await c.post("/generate", json={**body, "class_label": i % num_classes})
            r.raise_for_status()
            counts[group] += len(r.json()["images"])

    async def stream_client(c: httpx.AsyncClient, i: int) -> None:
        while time.perf_counter() < stop:
            req = {**body, "class_label": i % num_classes, "preview_every": preview_every}
            counts["previews"] += (await read_stream(c, req)).count(b"event: preview")
            counts["extra"] += req["num_images"]

    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=None)) as c:
        await asyncio.gather(*[plain_client(c, i, "plain") for i in range(plain)],
                             *[(stream_client(c, i) if streaming else plain_client(c, i, "extra")) for i in range(extra)])
    wall = time.perf_counter() - t0
    return {"plain_images_per_s": counts["plain"] / wall, "extra_images_per_s": counts["extra"] / wall,
            "total_images_per_s": (counts["plain"] + counts["extra"]) / wall, "previews": counts["previews"]}
