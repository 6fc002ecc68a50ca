"""A realistic request mix for POST /generate.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000

Mostly single conditional digits at the default settings, some multi-image and unconditional requests, a spread of
steps, K and guidance, and a few invalid requests (counted apart, under their own name, as expected 422s).
Set LOAD_ENCODER_INTERVAL to force one K for every request (the runner does this to compare K side by side).
"""

from __future__ import annotations

import os
import random

from locust import HttpUser, between, events, task

FORCED_K = int(os.environ["LOAD_ENCODER_INTERVAL"]) if os.environ.get("LOAD_ENCODER_INTERVAL") else None
THINK = float(os.environ.get("LOAD_THINK_S", "0.2"))
# Where to write every request's latency (name, ms, ok) when the run ends: the runner computes exact percentiles of
# the valid requests from it instead of averaging locust's per-name percentiles.
LATENCY_CSV = os.environ.get("LOAD_LATENCY_CSV")
_latencies: list[tuple[str, float, bool]] = []


@events.request.add_listener
def _record(request_type, name, response_time, response_length, exception=None, **kw) -> None:
    _latencies.append((name, float(response_time), exception is None))


@events.quitting.add_listener
def _write(environment, **kw) -> None:
    if LATENCY_CSV:
        with open(LATENCY_CSV, "w") as f:
            f.write("name,response_ms,ok\n")
            f.writelines(f'"{n}",{ms:.3f},{int(ok)}\n' for n, ms, ok in _latencies)


class DualRateUser(HttpUser):
    wait_time = between(0.0, 2 * THINK)

    def _body(self, **over: object) -> dict:
        body = {"class_label": random.randint(0, 9), "num_images": 1, "seed": random.randrange(2**31)}
        body.update(over)
        if FORCED_K is not None:
            body["encoder_interval"] = FORCED_K
        return body

    def _post(self, body: dict, name: str) -> None:
        with self.client.post("/generate", json=body, name=name, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:120]}")
            elif len(r.json()["images"]) != body.get("num_images", 1):
                r.failure("wrong number of images")

    @task(10)
    def single_digit(self) -> None:
        self._post(self._body(), "/generate [1 image]")

    @task(3)
    def several_digits(self) -> None:
        self._post(self._body(num_images=random.choice([2, 4])), "/generate [2-4 images]")

    @task(2)
    def unconditional(self) -> None:
        self._post(self._body(class_label=None), "/generate [unconditional]")

    @task(3)
    def other_settings(self) -> None:
        body = self._body(steps=random.choice([16, 48]), guidance_scale=random.choice([1.0, 2.0]))
        if FORCED_K is None:
            body["encoder_interval"] = random.choice([1, 2, 4, 8])
        self._post(body, "/generate [varied steps/K/guidance]")

    @task(1)
    def invalid(self) -> None:
        bad = random.choice([{"class_label": 12}, {"num_images": 0}, {"steps": -1}, {"guidance_scale": "high"}])
        with self.client.post("/generate", json=bad, name="/generate [invalid, expect 422]", catch_response=True) as r:
            if r.status_code == 422:
                r.success()
            else:
                r.failure(f"expected 422, got HTTP {r.status_code}")
