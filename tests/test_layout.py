"""The house rules of docs/architecture.md: imports run one way, and modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("las_env", "evaluation", "agents", "experiments", "benchmarks", "examples")
MAY_IMPORT = {
    "las_env": {"las_env"},
    "evaluation": {"las_env", "evaluation"},
    "agents": {"agents", "las_env"},
    "examples": {"agents", "evaluation", "las_env", "examples"},
    "experiments": {"experiments", "agents", "evaluation", "las_env"},
    "benchmarks": set(ROOMS),
}
MAX_LINES = 400
# experiments/ is grouped by job: a few entry points on top, the rest in sub-packages that import
# one way only (docs/architecture.md). A sub-package not listed here fails the test below.
EXPERIMENTS_TOP = {"__init__.py", "run.py", "evaluate.py", "compare.py"}
EXPERIMENTS_MAY_IMPORT = {
    "config": {"config"},
    "runfolder": {"config", "runfolder"},
    "tracking": {"config", "tracking"},
    "training": {"config", "runfolder", "tracking", "training"},
    "comparison": {"config", "runfolder", "tracking", "comparison"},
    "evaluation_job": {"config", "runfolder", "evaluation_job"},
}
EXPERIMENTS_MAX_LINES = 4000  # issue 19: the run plumbing must not outgrow the game (it was 4,785)


def _modules(room: str) -> list[Path]:
    return sorted((ROOT / room).rglob("*.py"))


def _imported_rooms(path: Path) -> set[str]:
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        rooms.update(n.split(".")[0] for n in names if n.split(".")[0] in ROOMS)
    return rooms


@pytest.mark.parametrize("room", ROOMS)
def test_imports_run_one_way(room):
    bad = {str(p.relative_to(ROOT)): sorted(_imported_rooms(p) - MAY_IMPORT[room]) for p in _modules(room)}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, (f"{room}/ may import only {sorted(MAY_IMPORT[room])} (docs/architecture.md); these modules "
                     f"import rooms above them: {bad}. Move the shared code down a layer.")


def test_the_rule_sees_a_forbidden_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import torch\nfrom experiments.config.errors import ConfigError\nfrom las_env import data\n")
    assert _imported_rooms(probe) == {"experiments", "las_env"}


def test_no_module_over_the_limit():
    long = {str(p.relative_to(ROOT)): n for room in ROOMS for p in _modules(room)
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them along their jobs): {long}"


def _experiments_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] == "experiments":
                found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("experiments."))
    return found


def test_experiments_is_grouped_by_job():
    top = {p.name for p in (ROOT / "experiments").glob("*.py")}
    assert top <= EXPERIMENTS_TOP, (f"experiments/ keeps only its entry points on top ({sorted(EXPERIMENTS_TOP)}); "
                                    f"move {sorted(top - EXPERIMENTS_TOP)} into the sub-package of its job")
    packages = {p.parent.name for p in (ROOT / "experiments").glob("*/__init__.py")}
    assert packages == set(EXPERIMENTS_MAY_IMPORT), (
        f"experiments/ sub-packages {sorted(packages)} differ from the layout rule's "
        f"{sorted(EXPERIMENTS_MAY_IMPORT)}: add the new one to EXPERIMENTS_MAY_IMPORT with what it may import")
    undocumented = [name for name in packages if not ast.get_docstring(ast.parse(
        (ROOT / "experiments" / name / "__init__.py").read_text()))]
    assert not undocumented, f"each sub-package opens with a docstring saying what it owns and may import: {undocumented}"


@pytest.mark.parametrize("package", sorted(EXPERIMENTS_MAY_IMPORT))
def test_experiments_subpackages_import_one_way(package):
    bad = {str(p.relative_to(ROOT)): sorted(_experiments_packages(p) - EXPERIMENTS_MAY_IMPORT[package])
           for p in sorted((ROOT / "experiments" / package).rglob("*.py"))}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, (f"experiments/{package}/ may import only experiments.{sorted(EXPERIMENTS_MAY_IMPORT[package])}; "
                     f"these modules reach elsewhere: {bad}. Move the shared piece down to the package both may import.")


def test_experiments_stays_small():
    lines = sum(len(p.read_text().splitlines()) for p in (ROOT / "experiments").rglob("*.py"))
    assert lines <= EXPERIMENTS_MAX_LINES, (f"experiments/ has {lines} lines of Python (limit {EXPERIMENTS_MAX_LINES}): "
                                            "the run plumbing must not outgrow the game; simplify before adding")
