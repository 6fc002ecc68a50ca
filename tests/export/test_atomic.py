"""Cache folders are published whole: a build interrupted half-way (a kill, an exception) leaves nothing a later start
would take as complete, and the completion marker arrives after every file it vouches for."""

from __future__ import annotations

import os

import pytest

from export import export_onnx
from export.atomic import staged_folder, write_atomically


def test_a_finished_stage_moves_in_with_its_marker_last(tmp_path, monkeypatch):
    moved: list[str] = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (moved.append(os.path.basename(b)), real(a, b)))
    out = tmp_path / "cache" / "key"
    with staged_folder(out, "done.json") as stage:
        for name in ("done.json", "a.bin", "b.bin"):
            (stage / name).write_text(name)
    assert moved[-1] == "done.json" and sorted(moved) == ["a.bin", "b.bin", "done.json"]
    assert sorted(p.name for p in out.iterdir()) == ["a.bin", "b.bin", "done.json"]
    assert [p.name for p in out.parent.iterdir()] == ["key"]  # the staging folder is gone


def test_an_interrupted_build_leaves_the_cache_as_it_was(tmp_path):
    out = tmp_path / "key"
    with pytest.raises(RuntimeError), staged_folder(out, "done.json") as stage:
        (stage / "a.bin").write_text("half")
        raise RuntimeError("killed mid-build")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_build_without_its_marker_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="completion marker"), staged_folder(tmp_path / "key", "done.json") as s:
        (s / "a.bin").write_text("x")
    assert not (tmp_path / "key").exists()


def test_write_atomically_replaces_whole(tmp_path):
    p = tmp_path / "timing.cache"
    p.write_bytes(b"old")
    write_atomically(p, b"new contents")
    assert p.read_bytes() == b"new contents" and [x.name for x in tmp_path.iterdir()] == ["timing.cache"]


def test_an_export_that_fails_half_way_is_not_taken_as_done(checkpoint_dir, tmp_path, monkeypatch):
    import export.onnx_export as ox

    real, calls = ox._export_one, []

    def fail_on_second(module, c, path, null_label):
        calls.append(path.name)
        if len(calls) == 2:
            raise RuntimeError("killed after the encoder")
        real(module, c, path, null_label)

    out = tmp_path / "onnx"
    monkeypatch.setattr(ox, "_export_one", fail_on_second)
    with pytest.raises(RuntimeError, match="killed"):
        export_onnx(checkpoint_dir, out=out)
    assert not (out / "onnx.json").exists() and not (out / "encoder.onnx").exists()
    monkeypatch.setattr(ox, "_export_one", real)
    art = export_onnx(checkpoint_dir, out=out)  # a fresh export, not the half one
    assert (art.directory / "encoder.onnx").is_file() and (art.directory / "denoiser.onnx").is_file()
