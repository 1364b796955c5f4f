"""Finding and reading finished runs (``results.json``, plus ``evaluation*.json`` of the same weights), and what
sets them apart: a label per run (the agent's name, the attack a fixed agent played, the settings that differ)
and the protocol (what must be equal for their numbers to be comparable)."""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.attacks import format_eps
from experiments.config.errors import ConfigError
from experiments.runfolder.runfiles import (CHECKPOINT, EVALUATION_FORMAT, EVALUATION_GLOB, RESULTS_FILE,
                                            RESULTS_FORMAT, WEIGHTS_FILE)
from las_env.datasets.registry import lookup
from las_env.strategy_space import ATTACK_COLUMNS, StrategySpace

WEIGHTS = {"final": "final (last-epoch) weights",
           "best": "best-epoch weights (best.pt: per-epoch PGD accuracy on the held-out validation images)"}
"""Which rows of ``results.json`` a comparison reads (``--weights``), and how the report names them."""
FIXED_TARGET_SUFFIX = "FixedAgent"
NON_LEARNING_TARGETS = ("FixedAgent", "RandomAgent")  # their training ignores the reward settings


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
    per_epoch_attack: str
    grid: StrategySpace
    protocol: dict[str, str]  # what must be equal for the runs' numbers to be comparable, as readable strings
    cost: dict[str, float] = field(default_factory=dict)  # results.json "cost" (gradients per image); {} in older runs
    fixed_attack: tuple[float, int, float] | None = None  # (epsilon, iterations, step size) played
    posthoc: list[str] = field(default_factory=list)  # attack names read from evaluate.py reports
    notes: list[str] = field(default_factory=list)
    label: str = ""

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
            raise ConfigError(f"{p} does not exist. Pass run directories or folders holding them "
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
    """The run whose ``results.json`` is ``path``; :class:`ConfigError` when it is not JSON, not a run's
    results file, or malformed (``compare`` then skips it with a note)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read as JSON ({exc}).") from None
    if not isinstance(doc, dict) or doc.get("format") != RESULTS_FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ConfigError(f"{path} is not a run's results file (format {found!r}, expected {RESULTS_FORMAT!r}).")
    try:
        return _run_of(path, doc, weights)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as exc:
        raise ConfigError(f"{path} is malformed ({type(exc).__name__}: {exc}): a results file edited by hand or "
                          f"cut short; re-create it with the run's command plus resume=true.") from None


def _run_of(path: Path, doc: dict[str, Any], weights: str) -> Run:
    config = doc.get("config") or {}
    data, history = config.get("data") or {}, list(doc.get("history") or [])
    dataset, per_epoch_attack = str(data.get("name", "?")), str(doc.get("per_epoch_attack", ""))
    final = {r["name"]: r for r in doc.get(weights) or []}
    if not final:
        raise ConfigError(f"{path} holds no results for its {WEIGHTS[weights]} (a run without a validation split, "
                          f"or from before best.pt existed); compare with --weights final.")
    threat_eps = [r["epsilon"] for r in final.values() if r.get("epsilon")]
    grid = StrategySpace.from_config(data["grid"]) if data.get("grid") else lookup(dataset).grid
    first_eval = next((h["eval"] for h in history if h.get("eval")), {}) or {}
    protocol = {
        "data set": str(doc.get("data", dataset)),
        "model": str(config.get("model", {}).get("name", "?")),
        "threat model": str(doc.get("threat_model", "")),
        "training budget": (f"{data.get('epochs', '?')} epochs x {history[0]['steps'] if history else '?'} steps x "
                            f"batch {data.get('batch_size', '?')}"),
        # The attack's columns only: a further column is one agent's or method's own choice (FAT's early_stop_tau).
        "attack grid": json.dumps({name: [round(v, 6) for v in grid.values[name]] for name in ATTACK_COLUMNS}),
        "per-epoch evaluation": (f"{per_epoch_attack} on {first_eval.get('test_images', '?')} test / "
                                 f"{first_eval.get('train_images', '?')} train images"),
    }
    run = Run(path=path.parent, agent=str(doc.get("agent") or config.get("agent", {}).get("name") or "agent"),
              seed=int(config.get("seed", 0)), config=config, final=final, history=history,
              seconds={k: float(v) for k, v in (doc.get("seconds") or {}).items()}, per_epoch_attack=per_epoch_attack,
              grid=grid, protocol=protocol, cost={k: float(v) for k, v in (doc.get("cost") or {}).items()})
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


# Config keys (dotted prefixes) that never split labels: how a run was run, the seed (aggregated over), the
# evaluation (checked as protocol instead).
NOT_SETTINGS = ("seed", "run_root", "logger", "progress", "threads", "resume", "stop_after_epochs", "log_every_steps",
                "hydra", "eval", "data.root", "data.threads", "agent.name", "agent.seed", "agent.verbose")

FIXED_ATTACK_KEYS = ("agent.step_size", "agent.iterations", "agent.epsilon", "data.fixed_attack")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v, sort_keys=True) if isinstance(v, (list, tuple)) else v
    return out


def _settings(run: Run) -> dict[str, Any]:
    """The settings that make runs of one agent different experiments (not the seed)."""
    skip = list(NOT_SETTINGS)
    if run.is_fixed:
        skip += FIXED_ATTACK_KEYS  # the attack actually played stands for these
    if run.target.endswith(NON_LEARNING_TARGETS):
        skip.append("reward")  # never learns: its training does not depend on the reward
    return {k: v for k, v in _flatten(run.config).items() if not any(k == p or k.startswith(p + ".") for p in skip)}


def _fmt_value(key: str, v: Any) -> str:
    if isinstance(v, float):
        return format_eps(v) if re.search(r"eps|step_size", key) else f"{v:.4g}"
    return str(v)


def assign_labels(runs: Sequence[Run]) -> None:
    """Set ``run.label``: the agent name, the played attack for fixed agents, and the settings
    that differ between runs of the same agent name."""
    by_name: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        by_name[r.agent].append(r)
    for name, group in by_name.items():
        settings = [_settings(r) for r in group]
        keys = sorted(set().union(*settings))
        differing = [k for k in keys if len({json.dumps(s.get(k), default=str) for s in settings}) > 1]
        for r, s in zip(group, settings):
            base = name
            if r.fixed_attack:
                eps, iters, step = r.fixed_attack
                base = f"{name}(eps={format_eps(eps)},it={iters},step={format_eps(step)})"
            if differing:
                extra = ",".join(f"{k.removeprefix('agent.')}={_fmt_value(k, s.get(k))}" for k in differing)
                base = f"{base}[{extra}]" if r.fixed_attack else f"{name}({extra})"
            r.label = base


def default_fixed_attack(run: Run) -> tuple[float, int, float] | None:
    """The run's PGD-AT attack (``agent=fixed`` without overrides: its threat model), on the run's grid."""
    try:
        spec = lookup(str(run.config.get("data", {}).get("name", "?")).lower().replace("_", "-"))
    except (KeyError, ValueError):
        return None
    recorded = run.config.get("data", {}).get("threat") or {}  # the run's data.threat (null: the data set's)
    eps, step = recorded.get("epsilon") or spec.threat.epsilon, recorded.get("step_size") or spec.threat.step_size
    i_eps, i_it, i_step = run.grid.index_of(epsilon=eps, iterations=spec.fixed_iterations, step_size=step)
    return run.grid.value("epsilon", i_eps), run.grid.value("iterations", i_it), run.grid.value("step_size", i_step)


def check_protocol(runs: Sequence[Run], attacks: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """(warnings, notes): warnings where the runs' protocols differ (numbers not comparable), notes for softer
    differences (an attack evaluated on some runs only, devices); ``attacks``: name -> title, in order."""
    warnings: list[str] = []
    notes: list[str] = []

    def differ(what: str, values: Mapping[Run, str]) -> None:
        by_value: dict[str, list[Run]] = defaultdict(list)
        for r, v in values.items():
            by_value[v].append(r)
        if len(by_value) > 1:
            parts = [f"{v!s} ({len(rs)} run{'s' * (len(rs) > 1)}, e.g. {rs[0].path})" for v, rs in by_value.items()]
            warnings.append(f"{what} differs between runs: " + "; ".join(parts))

    for key in runs[0].protocol:
        differ(key.capitalize(), {r: r.protocol[key] for r in runs})
    for name, title in attacks.items():
        have = [r for r in runs if name in r.final]
        differ(f"Final evaluation {name!r} (eps, test images)",
               {r: f"eps {format_eps(float(r.final[name].get('epsilon', 0)))}, "
                   f"{r.final[name].get('n_images')} images" for r in have})
        if len(have) < len(runs):
            notes.append(f"{title} was evaluated on {len(have)} of {len(runs)} runs; "
                         f"its columns use those only.")
    devices = {str(r.config.get("device", "?")) for r in runs}
    if len(devices) > 1:
        notes.append(f"Runs ran on different devices ({', '.join(sorted(devices))}): times are not comparable.")
    return warnings, notes
