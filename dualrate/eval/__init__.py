"""The project's evaluator, as a package (the CLI is `python -m dualrate.eval`, its usage in cli.py):

- `fid`: FID in a data set's two classifiers' feature spaces and class accuracy (`Evaluator`), the served pictures'
  round trip (`quantize`, `from_pictures`), sample grids;
- `sweep`: the rows of a sweep over steps, K and guidance on disjoint seed sets (`run_sweep`, `SweepRow`, `RowStore`);
- `report`: the markdown table, the plots and the comparisons with the standalone baselines;
- `card`: a model card's quality from a committed sweep;
- `cli`: the command line (sweep, `--check`, `--card-from-sweep`, `--kept-only`, `--replot`).
"""

from dualrate.research import require_research_extra

require_research_extra("dualrate.eval")  # before the imports that need it: one line, not a traceback


from dualrate.eval.card import card_from_sweep, sweep_images_per_row
from dualrate.eval.cli import main
from dualrate.eval.fid import Evaluator, dataset_of, feature_stats, frechet_distance, from_pictures, quantize, reference_stats, save_grid
from dualrate.eval.report import best_guidance_report, comparisons, markdown_table, pareto_plot, plot
from dualrate.eval.sweep import RowStore, SweepRow, baseline_configs, best_guidance, generate, run_sweep, seed_set_starts, sweep_configs

__all__ = [
    "Evaluator",
    "RowStore",
    "SweepRow",
    "baseline_configs",
    "best_guidance",
    "best_guidance_report",
    "card_from_sweep",
    "comparisons",
    "dataset_of",
    "feature_stats",
    "frechet_distance",
    "from_pictures",
    "generate",
    "main",
    "markdown_table",
    "pareto_plot",
    "plot",
    "quantize",
    "reference_stats",
    "run_sweep",
    "save_grid",
    "seed_set_starts",
    "sweep_configs",
    "sweep_images_per_row",
]
