"""The comparison: runs read, labelled, checked for one protocol, grouped, aggregated over seeds with rliable
(Agarwal et al., NeurIPS 2021: IQM, stratified-bootstrap confidence intervals, probability of improvement),
ranked by the headline attack; the search baseline."""

from __future__ import annotations

import importlib
import math
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np

from evaluation import attack_order
from experiments.comparison.runs import Run, assign_labels, check_protocol, default_fixed_attack, find_runs, load_run
from experiments.config.errors import ConfigError
from experiments.runfolder.runfiles import RESULTS_FILE


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
    """The runs of one label (one per seed), with their estimates per attack (filled by :func:`compare`)."""

    label: str
    runs: list[Run]
    role: str = ""  # "", "default PGD-AT", "best fixed (search over N)"
    iqm: dict[str, Interval] = field(default_factory=dict)  # attack -> IQM over seeds
    improvement: dict[str, Interval] = field(default_factory=dict)  # attack -> P(this > PGD-AT)

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


def rank_key(headline: str | None) -> Callable[[Group], float]:
    """Sort key: the headline attack's IQM, highest first (groups without it last)."""
    return lambda g: -g.iqm[headline].value if headline in g.iqm else math.inf


@dataclass
class Comparison:
    """Everything the report and ``summary.json`` show: runs, groups, the tables' rows, warnings."""

    runs: list[Run]
    groups: list[Group]  # every group, ranked
    main: list[Group]  # the main table's rows (learned agents, default PGD-AT, best fixed)
    search: list[Group]  # fixed attack settings, ranked, when two or more were run
    attacks: dict[str, str]  # attack name -> its title (``pgd20`` -> ``PGD-20``), in the table's order
    headline: str | None
    warnings: list[str]
    notes: list[str]
    sources: list[str]
    weights: str = "final"
    reference: Group | None = None  # PGD-AT: the agent=fixed group playing the threat model's attack
    reps: int = BOOTSTRAP_REPS

    def verdict(self) -> str:
        """The winner line ("" without a ranking), with a caveat when the runner-up's IQM lies within
        the winner's 95% confidence interval."""
        if not self.winners:
            return ""
        others = [g for g in self.main if g not in self.winners and self.headline in g.iqm]
        close = others and others[0].iqm[self.headline].value >= self.winners[0].iqm[self.headline].low
        return (f"Best {self.attacks[self.headline]} robust accuracy (IQM): "
                + ", ".join(f"`{g.label}`" for g in self.winners)
                + (f" (the runner-up `{others[0].label}` lies within the winner's 95% confidence interval: not a "
                   f"clear win)." if close else "."))

    def few_seeds_note(self) -> str:
        """One line naming the agents with fewer than :data:`FEW_SEEDS` seeds ("" when none)."""
        few = [f"`{g.label}` ({len(g.runs)})" for g in self.groups if len(g.runs) < FEW_SEEDS]
        return (f"Fewer than {FEW_SEEDS} seeds for {', '.join(few)}: a bootstrap over so few runs is unreliable and "
                f"its intervals are wide; rliable's authors recommend more runs." if few else "")

    def drift_notes(self) -> list[str]:
        """One line per run whose strategy drifted below the threat model and fell behind PGD-AT: its mean
        chosen epsilon in the last epoch is below the evaluation's epsilon, and its headline robust accuracy
        below PGD-AT's IQM (the learner-stability check of the arena)."""
        if self.reference is None or self.headline not in self.reference.iqm:
            return []
        bar, title, lines = self.reference.iqm[self.headline].value, self.attacks[self.headline], []
        for g in self.main:
            for r in g.runs:
                chosen = (r.history[-1].get("train", {}) if r.history else {}).get("attack/epsilon")
                row = r.final.get(self.headline, {})
                if chosen is None or not row or g is self.reference:
                    continue
                if chosen < float(row["epsilon"]) * (1 - 1e-6) and row["accuracy"] < bar:
                    lines.append(f"`{g.label}` seed {r.seed}: mean chosen epsilon in its last epoch {chosen:.4g} < the "
                                 f"threat model's {float(row['epsilon']):.4g}, and {title} {100 * row['accuracy']:.2f}% < "
                                 f"PGD-AT's IQM {100 * bar:.2f}%.")
        return lines

    @property
    def winners(self) -> list[Group]:
        """The main rows with the highest headline IQM (ties included)."""
        values = [(g, g.iqm[self.headline].value) for g in self.main if self.headline in g.iqm]
        best = max((v for _, v in values), default=math.nan)
        return [g for g, v in values if math.isclose(v, best, abs_tol=1e-12)]


METHOD_TITLES = {"pgd_at": "PGD-AT", "trades": "TRADES", "awp": "AWP"}


def method_of(run: Run) -> str:
    """The run's training method (``method.name``; runs from before methods existed: PGD-AT)."""
    return str((run.config.get("method") or {}).get("name") or "pgd_at")


def pick_main_rows(groups: Sequence[Group], headline: str | None) -> tuple[list[Group], list[Group]]:
    """``(main rows, search rows)``. Fixed attacks are a search only among runs of ONE training
    method (the best TRADES setting is not a PGD-AT setting): per method with two or more fixed
    settings, the main table gets the best of them and the data set's default attack."""
    main = [g for g in groups if not g.is_fixed]
    search: list[Group] = []
    by_method: dict[str, list[Group]] = {}
    for g in groups:  # ranked order kept within each method
        if g.is_fixed:
            by_method.setdefault(method_of(g.runs[0]), []).append(g)
    for method, fixed in by_method.items():
        if len(fixed) < 2:
            main += fixed
            continue
        title = METHOD_TITLES.get(method, method)
        search += fixed
        default = {default_fixed_attack(g.runs[0]) for g in fixed} - {None}
        chosen = []
        if headline:
            what = "fixed settings" if method == "pgd_at" else f"fixed {title} settings"
            fixed[0].role = f"search: best of {len(fixed)} {what}"  # groups are ranked
            chosen.append(fixed[0])
        for g in fixed:
            if g.runs[0].fixed_attack in default:
                g.role = (g.role + ", " if g.role else "") + f"default {title}"
                if g not in chosen:
                    chosen.append(g)
        main += chosen
    return sorted(main, key=rank_key(headline)), search


def compare(paths: Sequence[str | Path], weights: str = "final", reps: int = BOOTSTRAP_REPS) -> Comparison:
    """The runs under ``paths`` read, labelled, checked, grouped, estimated and ranked; :class:`ConfigError` if none."""
    files, unfinished = find_runs(paths)
    if not files:
        where = ", ".join(str(p) for p in paths)
        hint = f" ({len(unfinished)} unfinished run folder(s) hold only a checkpoint)" if unfinished else ""
        raise ConfigError(f"No finished runs ({RESULTS_FILE}) found under {where}{hint}. Pass the folders "
                          f"experiments/run.py printed, or their run_root.")
    runs: list[Run] = []
    skipped: list[str] = []
    for f in files:
        try:
            runs.append(load_run(f, weights))
        except ConfigError as exc:  # e.g. another tool's results.json in the tree
            skipped.append(f"skipped: {exc}")
    if not runs:
        raise ConfigError(f"None of the {len(files)} {RESULTS_FILE} files found could be read: {skipped[0]}")
    runs.sort(key=lambda r: (r.agent, str(r.path)))
    assign_labels(runs)
    names = sorted({n for r in runs for n in r.final}, key=attack_order)
    attacks = {a: str(next(r for r in runs if a in r.final).final[a].get("label") or a).split(" (")[0] for a in names}
    warnings, notes = check_protocol(runs, attacks)
    notes += skipped
    groups: dict[str, Group] = {}
    for r in runs:  # by label, in first-seen order
        g = groups.setdefault(r.label, Group(r.label, []))
        same = [o for o in g.runs if o.seed == r.seed]
        if same:  # e.g. agent=fixed and a search run spelling out the same attack
            notes.append(f"{r.path} repeats {r.label} seed {r.seed} of {same[0].path}: counted once (the first).")
            continue
        g.runs.append(r)
    for g in groups.values():
        g.runs.sort(key=lambda r: r.seed)
    notes += [n for r in runs for n in r.notes]
    if unfinished:
        notes.append(f"{len(unfinished)} unfinished run folder(s) (a checkpoint, no results yet) were skipped, "
                     f"e.g. {unfinished[0]}")
    for r in runs:
        if r.is_fixed and r.fixed_attack is None:
            notes.append(f"{r.path}: a fixed agent whose recorded choices hold more than one value; "
                         f"labelled by its name only.")
    # The robust accuracy that ranks agents: AutoAttack when every run has it, else the PGD (CE) with the most
    # steps every run has, else C&W, else any non-clean attack.
    common = set.intersection(*(set(r.final) for r in runs)) - {"clean"}
    pgd = [n for n in common if re.fullmatch(r"pgd\d+", n)]
    headline = None if not common else "autoattack" if "autoattack" in common else max(pgd or common, key=attack_order)
    # PGD-AT: agent=fixed trained with PGD-AT, playing its threat model's attack.
    reference = next((g for g in groups.values() if g.is_fixed and method_of(g.runs[0]) == "pgd_at"
                      and g.runs[0].fixed_attack == default_fixed_attack(g.runs[0])), None)
    metrics = rliable("metrics")
    for g in groups.values():  # its IQM and, against PGD-AT, its probability of improvement per attack
        for a in attacks:
            if scores := g.scores(a):
                g.iqm[a] = bootstrap(metrics.aggregate_iqm, scores, reps=reps)
                if reference is not None and g is not reference and reference.scores(a):
                    g.improvement[a] = bootstrap(metrics.probability_of_improvement, scores, reference.scores(a),
                                                 reps=reps)
    ranked = sorted(groups.values(), key=rank_key(headline))
    main, search = pick_main_rows(ranked, headline)
    return Comparison(runs, ranked, main, search, attacks, headline, warnings, notes, [str(p) for p in paths], weights,
                      reference, reps)
