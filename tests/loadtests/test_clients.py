"""loadtests.clients: the load generators the benchmarks share."""

from __future__ import annotations

from loadtests import clients


def test_fixed_requests_counts_every_answer_of_concurrent_clients(monkeypatch):
    """20 one-image requests over 4 clients, on a clock that moves 1 s per request: 1.0 images/s exactly. Counting with
    `images += await post(...)` read the count before the await and lost the other clients' answers (0.25 here)."""
    import asyncio

    clock = [0.0]
    monkeypatch.setattr(clients.time, "perf_counter", lambda: clock[0])
    labels = []

    async def post(i: int, payload: dict) -> int:
        labels.append(payload["class_label"])
        await asyncio.sleep(0)
        clock[0] += 1.0
        return 1

    assert asyncio.run(clients.fixed_requests(post, 20, 4, {"num_images": 1}, 10)) == 1.0
    assert sorted(set(labels)) == [0, 1, 2, 3] and len(labels) == 20
