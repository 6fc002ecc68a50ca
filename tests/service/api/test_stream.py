"""POST /generate/stream against a real server over real HTTP: event order, `done` equal to /generate, previews,
the same errors as /generate, disconnect, drain."""

from __future__ import annotations

import base64
import io
import json
import signal
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from loadtests.process import metric
from tests.conftest import slot_freed_after_disconnect

pytestmark = pytest.mark.slow  # a real server per module

BODY = {"class_label": 3, "num_images": 2, "steps": 12, "encoder_interval": 4, "seed": 11}


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(max_active_images=8, max_images_per_request=4, max_steps=256, queue_size=16,
                        min_preview_every=2)


def read_events(response: httpx.Response) -> list[tuple[str, dict]]:
    """Parse a Server-Sent Events body into (event, JSON data) pairs."""
    out, event, data = [], "message", []
    for line in response.iter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
        elif line == "" and data:
            out.append((event, json.loads("\n".join(data))))
            event, data = "message", []
    return out


def stream(url: str, body: dict, headers: dict | None = None) -> tuple[httpx.Response, list[tuple[str, dict]]]:
    with httpx.stream("POST", f"{url}/generate/stream", json=body, headers=headers, timeout=120) as r:
        if r.status_code != 200:  # an HTTP error, not a stream: read its JSON body
            r.read()
            return r, []
        return r, read_events(r)


def decode(png_b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png_b64))))


def test_events_come_in_order_with_previews_and_done_last(server):
    r, events = stream(server.url, {**BODY, "preview_every": 4})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    names = [e for e, _ in events]
    assert names[0] == "queued" and names[-1] == "done"
    assert set(names[1:-1]) == {"progress", "preview"}, names
    steps = [d["step"] for e, d in events if e == "progress"]
    assert steps == sorted(steps) and steps[-1] == BODY["steps"] and all(d["of"] == BODY["steps"] for e, d in events
                                                                        if e == "progress")
    calls = [d["encoder_calls"] for e, d in events if e == "progress"]
    assert calls == sorted(calls) and calls[-1] == 3  # ceil(12 / 4)
    previews = [d for e, d in events if e == "preview"]
    # Every 4 steps per image, except the last step (its picture is the answer): steps 4 and 8, for 2 images.
    assert sorted((p["index"], p["step"]) for p in previews) == [(0, 4), (0, 8), (1, 4), (1, 8)]
    for p in previews:
        assert decode(p["png_base64"]).shape == (28, 28)
    # A preview is the current estimate of the final picture: the later one is closer to it.
    final = decode(events[-1][1]["images"][0]["png_base64"]).astype(float)
    early, late = (decode(p["png_base64"]).astype(float) for p in sorted(previews, key=lambda p: p["step"])
                   if p["index"] == 0)
    assert np.abs(late - final).mean() < np.abs(early - final).mean()


def test_done_is_exactly_the_generate_body_for_the_same_seed(server):
    _, events = stream(server.url, BODY)
    done = events[-1][1]
    plain = httpx.post(f"{server.url}/generate", json=BODY, timeout=120).json()
    assert done.keys() == plain.keys()
    assert done.pop("timings").keys() == plain.pop("timings").keys()
    assert done.pop("request_id") != plain.pop("request_id")  # each request its own id
    assert done == plain  # same images (bit for bit: same PNG bytes), seeds, calls


def test_previews_cost_nothing_unless_asked_and_the_server_caps_their_rate(server):
    _, none = stream(server.url, {**BODY, "preview_every": 0})
    assert "preview" not in [e for e, _ in none]
    _, capped = stream(server.url, {**BODY, "num_images": 1, "preview_every": 1})  # min_preview_every = 2
    assert [d["step"] for e, d in capped if e == "preview"] == [2, 4, 6, 8, 10]


@pytest.mark.parametrize("bad", [{"num_images": 0}, {"class_label": 10}, {"steps": 1000}, {"encoder_interval": 300},
                                 {"seed": -1}, {"guidance_scale": "x"}, {"unknown": 1}])
def test_bad_input_gets_the_same_422_as_generate(server, bad):
    body = {**BODY, **bad}
    s = httpx.post(f"{server.url}/generate/stream", json=body, timeout=30)
    g = httpx.post(f"{server.url}/generate", json=body, timeout=30)
    assert s.status_code == g.status_code == 422
    assert {**s.json(), "request_id": None} == {**g.json(), "request_id": None}  # the same but for each one's id


def test_a_deadline_during_the_stream_is_an_error_event_with_its_status(server):
    _, events = stream(server.url, {**BODY, "steps": 256, "encoder_interval": 1, "num_images": 1, "timeout_s": 0.5})
    assert events[0][0] == "queued"
    name, data = events[-1]
    assert name == "error" and data["status"] == 504 and data["error"] == "timeout", events[-1]


def test_disconnect_frees_the_slot(start_server):
    srv = start_server(max_active_images=1, max_images_per_request=1, max_steps=256)
    long = {"class_label": 4, "steps": 256, "encoder_interval": 1, "seed": 5}
    with httpx.stream("POST", f"{srv.url}/generate/stream", json=long, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("event: progress"):
                break  # running: it holds the only slot; now go away
    if not slot_freed_after_disconnect(srv.url):
        pytest.fail("the disconnected stream still holds its slot")
    ok = httpx.post(f"{srv.url}/generate", json={"class_label": 1, "steps": 4, "encoder_interval": 2}, timeout=60)
    assert ok.status_code == 200 and ok.json()["timings"]["queue_ms"] < 1000
    assert "never retrieved" not in srv.log()


def test_sigterm_lets_an_open_stream_finish(start_server):
    srv = start_server(max_active_images=2, max_images_per_request=2)
    got: dict = {}

    def client() -> None:
        got["r"], got["events"] = stream(srv.url, {**BODY, "steps": 40, "encoder_interval": 2})

    t = threading.Thread(target=client)
    t.start()
    deadline = time.monotonic() + 30
    while metric(httpx.get(f"{srv.url}/metrics").text, "dualrate_active_images") == 0:
        assert time.monotonic() < deadline, "the stream never started"
        time.sleep(0.02)
    srv.proc.send_signal(signal.SIGTERM)
    t.join(120)
    assert [e for e, _ in got["events"]][-1] == "done", got["events"][-1]
    assert srv.proc.wait(60) == 0, srv.log()
