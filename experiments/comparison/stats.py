"""Aggregation over seeds: attack order, the headline attack, groups of runs, mean ± std, ranking."""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from experiments.comparison.runs import Run


def attack_order(name: str) -> tuple[int, int, str]:
    """clean, fgsm, pgd by steps, cw by steps, autoattack, others: weakest to strongest."""
    m = re.fullmatch(r"(pgd|cw)(\d+)", name)
    if m:
        return (2 if m.group(1) == "pgd" else 3), int(m.group(2)), name
    return {"clean": 0, "fgsm": 1, "cw": 3, "autoattack": 5}.get(name, 4), 0, name


def attack_title(name: str, run: Run) -> str:
    label = str(run.final[name].get("label") or name)
    return label.split(" (")[0]


def headline_attack(runs: Sequence[Run]) -> str | None:
    """The robust accuracy that ranks agents: AutoAttack when every run has it, else the PGD
    (CE) with the most steps every run has, else C&W, else any non-clean attack."""
    common = set.intersection(*(set(r.final) for r in runs)) - {"clean"}
    if not common:
        return None
    if "autoattack" in common:
        return "autoattack"
    pgd = [n for n in common if re.fullmatch(r"pgd\d+", n)]
    if pgd:
        return max(pgd, key=attack_order)
    return max(common, key=attack_order)


@dataclass
class Stat:
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else math.nan

    def pct(self, n_expected: int) -> str:
        if not self.values:
            return "-"
        text = f"{100 * self.mean:.2f}" + (f" ± {100 * self.std:.2f}" if self.n > 1 else "")
        return text + (f" (n={self.n})" if self.n != n_expected else "")

    def seconds(self) -> str:
        if not self.values:
            return "-"
        return f"{self.mean:.1f}" + (f" ± {self.std:.1f}" if self.n > 1 else "")

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": None if math.isnan(self.std) else self.std, "n": self.n,
                "values": self.values}


@dataclass(eq=False)
class Group:
    label: str
    runs: list[Run]
    role: str = ""  # "", "default PGD-AT", "best fixed (search over N)"

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    @property
    def is_fixed(self) -> bool:
        return all(r.fixed_attack for r in self.runs)

    def accuracy(self, attack: str) -> Stat:
        return Stat([float(r.final[attack]["accuracy"]) for r in self.runs if attack in r.final])

    def wall(self) -> Stat:
        return Stat([r.seconds["total"] for r in self.runs if "total" in r.seconds])

    def per_epoch(self) -> Stat:
        return Stat([r.seconds["train"] / r.epochs_done for r in self.runs if "train" in r.seconds and r.epochs_done])


def group_runs(runs: Sequence[Run]) -> tuple[list[Group], list[str]]:
    """Groups by label (in first-seen order); a second run with the same label and seed (e.g.
    ``agent=fixed`` and a search run spelling out the same attack) is dropped with a note."""
    groups: dict[str, Group] = {}
    notes: list[str] = []
    for r in runs:
        g = groups.setdefault(r.label, Group(r.label, []))
        same = [o for o in g.runs if o.seed == r.seed]
        if same:
            notes.append(f"{r.path} repeats {r.label} seed {r.seed} of {same[0].path}: counted once (the first).")
            continue
        g.runs.append(r)
    for g in groups.values():
        g.runs.sort(key=lambda r: r.seed)
    return list(groups.values()), notes


def rank_key(headline: str | None):
    def key(g: Group) -> float:
        m = g.accuracy(headline).mean if headline else math.nan
        return -m if not math.isnan(m) else math.inf
    return key
