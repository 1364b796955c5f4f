"""The comparison's outputs: the Markdown report, ``summary.json``, and the folder holding them with the figures."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from evaluation.attacks import format_eps
from experiments.comparison.figures import plot_curves, plot_epsilon_distribution, plot_fixed_images
from experiments.comparison.labels import protocol_of
from experiments.comparison.ranking import Comparison
from experiments.comparison.runs import WEIGHTS
from experiments.comparison.stats import Group, attack_title
from experiments.runfolder.runfiles import REPORT_MD, SUMMARY_FILE, SUMMARY_FORMAT
from las_env.files import atomic_write_text, write_json


def results_table(c: Comparison, groups: Sequence[Group], *, winners: Sequence[Group] = ()) -> str:
    titles = []
    for a in c.attacks:
        have = next(r for r in c.runs if a in r.final)
        star = " *" if a == c.headline else ""
        titles.append(f"{attack_title(a, have)}{star} (%)")
    head = ["Agent", "Seeds", *titles, "Wall time (s)", "Train s/epoch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for g in groups:
        n = len(g.runs)
        label = (f"**`{g.label}`**" if g in winners else f"`{g.label}`") + (f" ({g.role})" if g.role else "")
        cells = [label + (" **← best**" if g in winners else ""), f"{n} ({','.join(map(str, g.seeds))})"]
        cells += [g.accuracy(a).pct(n) for a in c.attacks]
        cells += [g.wall().seconds(), g.per_epoch().seconds()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _protocol_lines(c: Comparison) -> list[str]:
    ref = c.runs[0]
    p = protocol_of(ref)
    lines = [f"- Weights: {WEIGHTS[c.weights]} of each run",
             f"- Data: {p['data set']}; model {p['model']}; {p['training budget']}",
             f"- Threat model: {ref.threat}",
             f"- Strategy space (column: values): {p['strategy grid']}"]
    for a in c.attacks:
        have = [r for r in c.runs if a in r.final]
        row = have[0].final[a]
        n_images = sorted({int(r.final[a].get("n_images", 0)) for r in have})
        where = " (from experiments/evaluate.py)" if any(a in r.posthoc for r in have) else ""
        lines.append(f"- `{a}`: {row.get('label', a)}, eps {format_eps(float(row.get('epsilon', 0)))}, "
                     f"first {'/'.join(map(str, n_images))} test images{where}")
    if c.headline:
        lines.append(f"- Ranking (* column): {attack_title(c.headline, c.runs[0])} robust accuracy, mean over seeds "
                     f"(AutoAttack when every run has it, else the strongest PGD every run has)")
    lines.append(f"- Per-epoch curves: {p['per-epoch evaluation']}")
    lines.append("- ± is the sample standard deviation over seeds; (n=k) marks a cell with fewer seeds than its row")
    return lines


def markdown_report(c: Comparison, figures: Mapping[str, Path | None]) -> str:
    out = ["# LAS-AT comparison", "",
           f"{len(c.runs)} runs, {len(c.groups)} agents/settings, from {', '.join(c.sources)}.", ""]
    if c.warnings:
        out += ["## ⚠ WARNING: the runs do not share one protocol", "",
                "The numbers below are NOT directly comparable:", ""]
        out += [f"- **{w}**" for w in c.warnings] + [""]
    out += ["## Protocol", ""] + _protocol_lines(c) + [""]
    out += ["## Results (test accuracy, mean ± std over seeds)", "", results_table(c, c.main, winners=c.winners), ""]
    if c.winners:
        names = ", ".join(f"`{g.label}`" for g in c.winners)
        out.append(f"Best mean {attack_title(c.headline, c.runs[0])} robust accuracy: {names}{c.margin_note()}.")
        out.append("")
    if c.search:
        if c.headline:
            text = (f"Every fixed (PGD-AT) attack that was run, ranked by mean {attack_title(c.headline, c.runs[0])} "
                    "robust accuracy. The best is picked on the same test images it is reported on, so its row "
                    "above is an optimistic estimate of hand-tuning the fixed attack.")
        else:
            text = "Every fixed (PGD-AT) attack that was run (unranked: no robust attack was evaluated on every run)."
        out += ["## Search baseline: fixed attack settings (paper Fig. 3)", "", text, "",
                results_table(c, c.search), ""]
    if c.notes or c.unfinished:
        out += ["## Notes", ""] + [f"- {n}" for n in c.notes]
        if c.unfinished:
            out.append(f"- {len(c.unfinished)} unfinished run folder(s) (a checkpoint, no results yet) were "
                       f"skipped, e.g. {c.unfinished[0]}")
        out.append("")
    out += ["## Figures", ""]
    captions = {
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
    out += ["## Runs", "", "| Agent | Seed | " + " | ".join(c.attacks) + " | Wall time (s) | Run directory |",
            "|---|---:|" + "---:|" * len(c.attacks) + "---:|---|"]
    for g in c.groups:
        for r in g.runs:
            accs = [f"{100 * float(r.final[a]['accuracy']):.2f}" if a in r.final else "-" for a in c.attacks]
            wall = f"{r.seconds['total']:.1f}" if "total" in r.seconds else "-"
            out.append(f"| `{r.label}` | {r.seed} | " + " | ".join(accs) + f" | {wall} | {r.path} |")
    return "\n".join(out) + "\n"


def summary_json(c: Comparison, figures: Mapping[str, Path | None]) -> dict[str, Any]:
    def group(g: Group) -> dict[str, Any]:
        return {"label": g.label, "role": g.role, "seeds": g.seeds, "runs": [str(r.path) for r in g.runs],
                "accuracy": {a: g.accuracy(a).to_dict() for a in c.attacks},
                "wall_seconds": g.wall().to_dict(), "train_seconds_per_epoch": g.per_epoch().to_dict()}

    return {"format": SUMMARY_FORMAT, "weights": c.weights, "headline_attack": c.headline, "attacks": c.attacks,
            "winners": [g.label for g in c.winners], "main": [g.label for g in c.main],
            "search": [g.label for g in c.search], "groups": [group(g) for g in c.groups],
            "warnings": c.warnings, "notes": c.notes,
            "figures": {k: str(v) for k, v in figures.items() if v is not None}}


def write_report(c: Comparison, out: Path, *, images: int = 8) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    plotted = c.main
    figures = {
        "robust_curves": plot_curves(plotted, out / "robust_curves.png"),
        "epsilon_distribution": plot_epsilon_distribution(plotted, out / "epsilon_distribution.png"),
        "fixed_images_strength": plot_fixed_images(plotted, out / "fixed_images_strength.png", images=images),
    }
    report = out / REPORT_MD
    atomic_write_text(report, markdown_report(c, figures))
    write_json(out / SUMMARY_FILE, summary_json(c, figures), default=str)
    return {"report": report, "summary": out / SUMMARY_FILE, **{k: v for k, v in figures.items() if v is not None}}
