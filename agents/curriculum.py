"""CAT, curriculum adversarial training (Cai, Liu and Song, IJCAI 2018), as a strategy player.

The paper trains against attacks of increasing strength, PGD with 0, 1, ..., K steps, and moves
to the next strength when the accuracy at the current one stops improving (measured on held-out
data); a fixed linear schedule is its simple variant. :class:`CurriculumAgent` plays the same
attack on every image of a batch, and its strength rises along the strategy grid:

- Faithful: strength = PGD iterations, rising one level at a time from the grid's fewest to the
  final attack's (the threat model's PGD-AT attack unless ``iterations=``/``epsilon=`` say
  otherwise), never beyond it; ``schedule="plateau"`` moves up when accuracy at the current
  level has not improved for ``patience`` epochs (then the best accuracy is forgotten: a new
  level starts its own record); ``schedule="linear"`` moves up with training progress.
- Adapted to the grid: the paper's level 0 (clean training) is not on the grid (iterations >= 1),
  so the curriculum starts at the grid's fewest iterations. The accuracy watched is the training
  batches' adversarial accuracy at the current level (``info["adv_correct"]``, summed over the
  epoch on the device and read once per epoch), not a held-out set's: the env already measures
  it, and the agent sees no other data. ``epsilon_rises=True`` also raises epsilon along the
  grid with the level, from the grid's smallest to the final attack's (an option the issue asks
  for, not the paper's). The step size stays the final attack's.
- The paper's batch mixing (its remedy for forgetting earlier strengths: each batch mixes the
  adversarial examples of every strength up to the current one) is ``batch_mixing=True``: each
  image gets a level drawn uniformly from 0 .. current (off by default: one attack per batch, the
  curriculum alone). Its inference-time quantisation is no part of the attack strategy: not built.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from agents.base import AgentSpec
from agents.baselines import FixedAgent
from las_env.checkpoint import restore_generator


class CurriculumAgent:
    """Attack strength rising over training, one level at a time (see the module docstring).

    Args:
        spec: the game.
        schedule: ``"plateau"`` (the paper's rule) or ``"linear"`` (level ``floor(L * t / T)``
            after ``t`` of ``T`` steps, ``L`` levels: the last ``1 / L`` of training at the top).
        patience: epochs without improvement of the adversarial training accuracy before the
            level rises (``plateau`` only).
        min_improvement: an epoch's accuracy must beat the level's best by more than this to
            count as an improvement.
        epsilon_rises: raise epsilon along the grid with the level too (otherwise the final
            attack's epsilon throughout).
        batch_mixing: each image plays a level drawn uniformly from 0 .. the current one (the paper's).
        seed: the batch mixing generator's seed; ``None`` takes ``spec.seed``.
        step_size, iterations, epsilon, extra: the final attack, as :class:`FixedAgent` takes
            it (``None``: the threat model's PGD-AT attack).

    Attributes:
        levels: each level's action row (grid indices), weakest first; the last is the final attack.
        level: the current level.
    """

    def __init__(
        self,
        spec: AgentSpec,
        *,
        schedule: Literal["plateau", "linear"] = "plateau",
        patience: int = 1,
        min_improvement: float = 0.0,
        epsilon_rises: bool = False,
        batch_mixing: bool = False,
        seed: int | None = None,
        step_size: float | None = None,
        iterations: int | None = None,
        epsilon: float | None = None,
        extra: dict[str, float] | None = None,
    ) -> None:
        if schedule not in ("plateau", "linear"):
            raise ValueError(f"schedule={schedule!r}: use plateau (the paper's: move up when the accuracy at the "
                             f"current strength stops improving) or linear (with training progress).")
        if isinstance(patience, bool) or int(patience) != patience or patience < 1:
            raise ValueError(f"patience={patience!r} must be a whole number of epochs >= 1.")
        self.spec, self.schedule, self.patience = spec, schedule, int(patience)
        self.min_improvement = float(min_improvement)
        self.device = torch.device(spec.device)
        final = FixedAgent(spec, step_size=step_size, iterations=iterations, epsilon=epsilon, extra=extra)
        self.levels = curriculum_levels(spec, final.action_indices, epsilon_rises)
        self._rows = torch.tensor(self.levels, dtype=torch.long, device=self.device)
        self.batch_mixing = bool(batch_mixing)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(spec.seed if seed is None else seed))
        self.level = 0
        self.steps_played = 0
        self.best = -math.inf  # the best epoch accuracy at the current level
        self.stale = 0  # epochs since it last improved
        self._correct = torch.zeros((), device=self.device)  # this epoch's adversarially correct images
        self._seen = 0

    def act(self, observation: Tensor, info: dict[str, Any]) -> Tensor:
        """The current level's attack for every image ``(B, columns)`` (batch mixing: a level per image)."""
        b = observation.shape[0]
        if not self.batch_mixing:
            return self._rows[self.level].expand(b, -1)
        return self._rows[torch.randint(0, self.level + 1, (b,), generator=self.generator, device=self.device)]

    def learn(self, reward: Tensor, info: dict[str, Any]) -> dict[str, Any]:
        """Count the step; at an epoch's end (plateau) or any step (linear) set the next level."""
        correct = info["adv_correct"]
        self._correct += correct.float().sum()
        self._seen += correct.shape[0]
        self.steps_played += 1
        if self.schedule == "linear":
            last = len(self.levels) - 1
            self.level = min(last, len(self.levels) * self.steps_played // self.spec.total_steps)
        elif self.steps_played % self.spec.steps_per_epoch == 0:
            self.end_epoch(float(self._correct) / max(self._seen, 1))  # one device read per epoch
        if self.steps_played % self.spec.steps_per_epoch == 0:
            self._correct.zero_()
            self._seen = 0
        return {"level": self.level}

    def end_epoch(self, accuracy: float) -> None:
        """The plateau rule on one epoch's adversarial accuracy at the current level."""
        if accuracy > self.best + self.min_improvement:
            self.best, self.stale = accuracy, 0
            return
        self.stale += 1
        if self.stale >= self.patience and self.level < len(self.levels) - 1:
            self.level += 1
            self.best, self.stale = -math.inf, 0

    def state_dict(self) -> dict[str, Any]:
        return {"level": self.level, "steps_played": self.steps_played, "best": self.best, "stale": self.stale,
                "correct": self._correct.clone(), "seen": self._seen, "levels": [list(r) for r in self.levels],
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if [tuple(r) for r in state["levels"]] != self.levels:
            raise ValueError(f"the checkpoint's curriculum levels {state['levels']} are not this agent's "
                             f"{[list(r) for r in self.levels]} (another grid or final attack).")
        self.level, self.steps_played = int(state["level"]), int(state["steps_played"])
        self.best, self.stale, self._seen = float(state["best"]), int(state["stale"]), int(state["seen"])
        self._correct = state["correct"].to(self.device).clone()
        restore_generator(self.generator, state["generator"])


def curriculum_levels(spec: AgentSpec, final: tuple[int, ...], epsilon_rises: bool) -> list[tuple[int, ...]]:
    """Action rows from the weakest level to ``final``: one per grid iteration count up to the final
    attack's; with ``epsilon_rises`` the epsilon index of each is the grid value nearest the straight
    line from the grid's smallest epsilon to the final one."""
    grid = spec.grid
    it_col, eps_col = grid.column("iterations"), grid.column("epsilon")
    top = grid.iterations[final[it_col]]
    counts = sorted(i for i in range(len(grid.iterations)) if grid.iterations[i] <= top)
    counts.sort(key=lambda i: grid.iterations[i])
    low, high = min(grid.epsilons), grid.epsilons[final[eps_col]]
    levels = []
    for n, i in enumerate(counts):
        row = list(final)
        row[it_col] = i
        if epsilon_rises and len(counts) > 1:
            row[eps_col] = grid.index_of(epsilon=low + (high - low) * n / (len(counts) - 1))[0]
        levels.append(tuple(row))
    levels[-1] = tuple(final)  # exactly the final attack, whatever the rounding above
    return levels
