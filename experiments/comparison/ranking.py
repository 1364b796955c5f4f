"""The comparison: runs read, labelled, checked for one protocol, grouped, ranked; the search baseline."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from experiments.comparison.labels import assign_labels, check_protocol, default_fixed_attack
from experiments.comparison.runs import CompareError, Run, find_runs, load_run
from experiments.comparison.stats import (BOOTSTRAP_REPS, FEW_SEEDS, Group, attack_order, attack_title, estimate,
                                          group_runs, headline_attack, rank_key)
from experiments.runfolder.runfiles import RESULTS_FILE


@dataclass
class Comparison:
    """Everything the report and ``summary.json`` show: runs, groups, the tables' rows, warnings."""

    runs: list[Run]
    groups: list[Group]  # every group, ranked
    main: list[Group]  # the main table's rows (learned agents, default PGD-AT, best fixed)
    search: list[Group]  # fixed attack settings, ranked, when two or more were run
    attacks: list[str]
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
        return (f"Best {self.titles[self.headline]} robust accuracy (IQM): "
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
        bar, title, lines = self.reference.iqm[self.headline].value, self.titles[self.headline], []
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
    def titles(self) -> dict[str, str]:
        """Attack name -> its title (e.g. ``pgd20`` -> ``PGD-20``), in the table's order."""
        return {a: attack_title(a, next(r for r in self.runs if a in r.final)) for a in self.attacks}

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


def pgd_at_reference(groups: Sequence[Group]) -> Group | None:
    """The PGD-AT group: ``agent=fixed`` trained with PGD-AT, playing its threat model's attack."""
    return next((g for g in groups if g.is_fixed and method_of(g.runs[0]) == "pgd_at"
                 and g.runs[0].fixed_attack == default_fixed_attack(g.runs[0])), None)


def compare(paths: Sequence[str | Path], weights: str = "final", reps: int = BOOTSTRAP_REPS) -> Comparison:
    files, unfinished = find_runs(paths)
    if not files:
        where = ", ".join(str(p) for p in paths)
        hint = f" ({len(unfinished)} unfinished run folder(s) hold only a checkpoint)" if unfinished else ""
        raise CompareError(f"No finished runs ({RESULTS_FILE}) found under {where}{hint}. Pass the folders "
                           f"experiments/run.py printed, or their run_root.")
    runs: list[Run] = []
    skipped: list[str] = []
    for f in files:
        try:
            runs.append(load_run(f, weights))
        except CompareError as exc:  # e.g. another tool's results.json in the tree
            skipped.append(f"skipped: {exc}")
    if not runs:
        raise CompareError(f"None of the {len(files)} {RESULTS_FILE} files found could be read: {skipped[0]}")
    runs.sort(key=lambda r: (r.agent, str(r.path)))
    assign_labels(runs)
    warnings, notes = check_protocol(runs)
    groups, dup_notes = group_runs(runs)
    notes += skipped + dup_notes + [n for r in runs for n in r.notes]
    if unfinished:
        notes.append(f"{len(unfinished)} unfinished run folder(s) (a checkpoint, no results yet) were skipped, "
                     f"e.g. {unfinished[0]}")
    for r in runs:
        if r.is_fixed and r.fixed_attack is None:
            notes.append(f"{r.path}: a fixed agent whose recorded choices hold more than one value; "
                         f"labelled by its name only.")
    headline = headline_attack(runs)
    attacks = sorted({n for r in runs for n in r.final}, key=attack_order)
    reference = pgd_at_reference(groups)
    estimate(groups, attacks, reference, reps)
    groups.sort(key=rank_key(headline))
    main, search = pick_main_rows(groups, headline)
    return Comparison(runs, groups, main, search, attacks, headline, warnings, notes, [str(p) for p in paths], weights,
                      reference, reps)
