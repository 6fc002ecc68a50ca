"""A failure fails only what caused it: the scheduler retries a failed tick once, then splits the batch down to the
images that fail on their own. Failing engine doubles wrap a real ONNX Runtime engine (no test hook in the service)."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import threading
import time

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image

from dualrate.data import to_uint8
from dualrate.diffusion import CosineSchedule
from dualrate.sampler import dual_rate_sample
from engines import Engine, create_engine
from loadtests.process import free_port
from service.core import GenerationSpec, SchedulerConfig
from service.core.loop import EngineLoop

POISON = 9  # rows with this label fail


class FailingEngine(Engine):
    """Delegates to a real engine; raises on any call that holds a row labelled `poison`, or on the first
    `transient` calls."""

    def __init__(self, inner: Engine, poison: int | None = None, transient: int = 0) -> None:
        super().__init__()
        self.inner, self.poison, self.transient = inner, poison, transient
        self.feature_shapes, self.sample_shape, self.max_batch = inner.feature_shapes, inner.sample_shape, inner.max_batch
        self.failures = 0

    def _check(self, label: torch.Tensor) -> None:
        if self.transient > 0:
            self.transient -= 1
            self.failures += 1
            raise RuntimeError("transient engine fault")
        if self.poison is not None and bool((label == self.poison).any()):
            self.failures += 1
            raise RuntimeError(f"rows with label {self.poison} break this engine")

    def encode(self, z, tau, label):
        self._check(label)
        return self.inner.encode(z, tau, label)

    def denoise(self, z, t, tau, label, features):
        self._check(label)
        return self.inner.denoise(z, t, tau, label, features)

    @property
    def info(self):
        return self.inner.info


def reference(engine, model, spec: GenerationSpec) -> np.ndarray:
    sched = CosineSchedule(model.cfg.logsnr_min, model.cfg.logsnr_max)
    x, _ = dual_rate_sample(engine.encode, engine.denoise, torch.full((spec.num_images,), spec.label),
                            [spec.seed + i for i in range(spec.num_images)], spec.steps, spec.encoder_interval,
                            spec.guidance_scale, sched, model.cfg.null_label, sample_shape=model.cfg.sample_shape)
    return to_uint8(x, model.cfg.output_size)


def run(engine, model, specs: list[GenerationSpec]):
    s = EngineLoop(engine, CosineSchedule(model.cfg.logsnr_min, model.cfg.logsnr_max), model.cfg.null_label,
                   SchedulerConfig(16, queue_size=32), output_size=model.cfg.output_size)
    jobs = [s.submit(sp) for sp in specs]
    for _ in range(1000):
        if all(j.future.done() for j in jobs):
            return jobs
        s.tick()
    raise AssertionError("jobs did not finish")


SPECS = [GenerationSpec(label, 1 + label % 2, 8, 1 + label % 4, 1.5, seed=100 + label) for label in range(8)]


def test_a_poisoned_request_fails_alone(engine, model):
    """Eight requests in flight, one poisoned: only it fails; the others get the images they would have had alone."""
    bad = FailingEngine(engine, poison=POISON)
    specs = [*SPECS[:7], GenerationSpec(POISON, 2, 8, 2, 1.5, seed=900)]
    jobs = run(bad, model, specs)
    assert bad.failures > 0
    with pytest.raises(Exception, match="engine failure"):
        jobs[-1].future.result()
    for sp, job in zip(specs[:7], jobs[:7], strict=True):
        got = np.stack(job.future.result().images).astype(int)
        assert np.abs(got - reference(engine, model, sp).astype(int)).max() <= 1, sp


def test_a_transient_fault_costs_nothing(engine, model):
    flaky = FailingEngine(engine, transient=1)
    jobs = run(flaky, model, SPECS)
    assert flaky.failures == 1
    for sp, job in zip(SPECS, jobs, strict=True):
        got = np.stack(job.future.result().images).astype(int)
        assert np.abs(got - reference(engine, model, sp).astype(int)).max() <= 1
        assert job.future.result().encoder_calls == -(-sp.steps // sp.encoder_interval)  # a retry is not counted


@pytest.mark.slow
def test_poisoned_request_over_http(checkpoint_dir, onnx_dir, caplog):
    """The same over real HTTP: a uvicorn server on loopback whose engine is the failing double."""
    from service.app import create_app
    from service.settings import Settings

    port = free_port()
    settings = Settings(port=port, checkpoint=checkpoint_dir, backend="onnxruntime", device="cpu",
                        max_active_images=16, max_images_per_request=2, threads=2)
    app = create_app(settings, engine_factory=lambda ck, cfg: FailingEngine(create_engine(ck, cfg), poison=POISON))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        bodies = [{"class_label": sp.label, "num_images": sp.num_images, "steps": sp.steps,
                   "encoder_interval": sp.encoder_interval, "seed": sp.seed} for sp in SPECS[:7]]
        poisoned = {"class_label": POISON, "num_images": 2, "steps": 8, "seed": 900}

        async def go() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=120) as c:
                return list(await asyncio.gather(*[c.post("/generate", json=b) for b in [*bodies[:3], poisoned,
                                                                                        *bodies[3:]]]))

        with caplog.at_level(logging.ERROR, logger="service.core.scheduler"):
            rs = asyncio.run(go())
        bad = rs.pop(3)
        assert bad.status_code == 500 and bad.json()["error"] == "engine_error", bad.text
        assert bad.json()["error_id"] in caplog.text
        assert [r.status_code for r in rs] == [200] * 7, [r.text for r in rs]
        alone = [httpx.post(f"{url}/generate", json=b, timeout=60).json() for b in bodies]
        for r, a in zip(rs, alone, strict=True):
            for x, y in zip(r.json()["images"], a["images"], strict=True):
                dx, dy = (np.asarray(Image.open(io.BytesIO(base64.b64decode(i["png_base64"])))).astype(int) for i in (x, y))
                assert np.abs(dx - dy).max() <= 1
    finally:
        server.should_exit = True
        th.join(30)
