"""scripts/test_durations.py on two small JUnit files: the totals, each run's slowest beside the other, the modules,
and the raw JSON beside the report."""

from __future__ import annotations

import json

from tests.scripts import load_script

test_durations = load_script("test_durations")


def junit(path, wall: float, tests: dict[str, float]) -> None:
    cases = "".join(f'<testcase classname="{n.split("::")[0]}" name="{n.split("::")[1]}" time="{t}"/>'
                    for n, t in tests.items())
    path.write_text(f'<testsuites><testsuite name="pytest" time="{wall}">{cases}</testsuite></testsuites>')


def test_two_runs_are_compared_test_by_test_and_recorded(tmp_path):
    junit(tmp_path / "b.xml", 100.0, {"tests.a::slow": 60.0, "tests.a::quick": 1.0, "tests.b::gone": 5.0})
    junit(tmp_path / "a.xml", 40.0, {"tests.a::slow": 20.0, "tests.a::quick": 1.5, "tests.c::new": 9.0})
    out = tmp_path / "runs" / "time.md"
    test_durations.main(["--before", str(tmp_path / "b.xml"), "--before-label", "serial", "--after",
                         str(tmp_path / "a.xml"), "--after-label", "two workers", "--out", str(out), "--top", "2"])
    md = out.read_text()
    assert "| pytest wall time | 100 s | 40 s |" in md and "| summed test time | 66 s | 30 s |" in md
    assert "| `tests.a::slow` | 60.0 s | 20.0 s |" in md and "| `tests.b::gone` | 5.0 s | - |" in md
    assert "| `tests.c::new` | 9.0 s | - |" in md and "tests.a::quick` | 1.0" not in md  # top 2 only
    assert "| `tests.a` | 61.0 s | 21.5 s |" in md
    raw = json.loads(out.with_suffix(".json").read_text())
    assert raw["after"]["tests"]["tests.c::new"] == 9.0 and raw["before"]["wall_s"] == 100.0
