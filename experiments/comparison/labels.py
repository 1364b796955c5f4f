"""What sets runs apart: a label per run (the agent's name, the attack a fixed agent played, the settings
that differ) and the protocol (what must be equal for their numbers to be comparable)."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from evaluation.attacks import format_eps
from experiments.comparison.runs import NON_LEARNING_TARGETS, Run
from experiments.comparison.stats import attack_order, attack_title
from las_env.datasets.registry import lookup
from las_env.strategy_space import ATTACK_COLUMNS

NOT_SETTINGS = ("seed", "run_root", "logger", "progress", "threads", "resume", "stop_after_epochs",
                "log_every_steps", "hydra", "eval", "data.root", "data.threads", "agent.name", "agent.seed",
                "agent.verbose")
"""Config keys (dotted prefixes) that never split labels: how a run was run, the seed (aggregated
over), the evaluation (checked as protocol instead)."""

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
        spec = lookup(run.dataset.lower().replace("_", "-"))
    except (KeyError, ValueError):
        return None
    recorded = run.config.get("data", {}).get("threat") or {}  # the run's data.threat (null: the data set's)
    eps, step = recorded.get("epsilon") or spec.threat.epsilon, recorded.get("step_size") or spec.threat.step_size
    i_eps, i_it, i_step = run.grid.index_of(epsilon=eps, iterations=spec.fixed_iterations, step_size=step)
    return run.grid.value("epsilon", i_eps), run.grid.value("iterations", i_it), run.grid.value("step_size", i_step)


def protocol_of(run: Run) -> dict[str, str]:
    """What must be equal for the runs' numbers to be comparable, as readable strings."""
    data = run.config.get("data", {})
    steps = run.history[0]["steps"] if run.history else "?"
    first_eval = next((h["eval"] for h in run.history if h.get("eval")), {}) or {}
    return {
        "data set": run.data_description,
        "model": str(run.config.get("model", {}).get("name", "?")),
        "threat model": run.threat,
        "training budget": f"{data.get('epochs', '?')} epochs x {steps} steps x batch {data.get('batch_size', '?')}",
        # The attack's columns only: a further column is one agent's or method's own choice (FAT's early_stop_tau).
        "attack grid": json.dumps({name: [round(v, 6) for v in run.grid.values[name]] for name in ATTACK_COLUMNS}),
        "per-epoch evaluation": (f"{run.per_epoch_attack} on {first_eval.get('test_images', '?')} test / "
                                 f"{first_eval.get('train_images', '?')} train images"),
    }


def check_protocol(runs: Sequence[Run]) -> tuple[list[str], list[str]]:
    """(warnings, notes): warnings where the runs' protocols differ (numbers not comparable),
    notes for softer differences (an attack evaluated on some runs only, devices)."""
    warnings: list[str] = []
    notes: list[str] = []

    def differ(what: str, values: Mapping[Run, str]) -> None:
        by_value: dict[str, list[Run]] = defaultdict(list)
        for r, v in values.items():
            by_value[v].append(r)
        if len(by_value) > 1:
            parts = [f"{v!s} ({len(rs)} run{'s' * (len(rs) > 1)}, e.g. {rs[0].path})" for v, rs in by_value.items()]
            warnings.append(f"{what} differs between runs: " + "; ".join(parts))

    protocols = {r: protocol_of(r) for r in runs}
    for key in next(iter(protocols.values())):
        differ(key.capitalize(), {r: p[key] for r, p in protocols.items()})
    names = sorted({n for r in runs for n in r.final}, key=attack_order)
    for name in names:
        have = [r for r in runs if name in r.final]
        differ(f"Final evaluation {name!r} (eps, test images)",
               {r: f"eps {format_eps(float(r.final[name].get('epsilon', 0)))}, "
                   f"{r.final[name].get('n_images')} images" for r in have})
        if len(have) < len(runs):
            notes.append(f"{attack_title(name, have[0])} was evaluated on {len(have)} of {len(runs)} runs; "
                         f"its columns use those only.")
    devices = {str(r.config.get("device", "?")) for r in runs}
    if len(devices) > 1:
        notes.append(f"Runs ran on different devices ({', '.join(sorted(devices))}): times are not comparable.")
    return warnings, notes
