"""The research CLIs in a venv without the `research` extra (as `make serve` makes it) say in one line what to install,
instead of a ModuleNotFoundError traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

HIDE = "import runpy, sys; [sys.modules.__setitem__(m, None) for m in ('matplotlib', 'scipy', 'tqdm')]; "


@pytest.mark.parametrize("module", ["dualrate.train", "dualrate.eval", "dualrate.distill", "dualrate.classifier"])
def test_a_research_cli_without_its_extra_says_what_to_install(module):
    code = HIDE + f"sys.argv = ['{module}', '--help']; runpy.run_module('{module}', run_name='__main__')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "needs the research extra" in lines[0] and "pip install -e '.[research]'" in lines[0]
