"""scripts/baseline_guidance.py: a baseline at several guidance scales with its data set's evaluator, its rows kept in
a sweep's rows.jsonl so that a rerun (or the sweep) measures them once."""

import json
import logging

import pytest

from tests.scripts import load_script

pytestmark = pytest.mark.slow  # samples and evaluates


def test_rows_are_measured_once_and_shared_through_rows_jsonl(tmp_path, keeps_autograd, capsys, caplog):
    """The script's main in this process: the test split's statistics are shared with the evaluator tests."""
    script = load_script("baseline_guidance").main
    from dualrate.init import init_checkpoint

    caplog.set_level(logging.INFO, logger="dualrate.eval")
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
