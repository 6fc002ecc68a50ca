"""loadtests.jobs_bench on a very short run: every part measures what it reports (submit latencies and the store's
size, checkpoint writes on one side only, interactive latencies idle and beside a job backlog) and the raw JSON is
written beside the report."""

from __future__ import annotations

import json

import pytest

from loadtests import jobs_bench


@pytest.mark.slow
def test_a_short_run_measures_every_part_and_records_it(tmp_path):
    out = tmp_path / "jobs.md"
    jobs_bench.main(["--jobs", "20", "--pairs", "1", "--window", "2", "--checkpoint-jobs", "1",
                     "--checkpoint-steps", "48", "--out", str(out)])
    raw = json.loads(out.with_suffix(".json").read_text())["runs"][-1]
    sub, ck, it = raw["submit"], raw["checkpoints"], raw["interactive"]
    assert sub["jobs"] == 20 and 0 < sub["submit_p50_ms"] <= sub["submit_p99_ms"] and sub["store_bytes"] > 0
    assert ck["windows"][0]["on"] > 0 and ck["windows"][0]["off"] > 0 and ck["mean_on_over_off"] > 0
    assert len(it["idle_s"]) == len(it["busy_s"]) == 5 and it["active_images_at_start"] > 0
    assert it["bound_s"] > 0.5 and it["batch_images_per_s_alone"] > 0
    text = out.read_text()
    assert "**Submit**" in text and "| pair | on images/s |" in text and "Interactive beside a job backlog" in text
