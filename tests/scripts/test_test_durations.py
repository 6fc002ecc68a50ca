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


def test_the_cpu_section_sums_modules_and_names_the_floor_on_the_cores(tmp_path):
    junit(tmp_path / "b.xml", 10.0, {"tests.a::x": 5.0})
    cpu = {"cores": 2, "tests": {"tests/a.py::x": [30.0, 20.0], "tests/a.py::y": [10.0, 10.0],
                                 "tests/b/c.py::z": [20.0, 5.0]}}
    (tmp_path / "cpu.json").write_text(json.dumps(cpu))
    out = tmp_path / "time.md"
    test_durations.main(["--before", str(tmp_path / "b.xml"), "--before-label", "b", "--after", str(tmp_path / "b.xml"),
                         "--after-label", "a", "--out", str(out), "--cpu", str(tmp_path / "cpu.json"),
                         "--cpu-label", "serial, abc"])
    md = out.read_text()
    assert "## Where the CPU goes (serial, abc)" in md and "**60 CPU s** in 35 s of tests" in md
    assert "less than **30 s** (0.5 min)" in md
    assert "| `tests.a` | 40.0 | 66.7% | 30.0 |\n| `tests.b.c` | 20.0 | 33.3% | 5.0 |" in md
    assert json.loads(out.with_suffix(".json").read_text())["cpu"]["label"] == "serial, abc"


def test_the_cpu_plugin_charges_a_busy_test_and_not_a_sleeping_one(tmp_path):
    """scripts/pytest_cpu.py in a real pytest run: a test that spins in a child process for 1.5 CPU s is charged at
    least that (a child's CPU counts, as a server's does); one that sleeps 0.5 s is charged less (alone: next to
    nothing; beside make test's other worker, whose load tests use at most two cores: at most 1 s)."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    (tmp_path / "test_two.py").write_text(
        "import subprocess, sys, time\n"
        "def test_busy():\n"
        "    subprocess.run([sys.executable, '-c', 'import time\\nt = time.process_time()\\n"
        "while time.process_time() - t < 1.5: pass'], check=True)\n"
        "def test_sleeping():\n"
        "    time.sleep(0.5)\n")
    out = tmp_path / "cpu.json"
    env = {**os.environ, "PYTEST_CPU_OUT": str(out), "PYTHONPATH": str(ROOT / "scripts")}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "pytest_cpu", "-p", "no:xdist", "-p",
                          "no:cacheprovider", str(tmp_path / "test_two.py")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    tests = {k.split("::")[1]: v for k, v in json.loads(out.read_text())["tests"].items()}
    assert tests["test_busy"][0] >= 1.4 and tests["test_busy"][1] >= 1.5, tests
    assert tests["test_sleeping"][0] < tests["test_busy"][0] and tests["test_sleeping"][1] >= 0.5, tests
