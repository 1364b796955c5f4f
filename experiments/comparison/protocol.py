"""The protocol of a run (what must be equal for numbers to be comparable) and where runs differ."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence

from evaluation.attacks import format_eps
from experiments.comparison.runs import Run
from experiments.comparison.stats import attack_order, attack_title


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
        "strategy grid": json.dumps({name: [round(v, 6) for v in values] for name, values in run.grid.values.items()}),
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
                         f"its column averages those only.")
    devices = {str(r.config.get("device", "?")) for r in runs}
    if len(devices) > 1:
        notes.append(f"Runs ran on different devices ({', '.join(sorted(devices))}): times are not comparable.")
    return warnings, notes
