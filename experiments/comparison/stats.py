"""Aggregation over seeds with rliable (Agarwal et al., NeurIPS 2021: IQM, stratified-bootstrap confidence
intervals, probability of improvement), attack order, the headline attack, groups of runs, ranking."""

from __future__ import annotations

import importlib
import math
import re
import statistics
import sys
from types import ModuleType
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from experiments.comparison.runs import Run


def attack_order(name: str) -> tuple[int, int, str]:
    """clean, fgsm, pgd by steps, cw by steps, autoattack, others: weakest to strongest."""
    m = re.fullmatch(r"(pgd|cw)(\d+)", name)
    if m:
        return (2 if m.group(1) == "pgd" else 3), int(m.group(2)), name
    return {"clean": 0, "fgsm": 1, "cw": 3, "autoattack": 5}.get(name, 4), 0, name


def attack_title(name: str, run: Run) -> str:
    return str(run.final[name].get("label") or name).split(" (")[0]


def headline_attack(runs: Sequence[Run]) -> str | None:
    """The robust accuracy that ranks agents: AutoAttack when every run has it, else the PGD
    (CE) with the most steps every run has, else C&W, else any non-clean attack."""
    common = set.intersection(*(set(r.final) for r in runs)) - {"clean"}
    pgd = [n for n in common if re.fullmatch(r"pgd\d+", n)]
    return None if not common else "autoattack" if "autoattack" in common else max(pgd or common, key=attack_order)


BOOTSTRAP_REPS = 2000  # per confidence interval (rliable's default for P(improvement)); --bootstrap-reps
BOOTSTRAP_SEED = 0  # the same runs give the same intervals: the report is reproducible
CONFIDENCE = 0.95
FEW_SEEDS = 5  # below this, bootstrap intervals are wide and unreliable (rliable's authors ask for more runs)


def rliable(module: str) -> ModuleType:
    """``rliable.<module>``, imported on first use (it imports scipy and arch). rliable imports absl, whose log
    handler binds ``sys.stderr`` as it is at that moment and closes that stream whenever logging is
    reconfigured (Hydra does, at every run started later in the same process): bind it to the process's own
    stderr, which absl never closes."""
    found = importlib.import_module(f"rliable.{module}")
    from absl import logging as absl_logging  # noqa: PLC0415

    absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__
    return found


@dataclass(frozen=True)
class Interval:
    """A point estimate with its stratified-bootstrap confidence interval (rliable)."""

    value: float
    low: float
    high: float


def bootstrap(statistic: Callable[..., float], *scores: Sequence[float], reps: int) -> Interval:
    """rliable's stratified percentile bootstrap of ``statistic`` over per-seed scores, as (seeds, tasks=1)
    matrices: what ``rliable.library.get_interval_estimates`` computes, without its ``absl`` log call (which
    configures the root logger on a stream that may be closed later). rliable resamples with NumPy's global
    generator (its ``random_state`` does not reach it), so that generator is seeded here and restored after."""
    library = rliable("library")
    matrices = [np.asarray(s, dtype=float)[:, None] for s in scores]
    func = lambda *m: np.array([statistic(*m)])  # noqa: E731 - rliable's metric shape: one value per task
    state = np.random.get_state()
    np.random.seed(BOOTSTRAP_SEED)
    try:
        sampler = (library.StratifiedIndependentBootstrap(*matrices) if len(matrices) > 1
                   else library.StratifiedBootstrap(matrices[0]))
        ci = sampler.conf_int(func, reps=reps, size=CONFIDENCE, method="percentile")
    finally:
        np.random.set_state(state)
    return Interval(float(func(*matrices)[0]), float(ci[0, 0]), float(ci[1, 0]))


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


@dataclass(eq=False)
class Group:
    """The runs of one label (one per seed), with their estimates per attack (:func:`estimate`)."""

    label: str
    runs: list[Run]
    role: str = ""  # "", "default PGD-AT", "best fixed (search over N)"
    iqm: dict[str, Interval] = field(default_factory=dict)  # attack -> IQM over seeds
    improvement: dict[str, Interval] = field(default_factory=dict)  # attack -> P(this > PGD-AT)

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    @property
    def is_fixed(self) -> bool:
        return all(r.fixed_attack for r in self.runs)

    def scores(self, attack: str) -> list[float]:
        """The accuracy of each seed that has ``attack``."""
        return [float(r.final[attack]["accuracy"]) for r in self.runs if attack in r.final]

    def cost(self) -> float | None:
        """Gradient computations per training image, mean over seeds (``None``: runs from before it was recorded)."""
        return _mean([r.cost["gradients_per_image"] for r in self.runs if "gradients_per_image" in r.cost])

    def wall(self) -> float | None:
        return _mean([r.seconds["total"] for r in self.runs if "total" in r.seconds])


def estimate(groups: Sequence[Group], attacks: Sequence[str], reference: Group | None, reps: int) -> None:
    """Fill each group's IQM and, against ``reference`` (PGD-AT), its probability of improvement."""
    metrics = rliable("metrics")
    for g in groups:
        for a in attacks:
            if scores := g.scores(a):
                g.iqm[a] = bootstrap(metrics.aggregate_iqm, scores, reps=reps)
                if reference is not None and g is not reference and reference.scores(a):
                    g.improvement[a] = bootstrap(metrics.probability_of_improvement, scores, reference.scores(a),
                                                 reps=reps)


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


def rank_key(headline: str | None) -> Callable[[Group], float]:
    """Sort key: the headline attack's IQM, highest first (groups without it last)."""
    return lambda g: -g.iqm[headline].value if headline in g.iqm else math.inf
