"""Settings -> the engine core's configuration: the backend is resolved once and every `auto` switch follows the
resolved backend's capabilities (engines.REGISTRY); limits come from the settings and the model card."""

from __future__ import annotations

import importlib.util
import re
import sys
from importlib.util import find_spec

import pytest
import torch
from pydantic import ValidationError

from engines import REGISTRY, Backend
from service.settings import Settings
from tests.conftest import ROOT


def gpu_image_environment() -> dict[str, str]:
    """The DUALRATE_* variables the Dockerfile's gpu stage sets (its ENV lines after `AS gpu`)."""
    text = (ROOT / "Dockerfile").read_text()
    gpu = text[text.index(" AS gpu"):]
    env_lines = " ".join(re.findall(r"^ENV ((?:.*\\\n)*.*)$", gpu, flags=re.M)).replace("\\\n", " ")
    return dict(kv.split("=", 1) for kv in env_lines.split() if kv.startswith("DUALRATE_"))


@pytest.fixture
def gpu_image(monkeypatch, tmp_path):
    """This machine as the GPU image sees it: its environment, and CUDA present (a stand-in flag)."""
    env = gpu_image_environment()
    assert env["DUALRATE_BACKEND"] == "auto" and env["DUALRATE_PRECISION"] == "fp16"
    for k, v in env.items():
        if k not in ("DUALRATE_ONNX_CACHE", "DUALRATE_ENGINE_CACHE"):
            monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return tmp_path


def with_tensorrt(monkeypatch, folder):
    """An importable stand-in `tensorrt` (what `auto` looks for) on sys.path."""
    (folder / "tensorrt").mkdir()
    (folder / "tensorrt" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)


def test_the_gpu_image_resolves_to_tensorrt_where_it_is_importable(gpu_image, monkeypatch):
    """Before: `auto` on CUDA turned torch.compile on while the factory picked TensorRT, which refuses `compile`:
    the GPU image did not start."""
    with_tensorrt(monkeypatch, gpu_image)
    s = Settings()
    config = s.core_config(s.model_card())
    assert config.engine.backend is Backend.TENSORRT and config.engine.device == "cuda:0"
    assert not config.engine.compile and not config.runner.fused and s.use_engine_process
    assert REGISTRY[Backend.TENSORRT].unhonoured(config.engine, config.engine.device) == []


def test_the_gpu_image_resolves_to_compiled_torch_without_tensorrt(gpu_image, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorrt" else find_spec(name, *a))
    s = Settings()
    config = s.core_config(s.model_card())
    assert config.engine.backend is Backend.TORCH and config.engine.compile and config.runner.fused
    assert REGISTRY[Backend.TORCH].unhonoured(config.engine, config.engine.device) == []


def test_on_the_cpu_auto_is_onnxruntime_with_every_auto_switch_off(monkeypatch):
    monkeypatch.setenv("DUALRATE_BACKEND", "auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    s = Settings()
    config = s.core_config(s.model_card())
    assert config.engine.backend is Backend.ONNXRUNTIME and config.engine.device == "cpu"
    assert not config.engine.compile and not config.runner.fused and not s.use_engine_process
    assert config.engine.max_batch == 2 * s.max_active_images


@pytest.mark.parametrize(("env", "match"), [
    ({"DUALRATE_COMPILE": "on"}, "DUALRATE_COMPILE=on is a torch-backend option"),
    ({"DUALRATE_BACKEND": "auto", "DUALRATE_FUSED_TICK": "on"}, r"auto resolved to it"),
    ({"DUALRATE_PRECISION": "bf16"}, "runs DUALRATE_PRECISION=fp32 only"),
    ({"DUALRATE_BACKEND": "tensorrt", "DUALRATE_DEVICE": "cpu"}, "needs a CUDA device"),
])
def test_an_option_the_resolved_backend_cannot_honour_stops_the_start(monkeypatch, env, match):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValidationError, match=match):
        Settings()


def test_the_limits_come_from_the_settings_and_the_card(monkeypatch, tiny_student):
    _, student = tiny_student
    monkeypatch.setenv("DUALRATE_CHECKPOINT", str(student))
    monkeypatch.setenv("DUALRATE_MAX_IMAGES_PER_REQUEST", "3")
    s = Settings()
    limits = s.core_config(s.model_card()).limits
    assert (limits.max_images_per_request, limits.max_steps, limits.distilled) == (3, 256, (4, 2))
    assert limits.maxima()["steps"] == 4 and limits.minima() == {"steps": 4}
    assert limits.problems(None, 4, 8, 4, False, None) == [
        ("num_images", "must be <= 3"),
        ("steps", "must be 4 (or left out): this model was distilled for 4 steps and samples at no other count"),
        ("encoder_interval", "must be <= 2: this model was distilled with the encoder every 2 steps")]
    assert limits.problems(1, 1, 4, 2, False, None) == []


def test_a_card_without_its_geometry_is_one_line_at_start_not_silently_mnist(monkeypatch, tmp_path, checkpoint_dir):
    import json
    import shutil

    folder = tmp_path / "old-card"
    shutil.copytree(checkpoint_dir, folder)
    card = json.loads((folder / "model_card.json").read_text())
    del card["config"]["channels"], card["config"]["output_size"]
    (folder / "model_card.json").write_text(json.dumps(card))
    monkeypatch.setenv("DUALRATE_CHECKPOINT", str(folder))
    with pytest.raises(ValidationError, match=r"config lacks channels, output_size: a card states its geometry .* "
                                              r"image_size 32, channels 1, output_size 28, num_classes 10"):
        Settings()


def test_a_card_whose_schedule_the_sampler_does_not_follow_stops_the_start(monkeypatch, tmp_path, checkpoint_dir):
    """Before: a card saying "prediction": "epsilon" was exported and served as v-prediction, without a word."""
    import json
    import shutil

    folder = tmp_path / "eps-card"
    shutil.copytree(checkpoint_dir, folder)
    card = json.loads((folder / "model_card.json").read_text())
    card["schedule"]["prediction"] = "epsilon"
    (folder / "model_card.json").write_text(json.dumps(card))
    monkeypatch.setenv("DUALRATE_CHECKPOINT", str(folder))
    with pytest.raises(ValidationError, match=r"schedule\.prediction: 'epsilon' is not what this project's networks"):
        Settings()
