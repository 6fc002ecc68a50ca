"""Compare two runs of the test suite from their JUnit XML (`pytest --junitxml=...`): pytest's wall time, the summed
time of the tests (setup + call + teardown), the 15 slowest tests of each run beside their time in the other, and the
modules. Writes a markdown report and its raw JSON (every test's time in both runs) beside it.

    python scripts/test_durations.py --before before.xml --before-label "serial, 3a1b2c3" \\
        --after after.xml --after-label "make test, 2 workers, 4d5e6f7" --out docs/runs/test_time.md \\
        [--cpu cpu.json --cpu-label "serial, 4d5e6f7"]

`--cpu` adds where the CPU goes, from a serial run under scripts/pytest_cpu.py: the suite's CPU seconds, the floor
they set on pytest's wall time with this machine's cores (CPU / cores: no schedule of the same work beats it), and
the modules by CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

from dualrate.provenance import command_line, utc_stamp


def read(path: Path) -> tuple[float, dict[str, float]]:
    """-> (pytest's wall time, {test id: seconds})."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert suite is not None, f"{path}: no testsuite"
    tests = {f"{c.get('classname')}::{c.get('name')}": float(c.get("time") or 0) for c in suite.iter("testcase")}
    return float(suite.get("time") or 0), tests


def modules(tests: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for name, seconds in tests.items():
        out[name.split("::", 1)[0]] += seconds
    return out


def module_name(test_id: str) -> str:
    """`tests/a/test_b.py::test_c` (pytest's node id) or `tests.a.test_b::test_c` (JUnit) -> `tests.a.test_b`."""
    module = test_id.split("::", 1)[0]
    return module.removesuffix(".py").replace("/", ".")


def cpu_section(cpu: dict, label: str, top: int = 20) -> list[str]:
    """Markdown: the serial run's CPU seconds, the floor on its cores, the modules by CPU."""
    by_module: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for test_id, (seconds, wall) in cpu["tests"].items():
        by_module[module_name(test_id)][0] += seconds
        by_module[module_name(test_id)][1] += wall
    total, cores = sum(c for c, _ in by_module.values()), cpu["cores"]
    lines = [f"## Where the CPU goes ({label})", "",
             f"The machine's busy CPU time during each test (scripts/pytest_cpu.py, serial, nothing else running): "
             f"**{total:.0f} CPU s** in {sum(w for _, w in by_module.values()):.0f} s of tests. On {cores} cores no "
             f"schedule of this work takes less than **{total / cores:.0f} s** ({total / cores / 60:.1f} min) of "
             "pytest wall time.", "", f"**The {top} modules that take most CPU**", "",
             "| module | CPU s | share | wall s (serial) |", "|---|---:|---:|---:|"]
    for name, (seconds, wall) in sorted(by_module.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"| `{name}` | {seconds:.1f} | {100 * seconds / total:.1f}% | {wall:.1f} |")
    return [*lines, ""]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", type=Path, required=True, help="JUnit XML of the earlier run")
    p.add_argument("--before-label", required=True, help="how it ran (command, commit)")
    p.add_argument("--after", type=Path, required=True, help="JUnit XML of the later run")
    p.add_argument("--after-label", required=True, help="how it ran (command, commit)")
    p.add_argument("--out", type=Path, required=True, help="markdown report; the raw JSON goes beside it")
    p.add_argument("--top", type=int, default=15, help="slowest tests listed per run")
    p.add_argument("--cpu", type=Path, help="the JSON of a serial run under scripts/pytest_cpu.py")
    p.add_argument("--cpu-label", default="a serial run", help="how that run ran (commit)")
    a = p.parse_args(argv)
    cpu = json.loads(a.cpu.read_text()) if a.cpu else None
    (wall_b, before), (wall_a, after) = read(a.before), read(a.after)
    lines = [f"# Test suite time: {a.before_label} against {a.after_label}", "",
             f"{utc_stamp()}, {platform.machine()}, {len(os.sched_getaffinity(0))} CPU cores. Made "
             f"with `{command_line('python scripts/test_durations.py', argv)}`; raw: "
             f"[{a.out.with_suffix('.json').name}]({a.out.with_suffix('.json').name}). A test's time is its setup, "
             "call and teardown (a module's server start is in its first test's setup).", "",
             "| | before | after |", "|---|---:|---:|",
             f"| tests | {len(before)} | {len(after)} |",
             f"| pytest wall time | {wall_b:.0f} s | {wall_a:.0f} s |",
             f"| summed test time | {sum(before.values()):.0f} s | {sum(after.values()):.0f} s |", ""]
    for title, ranked, other, other_name in (("before", before, after, "after"), ("after", after, before, "before")):
        lines += [f"**The {a.top} slowest, {title}** ({other_name} beside)", "", f"| test | {title} | {other_name} |",
                  "|---|---:|---:|"]
        for name, seconds in sorted(ranked.items(), key=lambda kv: -kv[1])[: a.top]:
            there = f"{other[name]:.1f} s" if name in other else "-"
            lines.append(f"| `{name}` | {seconds:.1f} s | {there} |")
        lines.append("")
    mb, ma = modules(before), modules(after)
    lines += ["**Modules** (summed test time, the 20 longest before)", "", "| module | before | after |",
              "|---|---:|---:|"]
    for name, seconds in sorted(mb.items(), key=lambda kv: -kv[1])[:20]:
        lines.append(f"| `{name}` | {seconds:.1f} s | {ma.get(name, 0.0):.1f} s |")
    lines.append("")
    if cpu:
        lines += cpu_section(cpu, a.cpu_label)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n")
    a.out.with_suffix(".json").write_text(json.dumps(
        {"date": utc_stamp(), "machine": platform.machine(), "before": {"label": a.before_label, "wall_s": wall_b,
         "tests": before}, "after": {"label": a.after_label, "wall_s": wall_a, "tests": after},
         **({"cpu": {"label": a.cpu_label, **cpu}} if cpu else {})}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
