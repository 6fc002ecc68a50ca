"""Real ONNX Runtime sessions and real PyTorch modules, on the shipped checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dualrate.data import to_uint8
from dualrate.diffusion import CosineSchedule
from dualrate.sampler import dual_rate_sample
from engines import BackendUnavailable, create_engine, resolve_backend
from tests.conftest import encoder_waits_for_light_network


@pytest.fixture(scope="module")
def engines(checkpoint_dir, onnx_dir):
    ort = create_engine(checkpoint_dir, backend="onnxruntime", device="cpu", max_batch=32)
    pt = create_engine(checkpoint_dir, backend="torch", device="cpu", max_batch=32)
    yield {"onnxruntime": ort, "torch": pt}
    ort.close()
    pt.close()


def mixed_rows(b: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, 1, 32, 32, generator=g)
    t = torch.rand(b, generator=g)
    tau = (t + torch.rand(b, generator=g) * (1 - t)).clamp(max=1)  # tau >= t, every row different
    label = torch.randint(0, 11, (b,), generator=g)  # includes the null label
    return z, t, tau, label


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize("b", [1, 2, 5, 32])
def test_encode_denoise_any_batch(engines, backend, b):
    e = engines[backend]
    z, t, tau, label = mixed_rows(b)
    feats = e.encode(z, tau, label)
    assert [tuple(f.shape) for f in feats] == [(b, *s) for s in e.feature_shapes]
    v = e.denoise(z, t, tau, label, feats)
    assert v.shape == (b, 1, 32, 32) and torch.isfinite(v).all()
    # Each row equals that row computed alone (no cross-row leakage at any batch size).
    v1 = e.denoise(z[-1:], t[-1:], tau[-1:], label[-1:], tuple(f[-1:] for f in feats))
    assert torch.allclose(v[-1:], v1, atol=1e-4)


def test_backends_agree_on_mixed_batches_with_some_fresh_features(engines):
    """Rows with different t, tau, labels; only some rows get fresh features, the others reuse stale ones."""
    ort, pt = engines["onnxruntime"], engines["torch"]
    z, t, tau, label = mixed_rows(12, seed=3)
    stale_tau = (tau + 0.2).clamp(max=1)
    fresh = pt.encode(z, tau, label)
    stale = pt.encode(torch.randn_like(z), stale_tau, label)
    due = torch.tensor([i % 3 == 0 for i in range(12)])
    feats = tuple(torch.where(due.view(-1, 1, 1, 1), f, s) for f, s in zip(fresh, stale, strict=True))
    row_tau = torch.where(due, tau, stale_tau)
    for a, b in zip(ort.encode(z, tau, label), fresh, strict=True):
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-3)
    v_ort = ort.denoise(z, t, row_tau, label, feats)
    v_pt = pt.denoise(z, t, row_tau, label, feats)
    assert torch.allclose(v_ort, v_pt, atol=1e-3, rtol=1e-3)


def test_onnxruntime_and_torch_give_the_same_images(engines, model):
    """16 images through the reference sampler on each backend: max pixel difference <= 2 of 255."""
    sched = CosineSchedule(model.cfg.logsnr_min, model.cfg.logsnr_max)
    labels = torch.arange(16) % 11  # ten digits and unconditional rows
    out = {}
    for name, e in engines.items():
        imgs, _ = dual_rate_sample(e.encode, e.denoise, labels, list(range(100, 116)), 16, 4, 1.5, sched,
                                   model.cfg.null_label, sample_shape=model.cfg.sample_shape)
        out[name] = to_uint8(imgs, model.cfg.output_size).astype(int)
    diff = np.abs(out["onnxruntime"] - out["torch"]).max()
    assert diff <= 2, f"max pixel difference {diff}"


def test_encode_async_overlaps_on_a_worker_thread(engines, monkeypatch):
    """The encoder runs on a worker thread while the caller runs the light network: the wrapped encoder waits until
    a denoise call has started, which a synchronous encode_async could never see (it would time out)."""
    import threading

    e = engines["onnxruntime"]
    z, t, tau, label = mixed_rows(4)
    ref_feats = e.encode(z, tau, label)
    real_denoise = e.denoise
    seen = encoder_waits_for_light_network(e, monkeypatch)
    handle = e.encode_async(z, tau, label)
    v_other = e.denoise(z, t, tau, label, ref_feats)  # the light net runs meanwhile
    feats = handle.result()
    [(overlapped, thread)] = seen
    assert overlapped, "the encoder did not run while the light network ran"
    assert thread.startswith("encoder") and thread != threading.current_thread().name
    assert torch.allclose(real_denoise(z, t, tau, label, feats), v_other, atol=1e-5)


def test_batch_limit_is_enforced(engines):
    from engines import EngineError

    z, _, tau, label = mixed_rows(33)
    with pytest.raises(EngineError, match=r"outside 1\.\.32"):
        engines["torch"].encode(z, tau, label)


def test_auto_resolves_to_onnxruntime_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert resolve_backend("auto") == ("onnxruntime", "cpu")
    with pytest.raises(BackendUnavailable):
        resolve_backend("tensorrt", "cpu")
    with pytest.raises(ValueError):
        resolve_backend("tensorflow")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA")
def test_torch_cuda_matches_cpu_with_stream_and_graphs(checkpoint_dir):
    cpu = create_engine(checkpoint_dir, backend="torch", device="cpu", max_batch=16)
    for graphs in (False, True):
        gpu = create_engine(checkpoint_dir, backend="torch", device="cuda:0", max_batch=16, cuda_graphs=graphs)
        z, t, tau, label = mixed_rows(8)
        feats = gpu.encode_async(z.cuda(), tau.cuda(), label.cuda()).result()
        v = gpu.denoise(z.cuda(), t.cuda(), tau.cuda(), label.cuda(), feats).cpu()
        v_ref = cpu.denoise(z, t, tau, label, cpu.encode(z, tau, label))
        assert torch.allclose(v, v_ref, atol=2e-3, rtol=2e-3)


def _has_tensorrt() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


@pytest.mark.tensorrt
@pytest.mark.skipif(not _has_tensorrt(), reason="needs TensorRT and an NVIDIA GPU")
def test_tensorrt_matches_onnxruntime(checkpoint_dir):
    trt = create_engine(checkpoint_dir, backend="tensorrt", device="cuda:0", max_batch=16, precision="fp16")
    ref = create_engine(checkpoint_dir, backend="onnxruntime", device="cpu", max_batch=16)
    z, t, tau, label = mixed_rows(8)
    feats = trt.encode_async(z.cuda(), tau.cuda(), label.cuda()).result()
    v = trt.denoise(z.cuda(), t.cuda(), tau.cuda(), label.cuda(), feats).cpu()
    v_ref = ref.denoise(z, t, tau, label, ref.encode(z, tau, label))
    assert torch.allclose(v, v_ref, atol=5e-2, rtol=5e-2)  # FP16 engine


def test_each_backend_honours_or_refuses_a_precision(checkpoint_dir):
    from engines import EngineConfig, EngineError, Precision

    with pytest.raises(EngineError, match="onnxruntime backend runs precision fp32, not bf16"):
        create_engine(checkpoint_dir, EngineConfig(backend="onnxruntime", device="cpu", precision=Precision.BF16))
    e = create_engine(checkpoint_dir, EngineConfig(backend="torch", device="cpu", max_batch=4, precision="bf16"))
    assert e.info.precision == "bf16"
    with pytest.raises(ValueError):
        EngineConfig(precision="fp8")


@pytest.mark.parametrize("opt_in", [False, True])
def test_onnxruntime_keeps_quiet_about_telemetry_under_a_read_only_home(onnx_dir, checkpoint_dir, opt_in):
    # A read-only container's home: onnxruntime's telemetry could not persist its device id and said so at every
    # start. The engine turns telemetry off unless the operator opts in (ORT_DISABLE_TELEMETRY=0), which brings the
    # line back: the check can fail.
    import os
    import subprocess
    import sys

    # onnxruntime also stays quiet where CI is set (as on the CI machine): leave it out so opting in can show the line.
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_CACHE_HOME", "ORT_DISABLE_TELEMETRY", "CI")}
    env["HOME"] = "/proc/self"  # nothing can be created there, not even by root
    if opt_in:
        env["ORT_DISABLE_TELEMETRY"] = "0"
    code = (f"from engines import create_engine; e = create_engine({str(checkpoint_dir)!r}, backend='onnxruntime', "
            "device='cpu', max_batch=4); e.close()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == 0, out.stderr
    assert ("telemetry" in out.stderr.lower()) == opt_in, out.stderr


def test_a_backend_refuses_a_setting_it_would_ignore(checkpoint_dir, onnx_dir):
    from engines import EngineError
    from engines.factory import Backend, EngineConfig, unhonoured

    for option in ({"cuda_graphs": True}, {"buckets": (4, 8)}, {"compile": True}, {"low_precision": "weights"}):
        with pytest.raises(EngineError, match=next(iter(option))):
            create_engine(checkpoint_dir, backend="onnxruntime", device="cpu", **option)
    assert unhonoured(EngineConfig(threads=2), Backend.TENSORRT, "cuda:1") == [
        "threads (CPU threads per network; TensorRT runs on the GPU)",
        "device cuda:1 (the TensorRT engines run on cuda:0: select the GPU with CUDA_VISIBLE_DEVICES)"]
    assert unhonoured(EngineConfig(cuda_graphs=True, buckets=(2,), compile=True), Backend.TORCH, "cpu") == []
