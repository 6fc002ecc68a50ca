"""A distilled few-step student beside its teacher, on the evaluator's seed sets (issue 26's comparison).

    python -m dualrate.evaluate_distilled --student checkpoints/mnist-dualrate-8step --out docs/distill

Rows, every one on the same `--seed-sets` disjoint sets of `--num-images` conditional samples, FID in both feature
spaces of the data set's classifiers and class accuracy (as `python -m dualrate.eval`):

- the student at its distilled schedule (its card's steps and K, guidance 1.0: the guidance was distilled in);
- the teacher undistilled at the student's schedule, at the teacher's guidance (the naive few-step baseline) and
  at guidance 1.0 (the same FLOPs per image as the student);
- the teacher at its own defaults (e.g. 32 steps, K = 4) and at K = 1.

The report (OUT/distilled.md, raw OUT/distilled.json with date, machine, commit and both checkpoints' hashes) states
the three targets as measured in each feature space: student FID <= 1.25 x the teacher's default FID (with the
spread), FLOPs per image <= 0.3 x, and FID clearly (beyond the spread) below the undistilled teacher at the student's
schedule. Finished rows are kept in OUT/rows.jsonl (a rerun measures only what is missing). OUT/distilled_grid.png:
the student's samples above the undistilled teacher's at the same seeds.
"""

from __future__ import annotations

from dualrate.research import require_research_extra

require_research_extra("dualrate.evaluate_distilled")  # before the imports that need it: one line, not a traceback

import argparse
import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

import torch

from dualrate.checkpoint import LoadedModel, checkpoint_hash, distilled_schedule, distilled_teacher, load_checkpoint
from dualrate.eval import Evaluator, RowStore, SweepRow, dataset_of, generate, markdown_table, run_sweep, save_grid
from dualrate.provenance import command_line, provenance, utc_stamp

log = logging.getLogger("dualrate.evaluate_distilled")

FID_TARGET = 1.25  # student FID <= 1.25 x the teacher's at its defaults
FLOPS_TARGET = 0.3  # at <= 0.3 x its FLOPs per image


def teacher_of(student: LoadedModel, teacher: Path | None) -> Path:
    """The teacher's checkpoint: the one given, or the folder of the card's teacher name beside the student's."""
    found = teacher or distilled_teacher(Path(student.path), student.card)
    if found is None:
        raise SystemExit(f"{student.path} is not a distilled student (its card has no 'distilled' section)")
    return found


def student_rows(student: LoadedModel, teacher: LoadedModel, ev: Evaluator, n_images: int, seed: int, seed_sets: int,
                 store: RowStore | None) -> dict[str, SweepRow]:
    """The comparison's rows by role: student, teacher_few (its guidance), teacher_few_g1, teacher_default,
    teacher_k1."""
    steps, k = distilled_schedule(student.card) or (student.defaults.steps, student.defaults.encoder_interval)
    td = teacher.defaults
    s_name, t_name = f"dual-rate student ({student.card.get('name', 'student')})", \
        f"dual-rate teacher ({teacher.card.get('name', 'teacher')})"
    [s_row] = run_sweep(student, ev, n_images, [(steps, k, 1.0, "distilled")], seed, seed_sets, name=s_name,
                        store=store)
    t_rows = run_sweep(teacher, ev, n_images, [
        (steps, k, td.guidance_scale, "undistilled, the student's schedule"),
        (steps, k, 1.0, "undistilled, the student's schedule and FLOPs"),
        (td.steps, td.encoder_interval, td.guidance_scale, "the teacher's defaults"),
        (td.steps, 1, td.guidance_scale, "the teacher, encoder every step"),
    ], seed, seed_sets, name=t_name, store=store)
    # A kept row carries the name it was measured under (e.g. a snapshot's, copied to a checkpoint): name it now.
    s_row, t_rows = replace(s_row, model=s_name), [replace(r, model=t_name) for r in t_rows]
    return dict(zip(["student", "teacher_few", "teacher_few_g1", "teacher_default", "teacher_k1"], [s_row, *t_rows],
                    strict=True))


def verdicts(rows: dict[str, SweepRow], spaces: list[str]) -> list[str]:
    """The targets as measured, one line each per feature space."""
    s, few, base = rows["student"], rows["teacher_few"], rows["teacher_default"]
    flops = s.gflops_per_image / base.gflops_per_image
    lines = [f"- FLOPs per image: {s.gflops_per_image:.2f} against {base.gflops_per_image:.2f} GFLOPs = {flops:.3f}x "
             f"(target <= {FLOPS_TARGET}x): {'met' if flops <= FLOPS_TARGET else 'not met'}."]
    for space in spaces:
        (fs, ss), (fb, sb), (ff, sf) = s.in_space(space), base.in_space(space), few.in_space(space)
        bound = FID_TARGET * fb + sb
        lines.append(f"- {space} features: student {fs:.2f} ± {ss:.2f} against the teacher's defaults {fb:.2f} ± {sb:.2f}"
                     f" = {fs / fb:.2f}x; target {fs:.2f} <= {FID_TARGET} x {fb:.2f} + {sb:.2f} = {bound:.2f}: "
                     f"{'met' if fs <= bound else 'not met'}.")
        clear = fs + ss < ff - sf
        lines.append(f"- {space} features: student {fs:.2f} ± {ss:.2f} against the undistilled teacher at the same "
                     f"schedule {ff:.2f} ± {sf:.2f} ({ff / fs:.2f}x higher): "
                     f"{'clearly better (beyond both spreads)' if clear else 'not clearly better'}.")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dualrate.evaluate_distilled", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", type=Path, required=True, help="the distilled checkpoint (python -m dualrate.distill)")
    p.add_argument("--teacher", type=Path, default=None,
                   help="the teacher's checkpoint (default: the folder its card names, beside the student's)")
    p.add_argument("--num-images", type=int, default=800, help="samples per row and seed set")
    p.add_argument("--seed-sets", type=int, default=3, help="disjoint seed sets per row (mean ± std over them)")
    p.add_argument("--seed", type=int, default=10_000, help="first seed (the evaluator's sweeps: 10000)")
    p.add_argument("--out", type=Path, default=Path("runs/distilled"), help="report folder")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: one per core)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    student = load_checkpoint(a.student)
    teacher_path = teacher_of(student, a.teacher)
    teacher = load_checkpoint(teacher_path)
    if dataset_of(student.card) != dataset_of(teacher.card):
        p.error(f"the student was trained on {dataset_of(student.card)}, the teacher on {dataset_of(teacher.card)}")
    ev = Evaluator(dataset=dataset_of(student.card))
    a.out.mkdir(parents=True, exist_ok=True)
    store = RowStore(a.out / "rows.jsonl", a.num_images, a.seed, a.seed_sets, ev.spaces)
    rows = student_rows(student, teacher, ev, a.num_images, a.seed, a.seed_sets, store)
    s, few = rows["student"], rows["teacher_few"]
    grid_s = generate(student, 50, s.steps, s.encoder_interval, 1.0, seed=0, batch=50)[0]
    grid_t = generate(teacher, 50, few.steps, few.encoder_interval, few.guidance_scale, seed=0, batch=50)[0]
    save_grid(torch.cat([grid_s, grid_t]), a.out / "distilled_grid.png")
    command = command_line("python -m dualrate.evaluate_distilled", argv)
    lines = [f"# A distilled student beside its teacher ({utc_stamp()})", "",
             f"Command: `{command}`", "",
             "Raw output: [distilled.json](distilled.json) (every set's FID, date, machine, commit, checkpoint hashes).",
             "", f"{a.seed_sets} disjoint seed sets of {a.num_images} conditional samples per row (seeds {a.seed} "
             f"onward, the same for every row), {torch.get_num_threads()} torch threads; FID ± its standard deviation "
             "over the sets; images/s of the evaluator's PyTorch loop (batch 250), not the service.", "",
             markdown_table(list(rows.values())), "", "Targets:", "", *verdicts(rows, ev.spaces), "",
             "Samples (seeds 0-49, labels 0-9 in turn): the student's five rows above the undistilled teacher's at "
             "the same schedule and seeds: ![student and teacher](distilled_grid.png)", ""]
    (a.out / "distilled.md").write_text("\n".join(lines))
    raw = {**provenance(a.student, command), "teacher": str(teacher_path),
           "teacher_sha256": checkpoint_hash(teacher_path), "num_images": a.num_images, "seed": a.seed,
           "seed_sets": a.seed_sets, "rows": {role: asdict(r) for role, r in rows.items()}}
    (a.out / "distilled.json").write_text(json.dumps(raw, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
