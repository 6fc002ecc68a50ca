"""A pytest plugin: the machine's CPU time spent during each test (setup + call + teardown), to see where a suite's
CPU goes and what floor it sets on a machine's cores (`scripts/test_durations.py --cpu`).

    PYTEST_CPU_OUT=cpu.json PYTHONPATH=scripts python -m pytest -p pytest_cpu -p no:xdist

It reads the whole machine's busy time (/proc/stat: every CPU's user, nice, system, irq and softirq time), so a
test's servers, browsers and subprocesses count, grandchildren included, which the test process's own accounting
misses. That is only the test's own cost in a serial run (one process, `-p no:xdist` or `PYTEST_PARALLEL=`) on an
otherwise idle machine: run nothing else meanwhile. Writes {"tests": {test id: [cpu seconds, wall seconds]}} and
the run's totals to $PYTEST_CPU_OUT at the end of the session.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

_TICKS = os.sysconf("SC_CLK_TCK")
_TESTS: dict[str, list[float]] = {}


def busy_seconds() -> float:
    """CPU seconds the whole machine has been busy since boot (all CPUs): user, nice, system, irq and softirq. Left
    out: idle, iowait, steal (the hypervisor's, not ours) and guest (already inside user and nice)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, *_ = (int(v) for v in f.readline().split()[1:])
    return (user + nice + system + irq + softirq) / _TICKS


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    cpu, wall = busy_seconds(), time.monotonic()
    yield
    _TESTS[item.nodeid] = [round(busy_seconds() - cpu, 2), round(time.monotonic() - wall, 2)]


def pytest_sessionfinish(session: pytest.Session) -> None:
    out = os.environ.get("PYTEST_CPU_OUT")
    if out and _TESTS:
        Path(out).write_text(json.dumps({
            "cores": len(os.sched_getaffinity(0)),
            "cpu_s": round(sum(c for c, _ in _TESTS.values()), 1),
            "wall_s": round(sum(w for _, w in _TESTS.values()), 1),
            "tests": _TESTS,
        }, indent=1) + "\n")
