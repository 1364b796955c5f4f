"""The comparison's figures: per-epoch curves (paper Fig. 1), chosen epsilon (Fig. 4), fixed images (Fig. 5),
rliable's IQM intervals and probability of improvement. Imported when a report is drawn (matplotlib is slow to load)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from evaluation.attacks import format_eps  # noqa: E402
from experiments.comparison.runs import Run  # noqa: E402
from experiments.comparison.ranking import Group, rliable  # noqa: E402
from experiments.tracking.plots import save, share_heatmap  # noqa: E402

plot_utils = rliable("plot_utils")


def _short(g: Group) -> str:
    return g.label + (f" ({g.role})" if g.role else "")


def plot_curves(groups: Sequence[Group], path: Path) -> Path | None:
    panels = [("test_robust", "test, robust"), ("train_robust", "train subset, robust"), ("test_clean", "test, clean")]
    if any("val_robust" in (h.get("eval") or {}) for g in groups for r in g.runs for h in r.history):
        panels.insert(0, ("val_robust", "validation (held out; selects best.pt), robust"))
    if not any(h.get("eval") for g in groups for r in g.runs for h in r.history):
        return None
    colors = {g.label: plt.get_cmap("tab10")(i % 10) for i, g in enumerate(groups)}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for g in groups:
            per_epoch: dict[int, list[float]] = defaultdict(list)
            for r in g.runs:
                for h in r.history:
                    if h.get("eval") and key in h["eval"]:
                        per_epoch[int(h["epoch"])].append(100 * float(h["eval"][key]))
            if not per_epoch:
                continue
            epochs = sorted(per_epoch)
            mean = np.array([np.mean(per_epoch[e]) for e in epochs])
            std = np.array([np.std(per_epoch[e], ddof=1) if len(per_epoch[e]) > 1 else 0.0 for e in epochs])
            ax.plot(epochs, mean, marker="o", ms=3, color=colors[g.label], label=_short(g))
            ax.fill_between(epochs, mean - std, mean + std, color=colors[g.label], alpha=0.2, lw=0)
        ax.set(xlabel="epoch", ylabel="accuracy (%)")
        ax.set_title(title, fontsize=10)
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(f"Per-epoch accuracy, mean ± std over seeds; robust = {groups[0].runs[0].per_epoch_attack}",
                 fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def _grid_panels(n: int) -> tuple[plt.Figure, list[Any]]:
    cols, rows = min(n, 3), math.ceil(n / min(n, 3))
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False, layout="constrained")
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def plot_epsilon_distribution(groups: Sequence[Group], path: Path) -> Path | None:
    groups = [g for g in groups if any(h.get("choices", {}).get("epsilon") for r in g.runs for h in r.history)]
    if not groups:
        return None
    fig, axes = _grid_panels(len(groups))
    im = None
    for ax, g in zip(axes, groups):
        values = list(g.runs[0].grid.values["epsilon"])
        per_epoch: dict[int, np.ndarray] = {}
        for r in g.runs:
            for h in r.history:
                counts = np.asarray(h.get("choices", {}).get("epsilon") or [], dtype=float)
                if len(counts) == len(values):
                    e = int(h["epoch"])
                    per_epoch[e] = per_epoch.get(e, np.zeros(len(values))) + counts
        epochs = sorted(per_epoch)
        if not epochs:
            ax.set_visible(False)
            continue
        im = share_heatmap(ax, np.stack([per_epoch[e] for e in epochs], axis=1), epochs, values)
        ax.set_ylabel("epsilon")
        ax.set_title(f"{_short(g)}, {len(g.runs)} seed(s)", fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=axes, fraction=0.025, label="share of training images")
    fig.suptitle("Chosen epsilon per epoch (paper Fig. 4)", fontsize=10)
    return save(fig, path, bbox_inches="tight")


def _fixed_images(run: Run) -> list[tuple[int, dict[str, Any]]]:
    return [(int(h["epoch"]), h["fixed_images"]) for h in run.history if h.get("fixed_images")]


def plot_fixed_images(groups: Sequence[Group], path: Path, *, images: int = 8) -> Path | None:
    """One panel per agent that chooses (fixed attacks are constant by construction): the epsilon
    chosen for each of the first ``images`` tracked training images, per epoch, in the first
    seed's run. An epoch where an image was not trained on (the dropped last partial batch,
    ``max_steps_per_epoch``) has no point; the line joins the epochs that have one."""
    shown = [(g, g.runs[0]) for g in groups if not g.is_fixed and _fixed_images(g.runs[0])]
    if not shown:
        return None
    fig, axes = _grid_panels(len(shown))
    for ax, (g, run) in zip(axes, shown):
        records = _fixed_images(run)
        epochs = [e for e, _ in records]
        values = list(run.grid.values["epsilon"])
        spacing = (values[-1] - values[0]) / max(len(values) - 1, 1) or 1.0
        indices = list(records[0][1].get("index") or range(len(records[0][1]["epsilon"])))[:images]
        for k, image in enumerate(indices):
            # A small vertical offset per image keeps images with equal choices apart.
            offset = (k - (len(indices) - 1) / 2) * 0.3 * spacing / max(len(indices), 1)
            points = [(e, float(rec["epsilon"][k]) + offset) for e, rec in records
                      if k < len(rec["epsilon"]) and rec["epsilon"][k] is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", ms=3, lw=1, color=plt.get_cmap("tab10")(k % 10), label=f"image {image}")
        ax.set_yticks(values, [format_eps(v) for v in values], fontsize=7)
        ax.set(ylim=(values[0] - 0.5 * spacing, values[-1] + 0.5 * spacing), xlim=(min(epochs) - 0.5, max(epochs) + 0.5),
               xlabel="epoch", ylabel="chosen epsilon")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.set_title(f"{_short(g)}, seed {run.seed}", fontsize=8)
        if ax.lines:
            ax.legend(fontsize=6, ncol=2, loc="best")
        else:  # e.g. one short epoch: the tracked images fell in the dropped partial batch
            ax.text(0.5, 0.5, "no tracked image was trained on", ha="center", transform=ax.transAxes, fontsize=8)
    fig.suptitle("Epsilon chosen for fixed training images over epochs (paper Fig. 5)", fontsize=10)
    return save(fig, path)


def plot_iqm(groups: Sequence[Group], titles: dict[str, str], path: Path) -> Path | None:
    """rliable's interval-estimate plot: per attack (``titles``: name -> title), each agent's IQM and 95% CI."""
    attacks = [a for a in titles if groups and all(a in g.iqm for g in groups)]
    if not attacks:
        return None
    points = {_short(g): np.array([[100 * getattr(g.iqm[a], k) for a in attacks] for k in ("value", "low", "high")])
              for g in groups}
    fig, _ = plot_utils.plot_interval_estimates({k: v[0] for k, v in points.items()}, {k: v[1:] for k, v in points.items()},
                                                [titles[a] for a in attacks], subfigure_width=4.0, row_height=0.5,
                                                xlabel="accuracy (%): IQM over seeds, 95% CI",
                                                xlabel_y_coordinate=min(-0.1, -1.0 / len(groups)))  # below the ticks
    return save(fig, path, bbox_inches="tight")


def plot_improvement(groups: Sequence[Group], titles: dict[str, str], reference: Group | None,
                     path: Path) -> Path | None:
    """rliable's probability-of-improvement plot: per attack, P(agent > PGD-AT) with its 95% CI."""
    groups = [g for g in groups if g.improvement]
    attacks = [a for a in titles if groups and all(a in g.improvement for g in groups)]
    if reference is None or not attacks:
        return None
    fig, axes = plt.subplots(1, len(attacks), figsize=(5.5 * len(attacks), 0.5 * len(groups) + 1.5), squeeze=False)
    for ax, a in zip(axes[0], attacks):
        pairs = {f"{g.label}|{reference.label}": g.improvement[a] for g in groups}
        plot_utils.plot_probability_of_improvement(
            {k: i.value for k, i in pairs.items()}, {k: [i.low, i.high] for k, i in pairs.items()}, pair_separator="|",
            ax=ax, xlabel=f"P(agent > PGD-AT), {titles[a]}", left_ylabel="agent", right_ylabel="PGD-AT",
            ticklabelsize="small", labelsize="medium", xticks=[0, 0.25, 0.5, 0.75, 1])
    fig.tight_layout()
    return save(fig, path, bbox_inches="tight")
