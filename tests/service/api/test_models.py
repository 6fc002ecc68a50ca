"""Several models in one service: the three shipped dual-rate models served from one model repository (the
checkpoints/ folder, DUALRATE_MODELS picking them): listed, each addressed by the `model` field, each drawing the
images it draws served alone."""

from __future__ import annotations

import httpx
import pytest

from loadtests.process import metric
from tests.conftest import ROOT

MODELS = ["mnist-dualrate", "fashion-dualrate", "mnist-dualrate-8step"]
SETTINGS = {"max_active_images": 8, "max_images_per_request": 4, "queue_size": 16}


@pytest.fixture(scope="module")
def several(start_server):
    return start_server(model_repository=ROOT / "checkpoints", models=",".join(MODELS), **SETTINGS)


def pngs(server, body: dict) -> list[str]:
    r = httpx.post(f"{server.url}/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return [i["png_base64"] for i in r.json()["images"]]


def test_v1_models_lists_the_served_models_and_v1_model_is_the_first(several):
    listing = httpx.get(f"{several.url}/v1/models").json()
    assert listing["default"] == MODELS[0]
    assert [m["name"] for m in listing["models"]] == MODELS
    assert [m["default"] for m in listing["models"]] == [True, False, False]
    # Each its own 8 slots (no memory budget set); the shipped models' per-image state: a 1x32x32 sample and two
    # rows of features (16x32x32, 48x16x16, 128x8x8), float32.
    assert all(m["state"]["slots"] == 8 and m["state"]["per_image_state_bytes"] == 4 * (1024 + 2 * 36864)
               and m["state"]["budget_bytes"] is None for m in listing["models"])
    fashion = httpx.get(f"{several.url}/v1/models/fashion-dualrate").json()
    assert fashion["defaults"]["encoder_interval"] == 2 and fashion["image"]["format"] == "dualrate"
    assert httpx.get(f"{several.url}/v1/model").json()["name"] == MODELS[0]
    schema = httpx.get(f"{several.url}/openapi.json").json()
    body = schema["components"]["schemas"]["GenerateRequest"]
    assert body["properties"]["model"]["enum"] == MODELS and "model" in body["required"]  # a valid request names one
    missing = httpx.get(f"{several.url}/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["details"][0]["models"] == MODELS


def test_a_request_must_name_a_served_model(several):
    for body in ({"seed": 1}, {"model": "nope", "seed": 1}):
        r = httpx.post(f"{several.url}/generate", json=body, timeout=60)
        assert r.status_code == 404, r.text
        assert r.json()["error"] == "not_found" and r.json()["details"][0]["models"] == MODELS


@pytest.mark.parametrize("name", MODELS)
def test_each_model_draws_what_it_draws_served_alone(start_server, several, name):
    alone = start_server(model_repository=ROOT / "checkpoints", models=name, **SETTINGS)
    body = {"class_label": 3, "num_images": 2, "seed": 21}
    r = httpx.post(f"{several.url}/generate", json={**body, "model": name}, timeout=120)
    assert r.status_code == 200 and r.json()["model"] == name
    together = [i["png_base64"] for i in r.json()["images"]]
    assert together == pngs(alone, body)  # alone: one model served, the field may be left out
    assert pngs(several, {**body, "model": MODELS[0]}) != together or name == MODELS[0]
    text = httpx.get(f"{several.url}/metrics").text
    assert metric(text, "dualrate_model_images_total", f'model="{name}"') >= 2
    assert all(metric(text, "dualrate_engine_info", f'model="{m}"') == 1 for m in MODELS)


def test_a_memory_budget_splits_the_slots_between_the_models(monkeypatch):
    """DUALRATE_STATE_MEMORY_MB split evenly: 2 MiB over two models of 299,008 bytes per image gives each 3 slots (the
    batch and the largest request follow); a budget that holds no image of a model stops the start with one line."""
    from pydantic import ValidationError

    from service.settings import Settings

    for var in [v for v in __import__("os").environ if v.startswith("DUALRATE_")]:
        monkeypatch.delenv(var)
    s = Settings(model_repository=ROOT / "checkpoints", models=MODELS[:2], state_memory_mb=2, max_active_images=16,
                 max_images_per_request=8)
    assert s.model_state == {m: (3, 299008) for m in MODELS[:2]}
    config = s.core_config(s.model_card(MODELS[1]), MODELS[1])
    assert config.scheduler.max_active_images == 3 and config.engine.max_batch == 6
    assert config.limits.max_images_per_request == 3 and config.checkpoint.endswith(MODELS[1])
    with pytest.raises(ValidationError, match="holds no image of model"):
        Settings(model_repository=ROOT / "checkpoints", models=MODELS[:2], state_memory_mb=0.5)


def test_several_models_on_the_cpu_split_its_cores_unless_threads_is_set(monkeypatch):
    import os

    from service.settings import Settings

    for var in [v for v in os.environ if v.startswith("DUALRATE_")]:
        monkeypatch.delenv(var)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    s = Settings(model_repository=ROOT / "checkpoints", models=MODELS, device="cpu")
    assert {s.core_config(s.model_card(m), m).engine.threads for m in MODELS} == {8 // 3}
    s = Settings(model_repository=ROOT / "checkpoints", models=MODELS, device="cpu", threads=3)
    assert {s.core_config(s.model_card(m), m).engine.threads for m in MODELS} == {3}
    alone = Settings(model_repository=ROOT / "checkpoints", models=MODELS[:1], device="cpu")
    assert alone.core_config(alone.model_card()).engine.threads == 0
