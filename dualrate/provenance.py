"""Where a measurement came from: date, machine, git commit and checkpoint hash, stored beside every raw result."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dualrate.checkpoint import checkpoint_hash

ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        # Changes under docs/ (the tables a benchmark run appends to) do not make the code differ from the commit.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() + ("+uncommitted changes" if dirty else "") if out.returncode == 0 else "unknown"


def command_line(program: str, argv: list[str] | None) -> str:
    """The command a report was made with, to rerun it: `program` (e.g. "python -m loadtests.overload") and its
    arguments (`argv`, or the process's own when None)."""
    return f"{program} {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip()


def utc_stamp() -> str:
    """Now, as a report heading shows it: 2026-11-27 09:25 UTC."""
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def provenance(checkpoint: Path, command: str) -> dict[str, Any]:
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"), "command": command,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.processor() or platform.system()}",
            "git_commit": git_commit(), "checkpoint": str(checkpoint),
            "checkpoint_sha256": checkpoint_hash(Path(checkpoint))}


def record_raw(markdown: Path, record: dict[str, Any]) -> str:
    """Append `record` to the raw-results file beside `markdown` (<name>.json, {"runs": [...]}); -> a markdown line
    that points a table at it."""
    raw_path = Path(markdown).with_suffix(".json")
    runs = json.loads(raw_path.read_text())["runs"] if raw_path.is_file() else []
    raw_path.write_text(json.dumps({"runs": [*runs, record]}, indent=2) + "\n")
    return (f"Raw output: [{raw_path.name}]({raw_path.name}), run {len(runs)} (date {record.get('date')}, commit "
            f"{str(record.get('git_commit'))[:12]}, checkpoint sha256 {str(record.get('checkpoint_sha256'))[:12]}).")


def publish(lines: list[str], out: Path | None, raw: dict[str, Any] | None) -> str:
    """Print a benchmark's markdown report; with `out`, store `raw` beside it (record_raw), link it under the report's
    command line (lines[4]) and append the report to `out`. -> the report."""
    if out is not None and raw is not None:
        lines = [*lines[:4], record_raw(out, raw), "", *lines[4:]]
    report = "\n".join(lines) + "\n"
    print(report)
    if out is not None:
        with Path(out).open("a") as f:
            f.write("\n" + report)
    return report
