"""Is the baselines' FID held back by the pair's guidance scale? The standalone checkpoints at other guidance scales,
at the default steps, on the sweep's seed sets (the same evaluator and seeds as docs/sweep.md).

    python scripts/baseline_guidance.py --guidance 1.0,1.25 --out docs/baseline_guidance.md \
        checkpoints/mnist-standalone-large checkpoints/mnist-standalone-small

Raw output (every set's FID) beside the report.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict
from pathlib import Path

import torch

from dualrate.checkpoint import DEFAULT_CHECKPOINT, checkpoint_hash, load_checkpoint
from dualrate.eval import Evaluator, RowStore, dataset_of, markdown_table, run_sweep
from dualrate.provenance import command_line, provenance, publish, utc_stamp


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", type=Path, nargs="+", help="standalone checkpoints")
    p.add_argument("--guidance", default="1.0,1.25", help="comma-separated guidance scales")
    p.add_argument("--num-images", type=int, default=800, help="per seed set (docs/sweep.md: 800)")
    p.add_argument("--seed-sets", type=int, default=3)
    p.add_argument("--seed", type=int, default=10_000, help="first seed (docs/sweep.md: 10000)")
    p.add_argument("--out", type=Path, default=None, help="append the report to this markdown file")
    p.add_argument("--rows", type=Path, default=None,
                   help="a sweep's rows.jsonl (dualrate.eval) to take finished rows from and add these to, e.g. "
                   "docs/fashion/rows.jsonl: a later sweep with the same images, seeds and sets reuses them")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: one per core)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_grad_enabled(False)
    if a.threads:
        torch.set_num_threads(a.threads)
    steps = load_checkpoint(DEFAULT_CHECKPOINT).defaults.steps
    datasets = {dataset_of(load_checkpoint(c).card) for c in a.checkpoints}
    if len(datasets) != 1:
        p.error(f"the checkpoints were trained on different data sets: {sorted(datasets)}")
    ev, rows = Evaluator(dataset=datasets.pop()), []
    store = RowStore(a.rows, a.num_images, a.seed, a.seed_sets, ev.spaces) if a.rows else None
    for path in a.checkpoints:
        model = load_checkpoint(path)
        configs = [(steps, model.defaults.encoder_interval, float(g), "guidance") for g in a.guidance.split(",")]
        # The pair's rows are named "dual-rate", as in sweep.md, so the table prints their K and encoder calls.
        name = model.card.get("name", path.name) if model.cfg.standalone else "dual-rate"
        rows += run_sweep(model, ev, a.num_images, configs, a.seed, a.seed_sets, name=name, store=store)
    command = command_line("python scripts/baseline_guidance.py", argv)
    lines = [f"### Baselines at other guidance scales, {utc_stamp()}", "", f"Command: `{command}`", "",
             f"{a.seed_sets} seed sets of {a.num_images} images from seed {a.seed}, N = {steps}: the sets and evaluator "
             "of docs/sweep.md, whose rows are at guidance 1.5; FID against the test split of the checkpoints' data set.", "",
             markdown_table(rows)]
    publish(lines, a.out, {**provenance(DEFAULT_CHECKPOINT, command), "checkpoints": {str(c): checkpoint_hash(c) for c in a.checkpoints},
                           "rows": [asdict(r) for r in rows]})


if __name__ == "__main__":
    main()
