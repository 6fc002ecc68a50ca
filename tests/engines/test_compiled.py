"""The torch backend compiled with torch.compile (Inductor's C++ backend on this CPU): batch buckets, the same images
as eager fp32, and the on-disk cache that spares a restart the compilation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dualrate.checkpoint import load_checkpoint
from dualrate.data import to_uint8
from dualrate.diffusion import CosineSchedule
from dualrate.init import init_checkpoint
from dualrate.sampler import dual_rate_sample
from engines import create_engine
from engines.compiled import Buckets
from tests.conftest import ROOT


def test_buckets_cover_max_batch_and_pad_to_the_next():
    b = Buckets.for_batch(24)
    assert b.sizes == (1, 2, 4, 8, 16, 24)
    assert Buckets.for_batch(64, [8, 32, 100]).sizes == (8, 32, 64)
    assert [b.bucket(n) for n in (1, 3, 9, 17, 24)] == [1, 4, 16, 24, 24]
    with pytest.raises(ValueError, match="exceed"):
        b.bucket(25)
    x = torch.arange(6.0).view(3, 2)
    padded = b.pad(x, 4)
    assert padded.shape == (4, 2) and torch.equal(padded[:3], x) and torch.equal(padded[3], x[2])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return init_checkpoint("tiny", tmp_path_factory.mktemp("ck") / "tiny")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def images(ck, **opts) -> torch.Tensor:
    model = load_checkpoint(ck)
    e = create_engine(ck, backend="torch", device="cpu", max_batch=8, **opts)
    e.warmup()
    sched = CosineSchedule(model.cfg.logsnr_min, model.cfg.logsnr_max)
    x, _ = dual_rate_sample(e.encode, e.denoise, torch.tensor([1, 2, 3, 10]), [5, 6, 7, 8], 6, 2, 1.5, sched,
                            model.cfg.null_label, sample_shape=model.cfg.sample_shape)
    return torch.from_numpy(to_uint8(x, model.cfg.output_size)).int()


@pytest.mark.slow
def test_compiled_fp32_gives_the_eager_images_within_one_level(tiny, cache_root, monkeypatch):
    monkeypatch.setenv("DUALRATE_ONNX_CACHE", str(cache_root))
    eager = images(tiny)
    compiled = images(tiny, compile=True, buckets=(8,))  # 3 guided images + 1 unconditional = 7 rows -> bucket 8
    assert int((eager - compiled).abs().max()) <= 1
    assert any((cache_root / "inductor").rglob("*")), "nothing was written to the inductor cache"


@pytest.mark.slow
def test_a_restart_loads_the_compiled_networks_from_the_cache(tiny, cache_root):
    """Run after the test above filled the cache: a new process compiles the same networks from the FX graph cache."""
    code = (
        "import json, torch\n"
        # the thread count is part of the cache key (Inductor's C++ kernels are generated for it): this process's
        f"torch.set_num_threads({torch.get_num_threads()})\n"
        "from engines import create_engine\n"
        f"e = create_engine({str(tiny)!r}, backend='torch', device='cpu', max_batch=8, compile=True, buckets=(8,))\n"
        "e.warmup()\n"
        "from torch._dynamo.utils import counters\n"
        "print(json.dumps(dict(counters['inductor'])))\n"
    )
    env = {**os.environ, "DUALRATE_ONNX_CACHE": str(cache_root)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    counters = json.loads(out.stdout.strip().splitlines()[-1])
    assert counters.get("fxgraph_cache_hit", 0) >= 2, counters  # encoder and light network
    assert counters.get("fxgraph_cache_miss", 0) == 0, counters
