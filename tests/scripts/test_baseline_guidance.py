"""scripts/baseline_guidance.py: a baseline at several guidance scales with its data set's evaluator, its rows kept in
a sweep's rows.jsonl so that a rerun (or the sweep) measures them once."""

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # samples and evaluates

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def script():
    """The script's main, run in this process (the test split's statistics are then shared with the evaluator tests);
    it switches autograd off for its process, which is restored here for the tests that follow."""
    spec = importlib.util.spec_from_file_location("baseline_guidance", ROOT / "scripts" / "baseline_guidance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    grad = torch.is_grad_enabled()
    yield module.main
    torch.set_grad_enabled(grad)


def test_rows_are_measured_once_and_shared_through_rows_jsonl(tmp_path, script, capsys, caplog):
    from dualrate.init import init_checkpoint

    caplog.set_level(logging.INFO, logger="dualrate.evaluate")
    small = init_checkpoint("tiny", tmp_path / "tiny-standalone-small", seed=3, standalone="small")
    rows = tmp_path / "rows.jsonl"
    argv = [str(small), "--guidance", "1.0,2.0", "--num-images", "20", "--seed-sets", "2", "--rows", str(rows)]
    script(argv)
    first, first_log = capsys.readouterr().out, caplog.text
    kept = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [e["row"]["guidance_scale"] for e in kept] == [1.0, 2.0] and all(e["row"]["fid_gap"] for e in kept)
    caplog.clear()
    script(argv)
    second, second_log = capsys.readouterr().out, caplog.text
    assert rows.read_text().splitlines() == [json.dumps(e) for e in kept]  # nothing measured again
    assert "kept from" in second_log and "kept from" not in first_log
    table = [line for line in first.splitlines() if line.startswith("| tiny-standalone-small")]
    assert table and table == [line for line in second.splitlines() if line.startswith("| tiny-standalone-small")]
