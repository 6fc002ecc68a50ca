"""scripts/baseline_guidance.py: a baseline at several guidance scales with its data set's evaluator, its rows kept in
a sweep's rows.jsonl so that a rerun (or the sweep) measures them once."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # samples and evaluates

ROOT = Path(__file__).resolve().parents[2]


def test_rows_are_measured_once_and_shared_through_rows_jsonl(tmp_path):
    from dualrate.init import init_checkpoint

    small = init_checkpoint("tiny", tmp_path / "tiny-standalone-small", seed=3, standalone="small")
    rows = tmp_path / "rows.jsonl"
    cmd = [sys.executable, "scripts/baseline_guidance.py", str(small), "--guidance", "1.0,2.0", "--num-images", "20",
           "--seed-sets", "2", "--rows", str(rows)]
    first = subprocess.run(cmd, cwd=ROOT, check=True, timeout=300, capture_output=True, text=True)
    kept = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [e["row"]["guidance_scale"] for e in kept] == [1.0, 2.0] and all(e["row"]["fid_gap"] for e in kept)
    second = subprocess.run(cmd, cwd=ROOT, check=True, timeout=300, capture_output=True, text=True)
    assert rows.read_text().splitlines() == [json.dumps(e) for e in kept]  # nothing measured again
    assert "kept from" in second.stderr and "kept from" not in first.stderr
    table = [line for line in first.stdout.splitlines() if line.startswith("| tiny-standalone-small")]
    assert table == [line for line in second.stdout.splitlines() if line.startswith("| tiny-standalone-small")]
