"""The comparison's outputs: the Markdown report, ``summary.json``, and the folder holding them with the figures."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from evaluation.attacks import format_eps
from experiments.comparison.ranking import BOOTSTRAP_SEED, CONFIDENCE, Comparison, Group, Interval
from experiments.comparison.runs import WEIGHTS
from experiments.runfolder.runfiles import REPORT_MD, SUMMARY_FILE, SUMMARY_FORMAT
from las_env.files import atomic_write_text, write_json


def _cell(i: Interval | None, scale: float = 100.0) -> str:
    return "-" if i is None else f"{scale * i.value:.2f} [{scale * i.low:.2f}, {scale * i.high:.2f}]"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table: the first row is the header; the first column left-aligned, the rest right-aligned."""
    return "\n".join(["| " + " | ".join(rows[0]) + " |", "|---|" + "---:|" * (len(rows[0]) - 1)]
                     + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def table_rows(c: Comparison, groups: Sequence[Group], *, winners: Sequence[Group] = ()) -> list[list[str]]:
    """Header, then a row per group: per attack IQM [95% CI], the worst seed, P(> PGD-AT) [95% CI]; cost, time."""
    head = ["Agent", "Seeds"]
    for a, title in c.attacks.items():
        head += [f"{title}{' *' if a == c.headline else ''} IQM [95% CI] (%)", f"{title} worst (%)"]
        head += [f"{title} P(> PGD-AT) [95% CI]"] if c.reference else []
    rows = [head + ["Gradients/image", "Wall time (s)"]]
    for g in groups:
        label = (f"**`{g.label}`**" if g in winners else f"`{g.label}`") + (f" ({g.role})" if g.role else "")
        seeds = ",".join(str(r.seed) for r in g.runs)
        cells = [label + (" **← best**" if g in winners else ""), f"{len(g.runs)} ({seeds})"]
        for a in c.attacks:
            scores = g.scores(a)
            fewer = f" (n={len(scores)})" if 0 < len(scores) < len(g.runs) else ""
            cells += [_cell(g.iqm.get(a)) + fewer, _num(100 * min(scores) if scores else None, 2)]
            cells += [("(reference)" if g is c.reference else _cell(g.improvement.get(a), 1.0))] if c.reference else []
        rows.append(cells + [_num(g.cost()), _num(g.wall())])
    return rows


def _protocol_lines(c: Comparison) -> list[str]:
    p = c.runs[0].protocol
    lines = [f"- Weights: {WEIGHTS[c.weights]} of each run",
             f"- Data: {p['data set']}; model {p['model']}; {p['training budget']}",
             f"- Threat model: {p['threat model']}",
             "- Strategy space (column: values): " + json.dumps({name: [round(v, 6) for v in values]
                                                                for name, values in c.runs[0].grid.values.items()})]
    for a in c.attacks:
        have = [r for r in c.runs if a in r.final]
        row, n_images = have[0].final[a], sorted({int(r.final[a].get("n_images", 0)) for r in have})
        lines.append(f"- `{a}`: {row.get('label', a)}, eps {format_eps(float(row.get('epsilon', 0)))}, first "
                     f"{'/'.join(map(str, n_images))} test images"
                     + (" (from experiments/evaluate.py)" if any(a in r.posthoc for r in have) else ""))
    if c.headline:
        lines.append(f"- Ranking (* column): {c.attacks[c.headline]} robust accuracy, IQM over seeds "
                     f"(AutoAttack when every run has it, else the strongest PGD every run has)")
    lines.append(f"- Per-epoch curves: {p['per-epoch evaluation']}")
    reference = f"`{c.reference.label}`" if c.reference else "none among these runs"
    lines += [f"- IQM [95% CI]: interquartile mean over seeds, rliable's stratified bootstrap ({c.reps} repetitions, "
              f"seed {BOOTSTRAP_SEED}); worst: the lowest seed; (n=k): fewer seeds than the row; P(> PGD-AT): the "
              f"probability that a seed beats a seed of PGD-AT ({reference}; 0.5: no difference)",
              "- Gradients/image: gradient computations per training image over the whole training (the attack's "
              "PGD steps plus the reward probes'), mean over seeds; - for runs from before results.json had `cost`"]
    return lines


def markdown_report(c: Comparison, figures: Mapping[str, Path | None]) -> str:
    out = ["# LAS-AT comparison", "",
           f"{len(c.runs)} runs, {len(c.groups)} agents/settings, from {', '.join(c.sources)}.", ""]
    if c.warnings:
        out += ["## ⚠ WARNING: the runs do not share one protocol", "",
                "The numbers below are NOT directly comparable:", ""]
        out += [f"- **{w}**" for w in c.warnings] + [""]
    out += ["## Protocol", ""] + _protocol_lines(c) + [""]
    out += ["## Results (test accuracy, IQM over seeds with 95% bootstrap CIs)", "",
            markdown_table(table_rows(c, c.main, winners=c.winners)), ""]
    few, drift = c.few_seeds_note(), c.drift_notes()
    for text in (f"**{few}**" if few else "", c.verdict()):
        out += [text, ""] if text else []
    if drift:
        out += ["Strategies that drifted below the threat model and fell behind PGD-AT:", ""]
        out += [f"- {line}" for line in drift] + [""]
    if c.search:
        text = (f"ranked by the IQM of {c.attacks[c.headline]} robust accuracy. The best is picked on the "
                "same test images it is reported on, so its row above is an optimistic estimate of hand-tuning the "
                "fixed attack." if c.headline else "(unranked: no robust attack was evaluated on every run).")
        out += ["## Search baseline: fixed attack settings (paper Fig. 3)", "",
                f"Every fixed (PGD-AT) attack that was run, {text}", "", markdown_table(table_rows(c, c.search)), ""]
    if c.notes:
        out += ["## Notes", ""] + [f"- {n}" for n in c.notes] + [""]
    out += ["## Figures", ""]
    captions = {
        "iqm": "IQM over seeds and its 95% bootstrap CI, per agent and attack (rliable).",
        "improvement": "Probability of improvement over PGD-AT and its 95% CI, per attack (rliable).",
        "robust_curves": "Per-epoch accuracy (mean ± std over seeds): test and train-subset robust, test clean "
                         "(paper Fig. 1; a gap between the robust curves is robust overfitting).",
        "epsilon_distribution": "Share of training images given each epsilon, per epoch, all seeds pooled; "
                                "the white line is the mean index (paper Fig. 4).",
        "fixed_images_strength": "Epsilon chosen for a few fixed training images (the same images in every "
                                 "run) when they were trained on, per epoch, first seed of each agent that "
                                 "chooses (paper Fig. 5); lines are offset slightly to keep equal choices apart.",
    }
    for key, caption in captions.items():
        path = figures.get(key)
        if path is not None:
            out += [f"![{key}]({path.name})", "", caption, ""]
        elif key == "fixed_images_strength":
            out += ["(No fixed-images figure (Fig. 5): no run of an agent that chooses records `fixed_images` "
                    "in its per-epoch history.)", ""]
    return "\n".join(out) + "\n"


def summary_json(c: Comparison, figures: Mapping[str, Path | None]) -> dict[str, Any]:
    """The report's numbers for scripts (fractions, not percent)."""
    def accuracy(g: Group, a: str) -> dict[str, Any]:
        scores, iqm, gain = g.scores(a), g.iqm.get(a), g.improvement.get(a)
        return {"values": scores, "n": len(scores), "worst": min(scores) if scores else None,
                "iqm": iqm and asdict(iqm), "improvement_over_pgd_at": gain and asdict(gain)}

    def group(g: Group) -> dict[str, Any]:
        return {"label": g.label, "role": g.role, "seeds": [r.seed for r in g.runs],
                "runs": [str(r.path) for r in g.runs], "accuracy": {a: accuracy(g, a) for a in c.attacks},
                "gradients_per_image": g.cost(), "wall_seconds": g.wall()}

    return {"format": SUMMARY_FORMAT, "weights": c.weights, "headline_attack": c.headline, "attacks": list(c.attacks),
            "bootstrap": {"reps": c.reps, "seed": BOOTSTRAP_SEED, "confidence": CONFIDENCE},
            "pgd_at": c.reference.label if c.reference else None, "few_seeds": c.few_seeds_note() or None,
            "drift": c.drift_notes(),
            "winners": [g.label for g in c.winners], "main": [g.label for g in c.main],
            "search": [g.label for g in c.search], "groups": [group(g) for g in c.groups],
            "warnings": c.warnings, "notes": c.notes,
            "figures": {k: str(v) for k, v in figures.items() if v is not None}}


def write_report(c: Comparison, out: Path, *, images: int = 8) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    from experiments.comparison import figures as fig  # noqa: PLC0415 - matplotlib: only when a report is drawn

    figures = {
        "iqm": fig.plot_iqm(c.main, c.attacks, out / "iqm.png"),
        "improvement": fig.plot_improvement(c.main, c.attacks, c.reference, out / "improvement.png"),
        "robust_curves": fig.plot_curves(c.main, out / "robust_curves.png"),
        "epsilon_distribution": fig.plot_epsilon_distribution(c.main, out / "epsilon_distribution.png"),
        "fixed_images_strength": fig.plot_fixed_images(c.main, out / "fixed_images_strength.png", images=images),
    }
    report = out / REPORT_MD
    atomic_write_text(report, markdown_report(c, figures))
    write_json(out / SUMMARY_FILE, summary_json(c, figures), default=str)
    return {"report": report, "summary": out / SUMMARY_FILE, **{k: v for k, v in figures.items() if v is not None}}
