"""The fused tick (service.core.fused): the same images as the unfused runner for a mixed batch (guided and unguided,
different steps, K and seeds, admissions mid-run, previews), and padding that never touches real slots."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dualrate.init import init_checkpoint
from engines import create_engine
from export.card import read_spec
from service.core import GenerationSpec, RunnerConfig, SchedulerConfig
from service.core.loop import EngineLoop

SPECS = [GenerationSpec(3, 2, 8, 4, 1.5, seed=10), GenerationSpec(10, 1, 5, 2, 1.5, seed=20),
         GenerationSpec(7, 3, 12, 1, 1.0, seed=30), GenerationSpec(0, 1, 9, 9, 2.0, seed=40),
         GenerationSpec(5, 4, 6, 3, 1.5, seed=50)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return init_checkpoint("tiny-rgb", tmp_path_factory.mktemp("ck") / "tiny-rgb")


def run(ck, fused: bool, device: str = "cpu", specs: list[GenerationSpec] = SPECS, **engine_opts):
    spec = read_spec(ck)
    e = create_engine(ck, backend="torch", device=device, max_batch=16, **engine_opts)
    s = EngineLoop(e, spec.schedule(), spec.null_label, SchedulerConfig(8, 32), output_size=spec.output_hw,
                   runner=RunnerConfig(fused=fused), prediction=spec.diffusion.prediction)
    previews: list[list] = [[] for _ in specs]
    jobs = [s.submit(sp, listener=previews[i].extend, preview_every=2) for i, sp in enumerate(specs)]
    for _ in range(1000):
        if all(j.future.done() for j in jobs):
            break
        s.tick()
    pics = [p["image"].picture() for job in previews for name, p in job if name == "preview"]
    return [np.stack(j.future.result().images).astype(int) for j in jobs], pics, s


def test_fused_tick_gives_the_images_of_the_unfused_runner(tiny):
    plain, plain_previews, _ = run(tiny, fused=False)
    fused, fused_previews, s = run(tiny, fused=True)
    assert s.runner.fused is not None and len(s.runner.fused.programs) >= 2  # several bucket keys were used
    for a, b in zip(plain, fused, strict=True):
        assert a.shape == b.shape and int(np.abs(a - b).max()) == 0
    assert len(plain_previews) == len(fused_previews) > 0
    assert max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(plain_previews, fused_previews,
                                                                                 strict=True)) == 0
    # Padded rows wrote only to the trash slot: the last row of z and of each feature cache level.
    assert s.runner.z.shape[0] == 9 and all(c.shape[0] == 17 for c in s.runner.cache)


def test_a_foreign_torch_export_program_runs_fused_as_unfused(tmp_path):
    """A foreign pair (tests/export/foreign.py: eps, two features, 8x12 samples, labels 0-4, null 5) as torch.export
    programs: the fused tick gives the unfused runner's images, as for this project's networks."""
    from tests.export.foreign import write_model

    folder = write_model(tmp_path / "foreign", "torch-export")
    specs = [GenerationSpec(y % 6, n, steps, k, g, seed=10 * i) for i, (y, n, steps, k, g) in
             enumerate([(3, 2, 8, 4, 1.5), (5, 1, 5, 2, 1.5), (1, 3, 12, 1, 1.0), (0, 1, 9, 9, 2.0)])]
    plain, _, _ = run(folder, fused=False, specs=specs)
    fused, _, s = run(folder, fused=True, specs=specs)
    assert s.runner.fused is not None and plain[0].shape == (2, 8, 10, 3)
    assert max(int(np.abs(a - b).max()) for a, b in zip(plain, fused, strict=True)) == 0


def test_a_failing_fused_program_falls_back_to_the_unfused_path(tiny, monkeypatch, caplog):
    plain, _, _ = run(tiny, fused=False)
    from service.core import fused as fused_mod

    def broken(self, p):
        raise RuntimeError("injected")

    monkeypatch.setattr(fused_mod.FusedTick, "_body", broken)
    got, _, _ = run(tiny, fused=True)
    assert all(int(np.abs(a - b).max()) == 0 for a, b in zip(plain, got, strict=True))
    assert "running this tick unfused" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA")
def test_captured_tick_graphs_match_the_unfused_runner_on_cuda(tiny):
    plain, _, _ = run(tiny, fused=False, device="cuda:0")
    fused, _, s = run(tiny, fused=True, device="cuda:0")
    assert s.runner.fused is not None and s.runner.fused.captures >= 2
    assert max(int(np.abs(a - b).max()) for a, b in zip(plain, fused, strict=True)) <= 1
