"""Finding and reading finished runs: ``results.json``, plus ``evaluation*.json`` of the same weights."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from experiments.runfolder.runfiles import (CHECKPOINT, EVALUATION_FORMAT, EVALUATION_GLOB, RESULTS_FILE, RESULTS_FORMAT,
                                  WEIGHTS_FILE)
from las_env.datasets.registry import lookup
from las_env.strategy_space import ATTACK_COLUMNS, StrategySpace

WEIGHTS = {"final": "final (last-epoch) weights",
           "best": "best-epoch weights (best.pt: per-epoch PGD accuracy on the held-out validation images)"}
"""Which rows of ``results.json`` a comparison reads (``--weights``), and how the report names them."""
FIXED_TARGET_SUFFIX = "FixedAgent"
NON_LEARNING_TARGETS = ("FixedAgent", "RandomAgent")  # their training ignores the reward settings


class CompareError(ValueError):
    """Bad input; its message is the one paragraph the user sees."""


@dataclass(eq=False)
class Run:
    """One finished run, read from its ``results.json`` (and ``evaluation*.json`` files)."""

    path: Path
    agent: str
    seed: int
    config: dict[str, Any]
    final: dict[str, dict[str, Any]]  # attack name -> row (accuracy, n_images, epsilon, label)
    history: list[dict[str, Any]]
    seconds: dict[str, float]
    threat: str
    per_epoch_attack: str
    data_description: str
    grid: StrategySpace
    cost: dict[str, float] = field(default_factory=dict)  # results.json "cost" (gradients per image); {} in older runs
    fixed_attack: tuple[float, int, float] | None = None  # (epsilon, iterations, step size) played
    posthoc: list[str] = field(default_factory=list)  # attack names read from evaluate.py reports
    notes: list[str] = field(default_factory=list)
    label: str = ""

    @property
    def dataset(self) -> str:
        return str(self.config.get("data", {}).get("name", "?"))

    @property
    def target(self) -> str:
        return str(self.config.get("agent", {}).get("_target_", ""))

    @property
    def is_fixed(self) -> bool:
        return self.target.endswith(FIXED_TARGET_SUFFIX)


def find_runs(paths: Iterable[str | Path]) -> tuple[list[Path], list[Path]]:
    """``results.json`` files under ``paths`` (each a run dir, a folder of them, or the file
    itself), and run folders holding a checkpoint but no results yet (unfinished)."""
    found: dict[Path, None] = {}  # dicts: ordered and without repeats
    unfinished: dict[Path, None] = {}
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise CompareError(f"{p} does not exist. Pass run directories or folders holding them "
                               f"(runs/<data>/<agent>/<model>-seed<seed>-<hash>).")
        files = [p] if p.is_file() else sorted(p.rglob(RESULTS_FILE))
        found.update(dict.fromkeys(f.resolve() for f in files if f.name == RESULTS_FILE))
        checkpoints = sorted(p.rglob(CHECKPOINT)) if p.is_dir() else []
        unfinished.update(dict.fromkeys(c.parent.resolve() for c in checkpoints if not (c.parent / RESULTS_FILE).is_file()))
    return list(found), list(unfinished)


def _posthoc_rows(run_dir: Path, eps: float, final: Mapping[str, Any]) -> tuple[dict[str, dict], list[str]]:
    """Rows of ``experiments/evaluate.py`` reports in ``run_dir`` for attacks the run's own final
    evaluation lacks (typically AutoAttack), when they describe the run's final weights at its
    threat model's eps. Returns (rows, notes)."""
    reports, weights = sorted(run_dir.glob(EVALUATION_GLOB)), run_dir / WEIGHTS_FILE
    fingerprint = _weights_fingerprint(weights) if reports and weights.is_file() else None
    rows: dict[str, dict] = {}
    notes: list[str] = []
    for path in reports:
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        fp = doc.get("fingerprint") or {}
        if doc.get("format") != EVALUATION_FORMAT or not math.isclose(float(fp.get("eps", -1)), eps, rel_tol=1e-6):
            continue
        if fingerprint is None or fp.get("model_sha256") != fingerprint:
            notes.append(f"{path} evaluated other weights than the run's final ones: not used")
            continue
        if doc.get("sanity_passed") is False:
            notes.append(f"{path}: its gradient-masking sanity check FAILED (see that report)")
        for row in doc.get("results", []):
            name = row.get("name")
            if name not in final and (name not in rows or row.get("n_images", 0) > rows[name].get("n_images", 0)):
                rows[name] = {**row, "source": path.name}
    return rows, notes


def _weights_fingerprint(path: Path) -> str | None:
    """The ``model_sha256`` that ``experiments/evaluate.py`` records for these weights."""
    try:
        import torch  # noqa: PLC0415

        from las_env.checkpoint import state_fingerprint  # noqa: PLC0415

        weights = torch.nn.Module()  # state_fingerprint hashes a module's state_dict items, in order
        weights.state_dict = lambda: torch.load(path, map_location="cpu", weights_only=True)  # type: ignore[method-assign]
        return state_fingerprint(weights)
    except Exception:  # noqa: BLE001 - an unreadable file just means no post-hoc rows
        return None


def played_attack(history: Sequence[Mapping[str, Any]], grid: StrategySpace) -> tuple[float, int, float] | None:
    """The one (epsilon, iterations, step size) a fixed agent played, read from the per-epoch
    counts of chosen grid indices; ``None`` when it played more than one value of any."""
    values = {name: grid.values[name] for name in ATTACK_COLUMNS}
    out: dict[str, float] = {}
    for name, grid_values in values.items():
        totals = np.zeros(len(grid_values))
        for h in history:
            counts = (h.get("choices") or {}).get(name)
            if counts is not None and len(counts) == len(grid_values):
                totals += np.asarray(counts, dtype=float)
        used = np.flatnonzero(totals)
        if len(used) != 1:
            return None
        out[name] = grid_values[int(used[0])]
    return float(out["epsilon"]), int(out["iterations"]), float(out["step_size"])


def load_run(path: Path, weights: str = "final") -> Run:
    """The run whose ``results.json`` is ``path``; :class:`CompareError` when it is not JSON, not a run's
    results file, or malformed (``compare`` then skips it with a note)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CompareError(f"{path} cannot be read as JSON ({exc}).") from None
    if not isinstance(doc, dict) or doc.get("format") != RESULTS_FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise CompareError(f"{path} is not a run's results file (format {found!r}, expected {RESULTS_FORMAT!r}).")
    try:
        return _run_of(path, doc, weights)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as exc:
        raise CompareError(f"{path} is malformed ({type(exc).__name__}: {exc}): a results file edited by hand or "
                           f"cut short; re-create it with the run's command plus resume=true.") from None


def _run_of(path: Path, doc: dict[str, Any], weights: str) -> Run:
    config = doc.get("config") or {}
    dataset = str(config.get("data", {}).get("name", "?"))
    final = {r["name"]: r for r in doc.get(weights) or []}
    if not final:
        raise CompareError(f"{path} holds no results for its {WEIGHTS[weights]} (a run without a validation split, "
                           f"or from before best.pt existed); compare with --weights final.")
    threat_eps = [r["epsilon"] for r in final.values() if r.get("epsilon")]
    grid_config = (config.get("data") or {}).get("grid")
    grid = StrategySpace.from_config(grid_config) if grid_config else lookup(dataset).grid
    run = Run(
        path=path.parent,
        agent=str(doc.get("agent") or config.get("agent", {}).get("name") or "agent"),
        seed=int(config.get("seed", 0)),
        config=config,
        final=final,
        history=list(doc.get("history") or []),
        seconds={k: float(v) for k, v in (doc.get("seconds") or {}).items()},
        threat=str(doc.get("threat_model", "")),
        per_epoch_attack=str(doc.get("per_epoch_attack", "")),
        data_description=str(doc.get("data", dataset)),
        grid=grid,
        cost={k: float(v) for k, v in (doc.get("cost") or {}).items()},
    )
    if run.is_fixed:
        run.fixed_attack = played_attack(run.history, grid)
    if weights == "best" and (doc.get("selection") or {}).get("select_on") == "test":
        run.notes.append(f"{path.parent}: its best epoch was selected on the TEST images (selection.select_on=test): "
                         f"its numbers are optimistic")
    if threat_eps and weights == "final":  # evaluate.py reports are of the final weights
        extra, run.notes = _posthoc_rows(run.path, float(threat_eps[0]), final)
        run.final.update(extra)
        run.posthoc = sorted(extra)
    return run
