"""The research tools (training, evaluation, classifiers, distillation) need the `research` extra (plots, progress bars,
SciPy); serving does not. Their entry points check for it first and say in one line what to install."""

from __future__ import annotations

import importlib.util
import sys

EXTRA = ("matplotlib", "scipy", "tqdm")


def require_research_extra(tool: str) -> None:
    """Exit with one line naming the command that installs what `tool` needs, if any of it is missing."""
    missing = [m for m in EXTRA if importlib.util.find_spec(m) is None]
    if missing:
        print(f"{tool} needs the research extra ({', '.join(missing)} missing): run "
              "`.venv/bin/pip install -e '.[research]'` (or `make setup`, which installs it with the dev tools)",
              file=sys.stderr)
        raise SystemExit(2)
