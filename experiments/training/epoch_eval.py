"""The per-epoch evaluation (clean and PGD accuracy on fixed subsets) and the fixed images' attacks (Fig. 5)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from experiments.training import distributed
from experiments.config.settings import RunSettings
from las_env.data import ImageData
from evaluation import format_eps
from las_env.datasets.registry import ThreatModel
from las_env.strategy_space import ATTACK_COLUMNS

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


def evaluate_epoch(model: torch.nn.Module, subsets: Mapping[str, tuple[Tensor, Tensor]], threat: ThreatModel,
                   settings: RunSettings) -> dict[str, float | int]:
    """Clean and PGD-k accuracy of ``model`` on each subset (fractions, plus image counts)."""
    ev = settings.eval
    out: dict[str, float | int] = {}
    for split, (x, y) in subsets.items():
        r = distributed.robust_accuracy(model, x, y, threat.epsilon, threat.step_size, ev.pgd_iterations,
                                        batch_size=ev.batch_size, seed=ev.seed,
                                        early_stop=ev.early_stop)  # torchrun: split over ranks
        out[f"{split}_clean"] = r.clean
        out[f"{split}_robust"] = r.robust
        out[f"{split}_images"] = int(x.shape[0])
    return out


def pgd_name(settings: RunSettings, threat: ThreatModel) -> str:
    """The per-epoch attack, as reports name it."""
    stop = ", early stop" if settings.eval.early_stop else ""
    return (f"PGD-{settings.eval.pgd_iterations} (L-inf eps={format_eps(threat.epsilon)}, "
            f"step {format_eps(threat.step_size)}{stop})")


class FixedImageChoices:
    """The attack chosen for the first ``count`` training images each epoch, copied on the device by the step
    that trains each (positions read once per epoch); an image in the dropped partial batch gets ``None``."""

    def __init__(self, game, count: int = 8) -> None:
        self.game = game
        self.index = torch.arange(min(count, game.data.x_train.shape[0]), device=game.device)
        self._where: dict[int, tuple[Tensor, Tensor]] = {}

    def start_epoch(self) -> None:
        b, steps = self.game.config.batch_size, self.game.steps_per_epoch
        position = torch.argsort(self.game.epoch_order)[self.index].tolist()  # once per epoch
        by_step: dict[int, tuple[list[int], list[int]]] = {}
        for k, pos in enumerate(position):
            if pos // b < steps:
                ks, slots = by_step.setdefault(pos // b, ([], []))
                ks.append(k)
                slots.append(pos % b)
        device = self.game.device
        self._where = {i: (torch.tensor(ks, device=device), torch.tensor(sl, device=device))
                       for i, (ks, sl) in by_step.items()}
        self._chosen = {n: torch.full((len(self.index),), math.nan, device=device)
                        for n in ATTACK_COLUMNS}

    def record(self, step_in_epoch: int, info: Mapping[str, Any]) -> None:
        where = self._where.get(step_in_epoch)
        if where is not None:
            ks, slots = where
            for name, values in self._chosen.items():
                values[ks] = info[name][slots].float()

    def result(self) -> dict[str, list]:
        out: dict[str, list] = {"index": self.index.tolist()}
        for name, values in self._chosen.items():
            out[name] = [None if math.isnan(v) else round(v, 6) for v in values.tolist()]
        return out
