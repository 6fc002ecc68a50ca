"""The architecture as the imports show it: data flows one way, dualrate -> export -> engines -> service, and the
runtime packages import no tooling (load generators, plotting, progress bars) outside the research modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["dualrate", "export", "engines", "service"]  # each may import those before it, never those after
# (httpx left this list when the job webhooks made it a serving dependency: service.jobs.webhooks.)
TOOLING = {"loadtests", "scripts", "tests", "matplotlib", "scipy", "tqdm", "locust", "selenium", "pytest"}
# The research tools inside dualrate (training and evaluation), installed with the `research` extra.
EVAL = ("__init__", "__main__", "card", "cli", "fid", "report", "sweep")  # the evaluator package, dualrate/eval
RESEARCH = {"dualrate/train.py", *(f"dualrate/eval/{m}.py" for m in EVAL), "dualrate/classifier.py",
            "dualrate/feature_study.py", "dualrate/distill.py", "dualrate/evaluate_distilled.py", "dualrate/research.py"}


def imports(path: Path) -> set[str]:
    """Top-level names of every module `path` imports, at any depth of the file (lazy imports count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", ORDER)
def test_imports_flow_one_way(package):
    later = set(ORDER[ORDER.index(package) + 1:])
    bad = {str(f.relative_to(ROOT)): sorted(imports(f) & later) for f in files(package) if imports(f) & later}
    assert not bad, f"{package} imports a package after it in {' -> '.join(ORDER)}: {bad}"


@pytest.mark.parametrize("package", ORDER)
def test_runtime_packages_import_no_tooling(package):
    bad = {rel: sorted(found) for f in files(package)
           if (rel := str(f.relative_to(ROOT))) not in RESEARCH and (found := imports(f) & TOOLING)}
    assert not bad, f"runtime modules import tooling: {bad}"


def test_the_check_sees_a_lazy_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from engines import create_engine\n    import locust.env\n")
    assert {"engines", "locust"} <= imports(f)


def service_imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, name) for every import of a `service` module in `path`: `from service.core import X` gives
    ("service.core", "X"), `import service.core.loop` gives ("service.core.loop", None)."""
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.split(".")[0] == "service"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "service":
            found += [(node.module, a.name) for a in node.names]
    return found


def core_exports() -> set[str]:
    tree = ast.parse((ROOT / "service" / "core" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return {ast.literal_eval(e) for e in node.value.elts}  # type: ignore[attr-defined]
    raise AssertionError("service/core/__init__.py has no __all__")


def front_end_violations(path: Path, exports: set[str]) -> list[str]:
    """A front-end module may import the core only as `service.core` and only what it exports."""
    bad = []
    for module, name in service_imports(path):
        if module.startswith("service.core."):
            bad.append(f"{module} (a core submodule)")
        elif module == "service.core" and name is not None and name not in exports:
            bad.append(f"service.core.{name} (not exported by service.core)")
    return bad


def core_violations(path: Path) -> list[str]:
    """A core module imports nothing of the service outside `service.core`."""
    return [m for m, _ in service_imports(path) if m != "service.core" and not m.startswith("service.core.")]


def test_the_front_end_sees_only_what_the_core_exports():
    exports = core_exports()
    front = [f for f in files("service") if "core" not in f.relative_to(ROOT / "service").parts]
    bad = {str(f.relative_to(ROOT)): v for f in front if (v := front_end_violations(f, exports))}
    assert not bad, f"front-end modules reach into the engine core: {bad}"


def test_the_core_imports_nothing_of_the_front_end():
    bad = {str(f.relative_to(ROOT)): v for f in files("service/core") if (v := core_violations(f))}
    assert not bad, f"engine-core modules import the front end: {bad}"


def test_the_seam_checks_fail_on_a_violation(tmp_path):
    front, core = tmp_path / "front.py", tmp_path / "core.py"
    front.write_text("from service.core.scheduler import Scheduler\nfrom service.core import protocol\n"
                     "from service.core import Priority\n")
    core.write_text("def f():\n    from service.settings import Settings\n    import service.metrics\n"
                    "from service.core.request import Job\n")
    assert front_end_violations(front, core_exports()) == ["service.core.scheduler (a core submodule)",
                                                          "service.core.protocol (not exported by service.core)"]
    assert core_violations(core) == ["service.settings", "service.metrics"]


def doc_links(md: Path) -> list[str]:
    """Relative link targets in a markdown file (no URLs, no anchors), outside code blocks."""
    import re

    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
    return [m.split("#")[0] for m in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", m) and m[0] != "#"]


def test_every_doc_link_resolves_and_the_index_lists_every_page():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "deploy" / "k8s" / "README.md"]
    broken = [f"{p.relative_to(ROOT)} -> {link}" for p in pages for link in doc_links(p)
              if link and not (p.parent / link).exists()]
    assert not broken, broken
    indexed = {(ROOT / "docs" / link).resolve() for link in doc_links(ROOT / "docs" / "README.md")}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.name != "README.md" and p.resolve() not in indexed]
    assert not missing, f"docs/README.md does not list {missing}"


def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


def test_serving_depends_on_no_tooling_and_the_research_extra_has_it():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower() for d in project["dependencies"]}
    assert not names & TOOLING, f"runtime dependencies that serving does not use: {sorted(names & TOOLING)}"
    research = " ".join(project["optional-dependencies"]["research"])
    assert all(p in research for p in ("matplotlib", "scipy", "tqdm"))


def test_no_geometry_defaults_outside_the_presets():
    # The MNIST shape, crop and label range live in dualrate.config's presets and dualrate.data's MNIST constants;
    # anywhere else they would be silently wrong for another checkpoint.
    import re

    pattern = re.compile(r"1, 32, 32|% 10\b|output_size=28")
    found = [f"{f.relative_to(ROOT)}:{i}" for package in [*ORDER, "loadtests", "scripts"] for f in files(package)
             for i, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, found


def test_runtime_modules_do_not_reach_the_research_tools():
    research = {r.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for r in RESEARCH}
    bad = {}
    for package in ORDER:
        for f in files(package):
            rel = str(f.relative_to(ROOT))
            if rel in RESEARCH:
                continue
            tree = ast.parse(f.read_text())
            mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            mods |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            if mods & research:
                bad[rel] = sorted(mods & research)
    assert not bad, f"serving code imports a research module (needs the research extra): {bad}"
