"""The run's PNG figures: accuracy curves (the paper's Fig. 1) and the chosen grid values (Fig. 4)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from evaluation.attacks import format_eps  # noqa: E402


def save(fig: plt.Figure, path: Path, **kwargs: Any) -> Path:
    """Write ``fig`` to ``path`` as a PNG and close it."""
    fig.savefig(path, dpi=120, **kwargs)
    plt.close(fig)
    return path


def share_heatmap(ax: Any, counts: np.ndarray, epochs: Sequence[int], values: Sequence[float]) -> Any:
    """Each epoch's share of training images per grid value (``counts``: values x epochs), with the mean choice
    (index space) as a white line to read the trend at a glance; returns the image, for a colour bar."""
    share = counts / np.maximum(counts.sum(0, keepdims=True), 1)
    image = ax.imshow(share, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1,
                      extent=(epochs[0] - 0.5, epochs[-1] + 0.5, -0.5, len(values) - 0.5))
    ax.plot(epochs, (share * np.arange(len(values))[:, None]).sum(0), color="white", lw=1.2)
    ax.set_yticks(range(len(values)), [format_eps(v) for v in values], fontsize=7)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return image


CHOICE_TITLES = {"epsilon": "epsilon", "iterations": "PGD iterations", "step_size": "step size",
                 "trades_beta": "TRADES beta"}


def plot_accuracy(history: Sequence[Mapping[str, Any]], path: Path, *, title: str, attack: str) -> Path | None:
    """Accuracy curves; ``attack`` names the per-epoch attack (e.g. "PGD-10, eps 0.2")."""
    rows = [h for h in history if h.get("eval")]
    if not rows:
        return None
    epochs = [h["epoch"] for h in rows]
    ev = [h["eval"] for h in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = [
        ("test_clean", "test, clean", "tab:blue", "-"),
        ("test_robust", f"test, {attack}", "tab:blue", "--"),
        ("train_clean", "train subset, clean", "tab:orange", "-"),
        ("train_robust", f"train subset, {attack}", "tab:orange", "--"),
        ("val_clean", "validation (held out, selects best.pt), clean", "tab:green", "-"),
        ("val_robust", f"validation, {attack}", "tab:green", "--"),
    ]
    for key, label, color, ls in styles:
        if key in ev[0]:
            n = ev[0].get(key.split("_")[0] + "_images")
            ax.plot(epochs, [100 * e[key] for e in ev], ls, color=color, marker="o", ms=3,
                    label=f"{label} ({n} images)" if n else label)
    ax.set(xlabel="epoch", ylabel="accuracy (%)", ylim=(0, 100))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return save(fig, path)


def plot_choices(history: Sequence[Mapping[str, Any]], grid_values: Mapping[str, Sequence[float]],
                 path: Path, *, title: str) -> Path | None:
    """A heatmap per strategy column (epsilon first): each epoch's share of training images per grid value."""
    rows = [h for h in history if h.get("choices")]
    if not rows:
        return None
    first = ("epsilon", "iterations", "step_size")  # then any extra strategy column (trades_beta)
    names = [n for n in first if n in rows[0]["choices"]] + [n for n in rows[0]["choices"] if n not in first]
    epochs = [h["epoch"] for h in rows]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        counts = np.array([h["choices"][name] for h in rows], dtype=float).T  # (values, epochs)
        image = share_heatmap(ax, counts, epochs, grid_values[name])
        ax.set_title(f"chosen {CHOICE_TITLES.get(name, name)}", fontsize=10)
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.025, label="share of training images")
    fig.suptitle(title, fontsize=10)
    return save(fig, path, bbox_inches="tight")
