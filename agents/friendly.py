"""FAT, friendly adversarial training (Zhang, Xu, Han, Niu, Cui, Sugiyama and Kankanhalli, ICML
2020; their code: zjfheart/Friendly-Adversarial-Training, ``FAT.py``, ``earlystop.py``), as a
strategy player.

The paper attacks each image with early-stopped PGD: the image is attacked until the model
misclassifies it, then for ``tau`` more steps, at most K; ``tau`` follows a schedule over the
120 CIFAR-10 epochs (``adjust_tau``: 0 for epochs 1-50, 1 for 51-90, 2 after).

:class:`FriendlyAgent`:

- Faithful: the threat model's PGD-AT attack (epsilon, step, iterations = their eps, step, K) with
  the early stop, played by the env's training attack itself (the strategy column
  ``early_stop_tau``: ``las_env.attack``'s early stop, the same mechanism as the authors' reward
  probe's); the tau schedule at the same fractions of training (50/120 and 90/120, whole epochs).
- Adapted: the schedule is scaled from 120 epochs to the run's. The grid must have the
  ``early_stop_tau`` column: ``agent=fat``'s config lists it under ``needs_columns`` and the run's
  settings add it to the grid before the env is built (a grid that has the column must hold every
  tau of the schedule, or this agent refuses it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from agents.base import AgentSpec
from agents.baselines import FixedAgent
from las_env.strategy_space import EARLY_STOP_COLUMN

PAPER_TAUS = (0, 1, 2)
"""The paper's dynamic tau, one per phase of training."""
PAPER_SWITCHES = (50 / 120, 90 / 120)
"""Where the phases end, as fractions of training (epochs 50 and 90 of 120)."""


class FriendlyAgent:
    """The threat model's attack for every image, stopping ``tau`` steps after misclassification,
    ``tau`` following the paper's schedule (see the module docstring).

    Args:
        spec: the game; its grid must have the ``early_stop_tau`` column with every value of ``taus``.
        taus: tau in each phase of training.
        switches: the fractions of training (rounded to whole epochs) where each phase after the
            first starts; one fewer than ``taus``, ascending.
        step_size, iterations, epsilon, extra: the attack, as :class:`FixedAgent` takes it (``None``:
            the threat model's PGD-AT attack); ``extra`` names no ``early_stop_tau``.

    Attributes:
        phase_epochs: the first epoch (0-based) of each phase.
        steps_played: steps played so far (the schedule's clock).
    """

    def __init__(self, spec: AgentSpec, *, taus: Sequence[int] = PAPER_TAUS,
                 switches: Sequence[float] = PAPER_SWITCHES, step_size: float | None = None,
                 iterations: int | None = None, epsilon: float | None = None,
                 extra: dict[str, float] | None = None) -> None:
        grid = spec.grid
        if EARLY_STOP_COLUMN not in grid.extra_columns:
            raise ValueError(f"FriendlyAgent plays its early stop through the strategy column {EARLY_STOP_COLUMN}, "
                             f"which this grid lacks: add +data.grid.extra.{EARLY_STOP_COLUMN}=[0,1,2] (agent=fat's "
                             f"config adds it by itself).")
        taus, switches = [int(t) for t in taus], [float(f) for f in switches]
        if len(switches) != len(taus) - 1 or switches != sorted(switches) or not all(0 <= f <= 1 for f in switches):
            raise ValueError(f"switches={switches} must be {len(taus) - 1} ascending fractions of training in [0, 1], "
                             f"one per phase after the first of taus={taus}.")
        self.spec = spec
        self.device = torch.device(spec.device)
        extra = dict(extra or {})
        extra[EARLY_STOP_COLUMN] = taus[0]
        attack = FixedAgent(spec, step_size=step_size, iterations=iterations, epsilon=epsilon, extra=extra)
        self._tau_col = grid.column(EARLY_STOP_COLUMN)
        rows = []
        for tau in taus:
            row = list(attack.action_indices)
            row[self._tau_col] = _exact_index(grid.values[EARLY_STOP_COLUMN], tau)
            rows.append(row)
        self._rows = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.taus = taus
        epochs = spec.total_steps // spec.steps_per_epoch
        self.phase_epochs = [0] + [round(f * epochs) for f in switches]
        self.steps_played = 0

    def phase(self) -> int:
        """The schedule's phase of the next step."""
        epoch = self.steps_played // self.spec.steps_per_epoch
        return sum(1 for start in self.phase_epochs[1:] if epoch >= start)

    def act(self, observation: Tensor, info: dict[str, Any]) -> Tensor:
        """The attack with the current phase's tau, for every image ``(B, columns)``."""
        return self._rows[self.phase()].expand(observation.shape[0], -1)

    def learn(self, reward: Tensor, info: dict[str, Any]) -> dict[str, Any]:
        self.steps_played += 1
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"steps_played": self.steps_played}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_played = int(state["steps_played"])


def _exact_index(values: Sequence[float], want: int) -> int:
    """The index of ``want`` in a column's values; a tau the grid lacks is refused, never rounded."""
    for i, v in enumerate(values):
        if v == want:
            return i
    raise ValueError(f"the schedule's tau={want} is not on the grid's {EARLY_STOP_COLUMN} column "
                     f"({list(values)}): add it, e.g. data.grid.extra.{EARLY_STOP_COLUMN}=[0,1,2].")
