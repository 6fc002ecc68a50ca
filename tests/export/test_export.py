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
