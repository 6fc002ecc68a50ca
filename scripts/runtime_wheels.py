"""Print `name==version` for every package the service needs at run time (pyproject's dependencies and what they
pull in, as installed in this venv), plus pytest and httpx for the GPU tests and checks, minus what a GPU machine
brings itself.
scripts/gpu_vendor.sh downloads these wheels."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PROVIDED = {"torch", "numpy", "onnx", "onnxruntime", "triton", "sympy", "mpmath", "networkx", "jinja2", "markupsafe",
            "fsspec", "filelock", "setuptools", "protobuf", "ml-dtypes"}
RESEARCH = {"matplotlib", "scipy", "tqdm"}  # research tools only (dualrate.eval / train); not on the serving path
TEST = ["pytest", "pytest-timeout", "httpx"]  # the GPU tests and gpu_check's load generator (loadtests.process)


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    todo: list[tuple[Requirement, str]] = [(Requirement(d), "") for d in [*deps, *TEST]]
    seen: dict[str, str] = {}
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canon(req.name)
        if name in PROVIDED or name in RESEARCH or name.startswith("nvidia-"):
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # a platform-specific dependency not installed here
        first = name not in seen
        seen[name] = dist.version
        for sub in dist.requires or []:
            r = Requirement(sub)
            if r.marker is None or first or req.extras:
                for e in sorted(req.extras) or [""]:
                    todo.append((r, e))
    return seen


if __name__ == "__main__":
    print(" ".join(f"{n}=={v}" for n, v in sorted(closure().items())))
