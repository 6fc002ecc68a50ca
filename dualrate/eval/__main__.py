"""`python -m dualrate.eval`: the evaluator's command line (dualrate/eval/cli.py)."""

from dualrate.eval.cli import run

run()
