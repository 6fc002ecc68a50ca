"""A distilled few-step student (dualrate.distill) served by the unchanged service: its card's steps, K and guidance
are the defaults, other step counts or a rarer encoder are a clear 422, and the schema says so."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.slow  # distils and starts a real server


@pytest.fixture(scope="module")
def student_server(start_server, tiny_student):
    return start_server(checkpoint=tiny_student[1], max_active_images=4, max_images_per_request=2)


def test_the_student_serves_at_its_distilled_schedule_and_refuses_others(student_server):
    url = student_server.url
    r = httpx.post(f"{url}/generate", json={"class_label": 3, "num_images": 2, "seed": 5}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["steps"], body["encoder_interval"], body["guidance_scale"]) == (4, 2, 1.0)
    assert body["encoder_calls"] == 2 and len(body["images"]) == 2
    assert httpx.post(f"{url}/generate", json={"class_label": 3, "encoder_interval": 1, "seed": 5},
                      timeout=60).status_code == 200  # a fresher encoder than distilled with is fine
    for field, value, says in (("steps", 8, "distilled for 4 steps"), ("encoder_interval", 4, "every 2 steps")):
        r = httpx.post(f"{url}/generate", json={"class_label": 3, field: value}, timeout=60)
        assert r.status_code == 422 and says in r.text, r.text
    props = httpx.get(f"{url}/openapi.json").json()["components"]["schemas"]["GenerateRequest"]["properties"]
    steps = next(v for v in props["steps"].get("anyOf", [props["steps"]]) if v.get("type") == "integer")
    k = next(v for v in props["encoder_interval"]["anyOf"] if v.get("type") == "integer")
    assert (steps["minimum"], steps["maximum"], k["maximum"]) == (4, 4, 2)
    assert httpx.get(f"{url}/v1/model").json()["defaults"]["steps"] == 4
