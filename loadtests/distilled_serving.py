"""Served images/s of a distilled few-step student against its teacher at the teacher's defaults, side by side.

    python -m loadtests.distilled_serving --student checkpoints/mnist-dualrate-8step --out docs/runs/distilled_serving.md

Two services on loopback (ONNX Runtime, CPU), one per checkpoint, both started before the first measurement; each
round measures the teacher, then the student, at saturation (2 x slots closed-loop clients sending 1-image requests
at the card's defaults: the student's distilled schedule, the teacher's N, K and guidance). Only one service is
under load at a time. Reports each round's images/s and the median of the per-round ratios, with the raw output
beside the report (date, machine, commit, both checkpoints' hashes).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import platform
import statistics
from pathlib import Path

import httpx

from dualrate.checkpoint import checkpoint_hash, distilled_teacher, load_checkpoint
from dualrate.provenance import command_line, provenance, publish, utc_stamp
from loadtests.clients import closed_loop
from loadtests.process import ServerProcess

log = logging.getLogger("loadtests.distilled_serving")


def default_body(checkpoint: Path) -> tuple[dict, int]:
    """A 1-image request at the checkpoint's defaults, and its number of classes."""
    m = load_checkpoint(checkpoint)
    d = m.defaults
    return ({"num_images": 1, "steps": d.steps, "encoder_interval": d.encoder_interval,
             "guidance_scale": d.guidance_scale}, m.cfg.num_classes)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.distilled_serving", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", type=Path, required=True, help="the distilled checkpoint")
    p.add_argument("--teacher", type=Path, default=None,
                   help="the checkpoint to compare with (default: the teacher its card names, beside it)")
    p.add_argument("--rounds", type=int, default=3, help="teacher-then-student measurements")
    p.add_argument("--seconds", type=float, default=20.0, help="per measurement")
    p.add_argument("--slots", type=int, default=16, help="max_active_images of each service")
    p.add_argument("--out", type=Path, default=None, help="append the report to this markdown file")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    student = load_checkpoint(a.student)
    teacher_path = a.teacher or distilled_teacher(a.student, student.card)
    if teacher_path is None:
        p.error(f"{a.student} has no 'distilled' section in its card: pass --teacher")
    arms = {"teacher": teacher_path, "student": Path(a.student)}
    bodies = {name: default_body(path) for name, path in arms.items()}
    servers = {name: ServerProcess(path, Path(f"/tmp/dualrate-distilled-{name}.log"), max_active_images=a.slots,
                                   max_images_per_request=a.slots, queue_size=1024) for name, path in arms.items()}
    ips: dict[str, list[float]] = {name: [] for name in arms}
    try:
        for srv in servers.values():
            srv.wait_ready()
        for name, srv in servers.items():  # each answers with the schedule asked before it is measured
            r = httpx.post(f"{srv.url}/generate", json={**bodies[name][0], "class_label": 1}, timeout=120)
            r.raise_for_status()
        for i in range(a.rounds):
            for name, srv in servers.items():
                body, classes = bodies[name]
                value, _ = asyncio.run(closed_loop(srv.url, 2 * a.slots, a.seconds, body, classes))
                ips[name].append(value)
                log.info("round %d %s: %.2f images/s", i + 1, name, value)
    finally:
        for srv in servers.values():
            srv.terminate()
    ratios = [s / t for s, t in zip(ips["student"], ips["teacher"], strict=True)]
    tb, sb = bodies["teacher"][0], bodies["student"][0]
    command = command_line("python -m loadtests.distilled_serving", argv)
    lines = [f"### Distilled student against its teacher, served, {utc_stamp()}, {platform.machine()} CPU, onnxruntime",
             "", f"Command: `{command}`", "",
             f"1-image requests, {2 * a.slots} closed-loop clients per service, max_active_images = {a.slots}, "
             f"{a.seconds:.0f} s per measurement, teacher then student in each round.", "",
             "| round | teacher images/s | student images/s | student / teacher |", "|---:|---:|---:|---:|",
             *[f"| {i + 1} | {t:.2f} | {s:.2f} | {r:.2f}x |"
               for i, (t, s, r) in enumerate(zip(ips["teacher"], ips["student"], ratios, strict=True))],
             "", f"Teacher ({teacher_path}): N = {tb['steps']}, K = {tb['encoder_interval']}, guidance "
             f"{tb['guidance_scale']}; student ({a.student}): N = {sb['steps']}, K = {sb['encoder_interval']}, guidance "
             f"{sb['guidance_scale']}. Median ratio over {a.rounds} rounds: {statistics.median(ratios):.2f}x "
             f"(range {min(ratios):.2f}-{max(ratios):.2f}).", ""]
    raw = {**provenance(a.student, command), "teacher": str(teacher_path), "teacher_sha256": checkpoint_hash(teacher_path),
           "slots": a.slots, "seconds": a.seconds, "requests": bodies, "images_per_s": ips, "ratios": ratios}
    publish(lines, a.out, raw)


if __name__ == "__main__":
    main()
