"""loadtests.distilled_serving: one short run of a tiny student and its teacher, each served at its own defaults."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow  # distils and starts two real servers


def test_both_services_are_measured_at_their_own_defaults_and_recorded(tmp_path, tiny_student):
    from loadtests.distilled_serving import main

    teacher, student = tiny_student
    out = tmp_path / "serving.md"
    main(["--student", str(student), "--rounds", "2", "--seconds", "1.5", "--slots", "2", "--out", str(out)])
    raw = json.loads(out.with_suffix(".json").read_text())["runs"][-1]
    assert raw["requests"]["teacher"][0] == {"num_images": 1, "steps": 8, "encoder_interval": 4, "guidance_scale": 1.5}
    assert raw["requests"]["student"][0] == {"num_images": 1, "steps": 4, "encoder_interval": 2, "guidance_scale": 1.0}
    assert all(len(v) == 2 and min(v) > 0 for v in raw["images_per_s"].values())
    assert raw["ratios"] == pytest.approx([s / t for s, t in zip(raw["images_per_s"]["student"],
                                                                raw["images_per_s"]["teacher"], strict=True)])
    assert raw["teacher"] == str(teacher) and len(raw["teacher_sha256"]) == 64
    assert "Median ratio over 2 rounds" in out.read_text()
