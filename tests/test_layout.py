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
    probe.write_text("import torch\nfrom experiments.errors import ConfigError\nfrom las_env import data\n")
    assert _imported_rooms(probe) == {"experiments", "las_env"}


def test_no_module_over_the_limit():
    long = {str(p.relative_to(ROOT)): n for room in ROOMS for p in _modules(room)
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them along their jobs): {long}"
