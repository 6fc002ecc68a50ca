"""The quick lane (`make test-quick`, pytest -m "not slow") starts no real server, and the health probes' access
lines are not logged."""

from __future__ import annotations

import logging
import subprocess
import sys

from service.__main__ import QuietHealthProbes
from tests.conftest import ROOT, SERVER_FIXTURES


def test_the_quick_lane_runs_no_server():
    code = ("import sys, pytest\n"
            "class P:\n"
            "    def pytest_collection_finish(self, session):\n"
            "        print('USES', sorted({i.nodeid for i in session.items if set(i.fixturenames) & set(sys.argv[1:])}))\n"
            "pytest.main(['-q', '--collect-only', '-m', 'not slow', '-p', 'no:cacheprovider', 'tests'], plugins=[P()])\n")
    out = subprocess.run([sys.executable, "-c", code, *SERVER_FIXTURES], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("USES"))
    assert line == "USES []", line


def test_successful_health_probes_are_not_logged():
    f = QuietHealthProbes()

    def record(path: str, status: int) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                                 ("127.0.0.1:5", "GET", path, "1.1", status), None)

    assert not f.filter(record("/health/ready", 200)) and not f.filter(record("/health/live", 200))
    assert f.filter(record("/health/ready", 503)) and f.filter(record("/generate", 200))
