"""The HTTP contract against a real uvicorn server on loopback, with a real HTTP client."""

from __future__ import annotations

import asyncio
import base64
import io
import math

import httpx
import numpy as np
import pytest
from PIL import Image

from loadtests.process import metric


def decode(png_b64: str) -> np.ndarray:
    img = Image.open(io.BytesIO(base64.b64decode(png_b64)))
    assert img.mode == "L"
    return np.asarray(img)


@pytest.mark.parametrize(("steps", "k", "label"), [(8, 4, 3), (10, 3, None), (5, 1, 0)])
def test_generate_happy_path(server, steps, k, label):
    r = httpx.post(f"{server.url}/generate", json={"class_label": label, "num_images": 2, "steps": steps,
                                                   "encoder_interval": k, "seed": 11}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [im["seed"] for im in body["images"]] == [11, 12]
    for im in body["images"]:
        assert decode(im["png_base64"]).shape == (28, 28)
    assert body["encoder_calls"] == math.ceil(steps / k)
    assert body["denoiser_calls"] == steps
    assert body["class_label"] == label and body["steps"] == steps and body["encoder_interval"] == k
    t = body["timings"]
    assert 0 <= t["queue_ms"] <= t["total_ms"] and t["compute_ms"] > 0


def test_defaults_come_from_the_model_card_and_seed_is_reported(server):
    card = httpx.get(f"{server.url}/v1/model").json()
    r = httpx.post(f"{server.url}/generate", json={"class_label": 1}, timeout=60).json()
    assert r["steps"] == card["defaults"]["steps"]
    assert r["encoder_interval"] == card["defaults"]["encoder_interval"]
    assert r["guidance_scale"] == card["defaults"]["guidance_scale"]
    assert isinstance(r["images"][0]["seed"], int)
    assert card["backend"] == "onnxruntime" and card["device"] == "cpu"


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"class_label": 10}, "class_label"),
        ({"class_label": -1}, "class_label"),
        ({"class_label": "three"}, "class_label"),
        ({"num_images": 0}, "num_images"),
        ({"num_images": 9}, "num_images"),  # over the server's max_images_per_request (8)
        ({"steps": 0}, "steps"),
        ({"steps": 129}, "steps"),  # over max_steps (128)
        ({"encoder_interval": 0}, "encoder_interval"),
        ({"guidance_scale": -0.5}, "guidance_scale"),
        ({"seed": -3}, "seed"),
        ({"seed": "abc"}, "seed"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"colour": "red"}, "colour"),
        ({"priority": "urgent"}, "priority"),
    ],
)
def test_invalid_fields_give_422_naming_the_field(server, payload, field):
    r = httpx.post(f"{server.url}/generate", json=payload, timeout=30)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "invalid_request"
    assert field in body["message"]
    assert any(d["field"] == field for d in body["details"])


def test_malformed_json_gives_422(server):
    r = httpx.post(f"{server.url}/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"


def test_same_seed_same_image_alone_and_under_concurrent_load(server):
    req = {"class_label": 7, "num_images": 2, "steps": 12, "encoder_interval": 4, "seed": 1234}
    alone = httpx.post(f"{server.url}/generate", json=req, timeout=60).json()

    async def crowd() -> list[dict]:
        others = [{"class_label": i % 10, "num_images": 1 + i % 3, "steps": 6 + i, "encoder_interval": 1 + i % 4,
                   "guidance_scale": 1.0 + 0.5 * (i % 3), "seed": 99 + i} for i in range(8)]
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            tasks = [c.post("/generate", json=o) for o in others[:4]]
            tasks.append(c.post("/generate", json=req))
            tasks += [c.post("/generate", json=o) for o in others[4:]]
            rs = await asyncio.gather(*tasks)
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
        return [r.json() for r in rs]

    loaded = asyncio.run(crowd())[4]
    for a, b in zip(alone["images"], loaded["images"], strict=True):
        diff = np.abs(decode(a["png_base64"]).astype(int) - decode(b["png_base64"]).astype(int))
        assert diff.max() <= 1, f"seed {a['seed']}: max pixel difference {diff.max()} under load"


def test_metrics_move_as_requests_flow(server):
    before = httpx.get(f"{server.url}/metrics").text
    httpx.post(f"{server.url}/generate", json={"class_label": 2, "num_images": 3, "steps": 8, "encoder_interval": 4},
               timeout=60).raise_for_status()
    httpx.post(f"{server.url}/generate", json={"num_images": 0})
    after = httpx.get(f"{server.url}/metrics").text
    assert metric(after, "dualrate_requests_total", 'outcome="ok"') == metric(before, "dualrate_requests_total",
                                                                              'outcome="ok"') + 1
    assert metric(after, "dualrate_requests_total", 'outcome="invalid_request"') > metric(
        before, "dualrate_requests_total", 'outcome="invalid_request"')
    assert metric(after, "dualrate_images_generated_total") == metric(before, "dualrate_images_generated_total") + 3
    # Per class: MNIST's card names no classes, so the name is the label's number; unconditional requests apart.
    cls = 'class_label="2",class_name="2"'
    assert metric(after, "dualrate_class_images_total", cls) == metric(before, "dualrate_class_images_total", cls) + 3
    for net in ("encoder", "denoiser"):
        lbl = f'network="{net}"'
        assert metric(after, "dualrate_network_calls_total", lbl) > metric(before, "dualrate_network_calls_total", lbl)
    assert 0.0 < metric(after, "dualrate_encoder_reuse_ratio") < 1.0
    assert 'backend="onnxruntime"' in after
    # Per priority: a request that names none is the default (interactive); a batch one is counted apart.
    name, inter, batch = "dualrate_priority_request_duration_seconds_count", 'priority="interactive"', 'priority="batch"'
    assert metric(after, name, inter) == metric(before, name, inter) + 1
    httpx.post(f"{server.url}/generate", json={"num_images": 1, "steps": 4, "priority": "batch"},
               timeout=60).raise_for_status()
    last = httpx.get(f"{server.url}/metrics").text
    assert metric(last, name, batch) == metric(after, name, batch) + 1
    unc = 'class_label="none",class_name="unconditional"'
    assert metric(last, "dualrate_class_images_total", unc) == metric(after, "dualrate_class_images_total", unc) + 1
    assert metric(last, "dualrate_priority_queue_depth", batch) == 0 and "dualrate_preemptions_total" in last


def test_health_and_openapi(server):
    assert httpx.get(f"{server.url}/health/live").json() == {"status": "alive"}
    assert httpx.get(f"{server.url}/health/ready").status_code == 200
    spec = httpx.get(f"{server.url}/openapi.json").json()
    props = spec["components"]["schemas"]["GenerateRequest"]["properties"]
    assert props["class_label"]["anyOf"][0]["maximum"] == 9
    assert "/generate" in spec["paths"]


def test_the_ready_line_says_where_it_listens_and_what_it_serves(server):
    assert f"ready on http://127.0.0.1:{server.port}: model mnist-dualrate (dualrate; backend=onnxruntime" in server.log()


def test_messages_say_what_the_field_takes(server):
    huge = httpx.post(f"{server.url}/generate", content='{"seed": ' + "9" * 5000 + "}",
                      headers={"content-type": "application/json"})
    assert huge.status_code == 400 and "set_int_max_str_digits" not in huge.text
    assert huge.json()["message"].startswith("seed: a number of 5000 digits") and "9007199254740991" in huge.text
    zero = httpx.post(f"{server.url}/generate", json={"encoder_interval": 0})
    assert zero.status_code == 422 and "Input should" not in zero.text
    assert zero.json()["details"][0]["message"].startswith('must be an integer K >= 1 (the heavy encoder runs every')
