"""The per-epoch evaluation (clean and PGD accuracy on fixed subsets) and checkpoint selection without test leakage:
the authors pick the epoch by its TEST accuracy (optimistic); here the best epoch on held-out TRAINING images
(``select_on=val``) goes to ``best.pt`` (``test``: theirs, warned)."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from evaluation import format_eps
from experiments.config.errors import ConfigError
from experiments.config.settings import RunSettings
from experiments.runfolder.runfiles import BEST
from experiments.training import distributed
from las_env.checkpoint import atomic_save, read_torch_file
from las_env.data import ImageData

TEST_SELECTION_WARNING = (
    "WARNING: selection.select_on=test picks the best epoch by its TEST accuracy (the authors' choice) "
    "and the final report evaluates it on the same test images: its numbers are optimistically biased. "
    "Use select_on=val (the default) for an honest selection."
)
TRAIN_SUBSET_SEED = 20220601  # the same train-subset images for every run, whatever its seed


def eval_subsets(data: ImageData, test_n: int | None, train_n: int | None) -> dict[str, tuple[Tensor, Tensor]]:
    """The first ``test_n`` test images and ``train_n`` seeded training images (some sets are sorted by class)."""
    n_test = min(test_n or data.x_test.shape[0], data.x_test.shape[0])
    n_train_total = data.x_train.shape[0]
    n_train = min(train_n or n_train_total, n_train_total)
    g = torch.Generator().manual_seed(TRAIN_SUBSET_SEED)
    idx = torch.randperm(n_train_total, generator=g)[:n_train].sort().values.to(data.x_train.device)
    return {
        "test": (data.x_test[:n_test], data.y_test[:n_test]),
        "train": (data.x_train[idx], data.y_train[idx]),
    }


def evaluate_epoch(model: torch.nn.Module, subsets: Mapping[str, tuple[Tensor, Tensor]],
                   settings: RunSettings) -> dict[str, float | int]:
    """Clean and PGD-k accuracy of ``model`` on each subset (fractions, plus image counts)."""
    ev, threat = settings.eval, settings.env.threat
    out: dict[str, float | int] = {}
    for split, (x, y) in subsets.items():
        r = distributed.robust_accuracy(model, x, y, threat.epsilon, threat.step_size, ev.pgd_iterations,
                                        batch_size=ev.batch_size, seed=ev.seed,
                                        early_stop=ev.early_stop)  # torchrun: split over ranks
        out[f"{split}_clean"] = r.clean
        out[f"{split}_robust"] = r.robust
        out[f"{split}_images"] = int(x.shape[0])
    return out


def pgd_name(settings: RunSettings) -> str:
    """The per-epoch attack, as reports name it."""
    stop, threat = ", early stop" if settings.eval.early_stop else "", settings.env.threat
    return (f"PGD-{settings.eval.pgd_iterations} (L-inf eps={format_eps(threat.epsilon)}, "
            f"step {format_eps(threat.step_size)}{stop})")


def split_validation(data: ImageData, fraction: float, seed: int) -> tuple[ImageData, tuple[Tensor, Tensor] | None]:
    """``(data without the held-out images, (x_val, y_val))``, or ``(data, None)``; each class gives
    ``round(fraction * n_class)`` (at least one of two or more), seeded; the training images keep their order."""
    if fraction == 0:
        return data, None
    g = torch.Generator().manual_seed(seed)
    y = data.y_train.cpu()
    held: list[Tensor] = []
    for c in range(data.num_classes):
        idx = torch.nonzero(y == c).flatten()
        n = idx.numel()
        if n == 0:
            continue
        take = min(max(round(fraction * n), 1 if n >= 2 else 0), n - 1)
        held.append(idx[torch.randperm(n, generator=g)[:take]])
    val_idx = torch.cat(held).sort().values if held else torch.zeros(0, dtype=torch.long)
    if val_idx.numel() == 0:
        raise ConfigError(f"selection.val_fraction={fraction} holds out no image of {data.name}'s "
                          f"{y.numel()} training images: raise it, or set selection.val_fraction=0 with select_on=last.")
    keep = torch.ones(y.numel(), dtype=torch.bool)
    keep[val_idx] = False
    device = data.x_train.device
    keep, val_idx = keep.to(device), val_idx.to(device)
    x_val, y_val = data.x_train[val_idx], data.y_train[val_idx]
    description = (f"{data.description}; {int(keep.sum())} of its training images trained on, {val_idx.numel()} "
                   f"held out for validation (stratified, split seed {seed})")
    return replace(data, x_train=data.x_train[keep], y_train=data.y_train[keep], description=description), (x_val, y_val)


@dataclass
class BestWeights:
    """The epoch with the best per-epoch PGD accuracy on ``select_on``, its weights in ``best.pt`` (written before
    the epoch's checkpoint, whose loop state holds ``as_dict()``: a resumed run continues the selection)."""

    select_on: str
    epoch: int | None = None
    score: float = -math.inf

    @property
    def metric(self) -> str:
        """The per-epoch evaluation key selection compares (robust accuracy on ``select_on``)."""
        return f"{self.select_on}_robust"

    def update(self, epoch: int, evaluation: Mapping[str, Any] | None, model: torch.nn.Module, run_dir: Path) -> bool:
        """Record ``epoch`` if it beats the best so far (ties keep the earlier); whether ``best.pt`` was written."""
        if self.select_on == "last" or not evaluation or self.metric not in evaluation:
            return False
        score = float(evaluation[self.metric])
        if score <= self.score:
            return False
        weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        atomic_save({"state_dict": weights, "epoch": epoch, "score": score, "metric": self.metric}, run_dir / BEST)
        self.epoch, self.score = epoch, score
        return True

    def as_dict(self) -> dict[str, Any]:
        return {"select_on": self.select_on, "epoch": self.epoch, "score": self.score}

    @classmethod
    def from_dict(cls, select_on: str, state: Mapping[str, Any] | None) -> BestWeights:
        if not state or state.get("select_on") != select_on:
            return cls(select_on)
        return cls(select_on, state.get("epoch"), float(state.get("score", -math.inf)))

    def load_into(self, model: torch.nn.Module, run_dir: Path) -> torch.nn.Module | None:
        """A copy of ``model`` holding the best weights, or None when none were kept."""
        if self.epoch is None or not (run_dir / BEST).is_file():
            return None
        best = copy.deepcopy(model)
        try:
            best.load_state_dict(read_torch_file(run_dir / BEST)["state_dict"])
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:  # not ours, damaged, or other weights
            raise ConfigError(f"{run_dir / BEST} cannot be read back as this run's best-epoch weights ({exc}). Its "
                              f"checkpoint.pt is intact: move {BEST} out of {run_dir} and resume with the same "
                              f"command plus resume=true (the final report then covers the final weights only).") from None
        return best

    def describe(self, pgd: str) -> str:
        """What the best weights are, for report headers."""
        where = {"val": "the held-out validation images", "test": "the TEST images (authors' selection; optimistic)"}
        return (f"best-epoch weights (epoch {self.epoch}, selected by per-epoch {pgd} accuracy "
                f"{self.score:.2%} on {where.get(self.select_on, self.select_on)})")
