"""The project's evaluator: FID in two classifiers' feature spaces, class accuracy, sample grids, and a sweep.

    python -m dualrate.eval --num-images 800 --seed-sets 3 \
        --baselines checkpoints/mnist-standalone-large checkpoints/mnist-standalone-small --out docs

The sweep reports, per (steps N, interval K, guidance), FID against the test split of the data set the checkpoint was
trained on (its card says which: MNIST or Fashion-MNIST) in the feature spaces of that data set's two classifiers
(`cnn`, the project's, and `gap`, another architecture: `python -m dualrate.classifier`), class accuracy of the
conditional samples, counted model FLOPs per image and images/s measured on this machine, as a markdown table and
a plot of FID against FLOPs. Every row is run on `--seed-sets` disjoint seed sets (the same sets for every row) and
reported as mean and standard deviation over the sets. Two control rows: K = N (one encoder call per image) and the
light network with zeroed features (no encoder at all). `--baselines`: standalone checkpoints (`python -m
dualrate.train --standalone ...`), swept over steps 8-64 on the same seeds; the report then says how dual-rate compares
at matched FID and at matched FLOPs. `--guidance 1.0,1.25,1.5,2.0 --sweep-steps 8,16,32,64 --sweep-ks 1,2,4,8` sweeps
every guidance instead (the pair over K at its steps and over steps at its K, the baselines over steps) and reports
every model at its best guidance per point, in both feature spaces (OUT/pareto.png).
Finished rows are kept in OUT/rows.jsonl: the same command, rerun after a stop, measures only the rows still missing.
`--kept-only` measures nothing: it reports the rows finished so far and lists the grid's rows still missing.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
from dataclasses import asdict
from datetime import date
from pathlib import Path

import torch

from dualrate.checkpoint import CARD_FILE, DEFAULT_CHECKPOINT, checkpoint_hash, load_checkpoint, weights_hash
from dualrate.data import DATASETS
from dualrate.eval.card import card_from_sweep, sweep_images_per_row
from dualrate.eval.fid import Evaluator, dataset_of, save_grid
from dualrate.eval.report import best_guidance_report, comparisons, markdown_table, pareto_plot, plot
from dualrate.eval.sweep import RowStore, SweepRow, baseline_configs, generate, run_sweep, sweep_configs
from dualrate.provenance import command_line, provenance

log = logging.getLogger("dualrate.eval")


@torch.no_grad()  # a decorator, not set_grad_enabled: callers in the same process keep autograd
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--num-images", type=int, default=400,
                   help="samples per sweep row and seed set (FID against the 10k test set)")
    p.add_argument("--seed-sets", type=int, default=3,
                   help="disjoint seed sets per row (mean and standard deviation over them; 1 = no spread)")
    p.add_argument("--baselines", type=Path, nargs="*", default=[],
                   help="standalone checkpoints to sweep over steps 8-64 on the same seeds (e.g. "
                   "checkpoints/mnist-standalone-large checkpoints/mnist-standalone-small)")
    p.add_argument("--out", type=Path, default=Path("runs/evaluate"),
                   help="where the tables, raw JSON and plots go (default runs/evaluate, untracked; `make evaluate` "
                   "passes --out docs to refresh the committed ones)")
    p.add_argument("--sweep", type=Path, default=Path("docs/sweep.json"),
                   help="the committed sweep that --check compares with and --card-from-sweep reads")
    p.add_argument("--update-card", action="store_true", help="write the sweep's figures into the model card")
    p.add_argument("--card-from-sweep", action="store_true",
                   help="write the dual-rate rows of --sweep (mean and spread over its seed sets) into the model card "
                   "without sampling again; refused unless --sweep was measured on this checkpoint's weights")
    p.add_argument("--update-baseline-cards", action="store_true",
                   help="write each baseline's rows into its own model card")
    p.add_argument("--check", action="store_true",
                   help="only K = 1, 4, 8 and zeroed features at the default steps, side by side with the committed "
                   "sweep (--sweep): writes OUT/check.md and OUT/check.json (e.g. after a change to the sampler's noise). "
                   "Took 363 s on 2 cores at --num-images 800 (2026-11-30; an estimate is logged at the start, from the "
                   "committed sweep's images/s, which runs faster than a check)")
    p.add_argument("--seed", type=int, default=10_000,
                   help="first seed: the seed sets are the next --num-images seeds each (sweep.json: 10000)")
    p.add_argument("--ks", default="1,4,8,zeroed", help="--check: the rows, K values or 'zeroed'")
    p.add_argument("--name", default="check", help="--check: output file name (<name>.md, <name>.json)")
    p.add_argument("--replot", action="store_true", help="only redraw OUT/fid_vs_flops.png from OUT/sweep.json")
    p.add_argument("--guidance", type=floats, default=None, metavar="G,G,...",
                   help="sweep these guidance scales for every model (e.g. 1.0,1.25,1.5,2.0) and report each model at "
                   "its best guidance per point (tables in both feature spaces, OUT/pareto.png); default: the card's")
    p.add_argument("--sweep-steps", type=ints, default=None, metavar="N,N,...",
                   help="steps to sweep (e.g. 8,16,32,64): the pair at its card's K, the baselines (default: the card's "
                   "for the pair, N/4..2N for the baselines)")
    p.add_argument("--sweep-ks", type=ints, default=None, metavar="K,K,...",
                   help="the pair's encoder intervals to sweep at its card's steps (e.g. 1,2,4,8; default: the card's K)")
    p.add_argument("--steps-k", type=int, default=None, metavar="K",
                   help="the pair's encoder interval for the --sweep-steps rows (default: the card's K)")
    p.add_argument("--kept-only", action="store_true",
                   help="measure nothing: report the grid from the rows already in OUT/rows.jsonl and list those still "
                   "missing (a long sweep's interim report; the samples grid is left as it is)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: one per core)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.replot:
        rows = [SweepRow(**r) for r in json.loads((a.out / "sweep.json").read_text())]
        d0 = load_checkpoint(a.checkpoint).defaults
        plot(rows, a.out / "fid_vs_flops.png", d0.steps, d0.guidance_scale)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if a.check:
        check(a, argv)
        return
    if a.card_from_sweep:
        card_from_sweep(a.checkpoint, a.sweep)
        return
    model = load_checkpoint(a.checkpoint)
    base_models = {path: load_checkpoint(path) for path in a.baselines}
    for path, base in base_models.items():
        if not base.cfg.standalone:
            p.error(f"--baselines {path}: not a standalone checkpoint (its card's config kind is {base.cfg.kind!r}); "
                    "train one with `python -m dualrate.train --standalone large|small`")
    dataset = dataset_of(model.card)
    for path, base in base_models.items():
        if dataset_of(base.card) != dataset:
            p.error(f"--baselines {path} was trained on {dataset_of(base.card)}, the pair on {dataset}")
    ev = Evaluator(dataset=dataset)
    d = model.defaults
    a.out.mkdir(parents=True, exist_ok=True)
    if not a.kept_only:
        grid, _, _, _ = generate(model, 100, d.steps, d.encoder_interval, d.guidance_scale, seed=0, batch=100)
        save_grid(grid, a.out / "samples_grid.png")
    done = RowStore(a.out / "rows.jsonl", a.num_images, a.seed, a.seed_sets, ev.spaces)
    missing: list[tuple[str, int, int | None, float]] | None = [] if a.kept_only else None
    rows = run_sweep(model, ev, a.num_images, sweep_configs(d.steps, d.guidance_scale, a.guidance, a.sweep_steps,
                                                            a.sweep_ks, a.steps_k or d.encoder_interval),
                     a.seed, a.seed_sets, store=done, missing=missing)
    baselines: dict[Path, list[SweepRow]] = {}
    for path, base in base_models.items():
        baselines[path] = run_sweep(base, ev, a.num_images, baseline_configs(base, d.steps, d.guidance_scale, a.guidance,
                                                                             a.sweep_steps),
                                    a.seed, a.seed_sets, name=base.card.get("name", path.name), store=done,
                                    missing=missing)
        rows += baselines[path]
    if a.kept_only and not rows:
        p.error(f"--kept-only: {a.out / 'rows.jsonl'} holds none of this grid's rows at these settings; run the sweep "
                "without --kept-only first")
    table = markdown_table(rows)
    plot(rows, a.out / "fid_vs_flops.png", d.steps, d.guidance_scale, title=DATASETS[dataset].title)
    command = command_line("python -m dualrate.eval", argv)
    claims = comparisons(rows, d.steps, d.guidance_scale)
    names = DATASETS[dataset].class_names
    when = (f"Reported {date.today().isoformat()} from {a.out / 'rows.jsonl'} (--kept-only: every row was measured by an "
            "earlier run of this sweep, its images/s on that run's threads)" if a.kept_only else
            f"Measured {date.today().isoformat()} on {platform.machine()} ({torch.get_num_threads()} threads)")
    header = (f"{when}: "
              f"{a.seed_sets} disjoint seed sets of {a.num_images} conditional samples per row (labels 0-"
              f"{len(names) - 1} in turn; seeds {a.seed} onward, the same sets for every row), FID against the "
              f"{DATASETS[dataset].title} test split in the 128-d feature space of the project's classifier (`cnn`)"
              + (" and of the second classifier (`gap`, another architecture)" if "gap" in ev.spaces else "")
              + "; FID and accuracy (by the `cnn` classifier) are the mean over the sets, ± their standard "
              f"deviation.\n\nCommand: `{command}`\n\n")
    raw = ("Raw output: [sweep.json](sweep.json) (every set's FID in `fids`); date, machine, commit and checkpoint "
           "hashes: [sweep.provenance.json](sweep.provenance.json).\n\n")
    cmp = ("\n\n## Against the standalone baselines (computed from the rows above)\n\n" + "\n".join(claims) + "\n"
           if claims else "\n")
    if a.guidance and len(a.guidance) > 1:
        cmp += best_guidance_report(rows, d.steps, ev.spaces)
        pareto_plot(rows, a.out / "pareto.png", ev.spaces, DATASETS[dataset].title)
    if missing:
        cmp += (f"\n## Not measured yet ({len(missing)} of the grid's {len(missing) + len(rows)} rows)\n\n"
                "This report was made with `--kept-only` from the rows finished so far; the same command without it "
                "measures these (model, steps N, K, guidance) and keeps the rest:\n\n"
                + "\n".join(f"- {m}, N = {st}" + (f", K = {'zeroed' if k is None else k}" if m.startswith("dual-rate") else "")
                             + f", guidance {g:g}" for m, st, k, g in missing) + "\n")
    (a.out / "sweep.md").write_text("# Sweep: steps, encoder interval, guidance, baselines\n\n" + raw + header + table
                                    + cmp)
    (a.out / "sweep.json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    quality = {"measured": date.today().isoformat(), "num_images_per_row": a.num_images, "seed_sets": a.seed_sets}
    updates = ([(a.checkpoint, rows[: len(rows) - sum(map(len, baselines.values()))])] if a.update_card else [])
    updates += list(baselines.items()) if a.update_baseline_cards else []
    for path, own in updates:
        card_path = path / CARD_FILE
        card = json.loads(card_path.read_text())
        card["quality"] = {**quality, "sweep": [asdict(r) for r in own]}
        card_path.write_text(json.dumps(card, indent=2) + "\n")
    # After the card updates: the hashes are those of the checkpoints as they are left (and committed).
    prov = provenance(a.checkpoint, command)
    prov.update(weights_sha256=weights_hash(a.checkpoint), num_images_per_row=a.num_images)
    prov["baselines"] = {str(path): checkpoint_hash(path) for path in baselines}
    (a.out / "sweep.provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
    print(table + cmp)


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def check(a: argparse.Namespace, argv: list[str] | None) -> None:
    """The quality rows that matter most, against the committed sweep's same rows (same seeds, same evaluator)."""
    model = load_checkpoint(a.checkpoint)
    d = model.defaults
    ks = [None if k == "zeroed" else int(k) for k in a.ks.split(",")]
    configs = [(d.steps, k, d.guidance_scale, "" if k else "zeroed") for k in ks]
    before = {(r["steps"], r["encoder_interval"], r["guidance_scale"]): r
              for r in json.loads(a.sweep.read_text()) if r.get("model", "dual-rate") == "dual-rate"}
    known = [before[c[:3]]["images_per_s"] for c in configs if c[:3] in before]
    if known:
        secs = sum(a.num_images / ips for ips in known) * len(configs) / len(known)
        log.info("--check: %d rows of %d images, at least %.0f min (the committed sweep's images/s, %s; a check ran "
                 "~1.7x that on 2 cores); writing to %s",
                 len(configs), a.num_images, secs / 60, a.sweep, a.out)
    rows = run_sweep(model, Evaluator(), a.num_images, configs, seed=a.seed)
    # The same seeds as a set of the sweep (its first set starts at 10000, each set a.num_images long) are compared
    # with that set's own FID; other seeds with the mean over the sets.
    prov_path = a.sweep.with_name(a.sweep.stem + ".provenance.json")
    per_row = sweep_images_per_row(json.loads(prov_path.read_text())) if prov_path.is_file() else None
    offset = a.seed - 10_000
    same_set = per_row == a.num_images and offset >= 0 and offset % a.num_images == 0
    set_index = offset // a.num_images if same_set else None

    def reference(b: dict) -> float:
        fids = b.get("fids") or []
        return fids[set_index] if set_index is not None and set_index < len(fids) else b["fid"]

    ref_name = f"seed set {set_index + 1} of sweep.json" if set_index is not None else "sweep.json (mean over its sets)"
    lines = [f"| N | K | FID now | FID in {ref_name} | ratio | accuracy now | accuracy in sweep.json (mean) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = before.get((r.steps, r.encoder_interval, r.guidance_scale))
        k = "zeroed" if r.encoder_interval is None else str(r.encoder_interval)
        lines.append(f"| {r.steps} | {k} | {r.fid:.2f} | {reference(b):.2f} | {r.fid / reference(b):.3f} | "
                     f"{100 * r.accuracy:.1f}% | {100 * b['accuracy']:.1f}% |" if b else f"| {r.steps} | {k} | {r.fid:.2f} | | | |")
    command = command_line("python -m dualrate.eval", argv)
    prov = provenance(a.checkpoint, command)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{a.name}.json").write_text(json.dumps({**prov, "seed": a.seed, "rows": [asdict(r) for r in rows]},
                                                     indent=2) + "\n")
    table = "\n".join(lines)
    (a.out / f"{a.name}.md").write_text(
        "# Quality check against the committed sweep\n\n"
        f"Raw output: [{a.name}.json]({a.name}.json) (date {prov['date']}, commit {prov['git_commit'][:12]}, checkpoint "
        f"sha256 {prov['checkpoint_sha256'][:12]}). Command: `{command}`; {a.num_images} conditional samples per row, "
        f"first seed {a.seed} (sweep.json: 10000), the same evaluator as {a.sweep}.\n\n" + table + "\n")
    print(table)
    print(f"written: {a.out / (a.name + '.md')}, {a.out / (a.name + '.json')}")


def run() -> None:
    """`python -m dualrate.eval`."""
    main()
