"""The TensorRT build helpers that run without TensorRT: cache keys and optimization profiles."""

from __future__ import annotations

from engines.build import engine_cache_key, profile_shapes


def test_profile_covers_batch_range_from_the_contract(onnx_dir):
    import json

    side = json.loads((onnx_dir / "onnx.json").read_text())
    shapes = profile_shapes(side["denoiser"]["inputs"], max_batch=64, opt_batch=16)
    assert shapes["z"] == ((1, 1, 32, 32), (16, 1, 32, 32), (64, 1, 32, 32))
    assert shapes["t"] == ((1,), (16,), (64,))
    assert set(shapes) == {"z", "t", "tau", "label", "feat0", "feat1", "feat2"}


def test_engine_cache_key_changes_with_graph_version_gpu_and_profile(onnx_dir, tmp_path):
    paths = [onnx_dir / "encoder.onnx", onnx_dir / "denoiser.onnx"]
    base = engine_cache_key(paths, "10.16", "H100", 64, 16)
    assert base == engine_cache_key(paths, "10.16", "H100", 64, 16)
    assert base != engine_cache_key(paths, "11.1", "H100", 64, 16)
    assert base != engine_cache_key(paths, "10.16", "A100", 64, 16)
    assert base != engine_cache_key(paths, "10.16", "H100", 32, 16)
    other = tmp_path / "encoder.onnx"
    other.write_bytes(paths[0].read_bytes() + b"\0")
    assert base != engine_cache_key([other, paths[1]], "10.16", "H100", 64, 16)
