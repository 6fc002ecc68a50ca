"""ONNX export: named dynamic-batch graphs, a sidecar, the parity check, and the hash cache."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
from onnx import numpy_helper

from export import ExportParityError, export_onnx
from export.contract import contracts
from export.onnx_export import check_parity


def test_sidecar_names_shapes_and_hash(onnx_dir, checkpoint_dir):
    from dualrate.checkpoint import checkpoint_hash

    side = json.loads((onnx_dir / "onnx.json").read_text())
    assert side["checkpoint_sha256"] == checkpoint_hash(checkpoint_dir)
    assert [i["name"] for i in side["encoder"]["inputs"]] == ["z", "tau", "label"]
    assert [o["name"] for o in side["denoiser"]["outputs"]] == ["v"]
    assert side["opset"] == 17
    for name in ("encoder", "denoiser"):
        graph = onnx.load(str(onnx_dir / side[name]["file"])).graph
        assert all(i.type.tensor_type.shape.dim[0].dim_param == "batch" for i in graph.input)
        assert side[name]["max_rel_error_vs_torch"] < 2e-3


def test_cached_by_checkpoint_hash(onnx_dir, checkpoint_dir, tmp_path):
    out = tmp_path / "onnx"
    first = export_onnx(checkpoint_dir, out)
    mtime = first.encoder.stat().st_mtime_ns
    again = export_onnx(checkpoint_dir, out)
    assert again.encoder.stat().st_mtime_ns == mtime  # reused, not rebuilt
    # A changed checkpoint (different card bytes -> different hash) is re-exported.
    ck = tmp_path / "ck"
    shutil.copytree(checkpoint_dir, ck)
    card = json.loads((ck / "model_card.json").read_text())
    card["note"] = "changed"
    (ck / "model_card.json").write_text(json.dumps(card))
    rebuilt = export_onnx(ck, out)
    assert rebuilt.sidecar["checkpoint_sha256"] != first.sidecar["checkpoint_sha256"]


def test_parity_check_fails_loudly_on_a_wrong_graph(onnx_dir, model, tmp_path):
    graph = onnx.load(str(onnx_dir / "denoiser.onnx"))
    # Shift every float weight: the graph no longer computes what PyTorch does.
    for init in graph.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype.kind == "f" and arr.size > 1:
            init.CopyFrom(numpy_helper.from_array(arr + 0.05, init.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(graph, str(bad))
    from export.onnx_export import _DenoiserWrapper

    c = contracts(model.cfg)["denoiser"]
    with pytest.raises(ExportParityError, match="does not match PyTorch"):
        check_parity(_DenoiserWrapper(model.denoiser), c, bad, model.cfg.null_label, "float32")


@pytest.fixture(scope="module")
def fp16_export(checkpoint_dir, tmp_path_factory):
    return export_onnx(checkpoint_dir, tmp_path_factory.mktemp("onnx16"), fp16=True)


def test_fp16_export_runs_in_onnxruntime_close_to_fp32(fp16_export, model):
    """`python -m export --fp16` once crashed (fp32 time embedding into a half Linear). The half graphs must run in
    ONNX Runtime and agree with the fp32 graphs: max |fp16 - fp32| <= 5e-2 of max |fp32| (FP16_TOLERANCE)."""
    import numpy as np
    import onnxruntime as ort

    from export.onnx_export import TOLERANCE, sample_inputs

    art = fp16_export
    assert set(art.sidecar["fp16"]) == {"encoder", "denoiser"}
    for name in ("encoder", "denoiser"):
        f32 = ort.InferenceSession(str(art.directory / art.sidecar[name]["file"]), providers=["CPUExecutionProvider"])
        f16 = ort.InferenceSession(str(art.directory / art.sidecar["fp16"][name]["file"]),
                                   providers=["CPUExecutionProvider"])
        assert f16.get_inputs()[0].type == "tensor(float16)"
        c32 = contracts(model.cfg, "float32")[name]
        inputs = {k: v.numpy() for k, v in sample_inputs(c32, 4, model.cfg.null_label).items()}
        half = {k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in inputs.items()}
        for ref, got in zip(f32.run(None, inputs), f16.run(None, half), strict=True):
            assert got.dtype == np.float16 and got.shape == ref.shape
            err = float(np.abs(got.astype(np.float32) - ref).max() / np.abs(ref).max())
            assert err <= TOLERANCE["float16"], f"{name}: fp16 vs fp32 relative error {err:.2e}"


def test_export_key_changes_with_opset_and_export_code(checkpoint_dir, monkeypatch, tmp_path):
    """The Docker build and the runtime find the same folder (one function names it), and a changed opset or
    export source gives a new folder instead of reusing stale graphs."""
    import export.onnx_export as ox

    monkeypatch.setenv("DUALRATE_ONNX_CACHE", str(tmp_path / "cache"))
    base = ox.onnx_dir_for(checkpoint_dir)
    assert base.parent == tmp_path / "cache"
    assert base == ox.onnx_dir_for(checkpoint_dir)
    monkeypatch.setattr(ox, "OPSET", ox.OPSET + 1)
    assert ox.onnx_dir_for(checkpoint_dir) != base
    monkeypatch.setattr(ox, "OPSET", ox.OPSET - 1)
    src = tmp_path / "src"
    (src / "export").mkdir(parents=True)
    (src / "dualrate").mkdir()
    for rel in ox.EXPORT_SOURCES:
        (src / rel).write_bytes((ox._ROOT / rel).read_bytes())
    monkeypatch.setattr(ox, "_ROOT", src)
    assert ox.onnx_dir_for(checkpoint_dir) == base
    (src / "export" / "onnx_export.py").write_text((src / "export" / "onnx_export.py").read_text() + "\n# changed\n")
    assert ox.onnx_dir_for(checkpoint_dir) != base
