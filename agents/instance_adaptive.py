"""IAAT, instance-adaptive adversarial training (Balaji, Goldstein and Hoffman, 2019,
arXiv:1910.08051; their code: yogeshbalaji/Instance_Adaptive_Adversarial_Training,
``trainers/trainer_adaptive.py``), as a strategy player.

The paper keeps one epsilon per training image, in a memory indexed by the image's data-set index:
after a warm-up (10 of 110 epochs at the threat epsilon), each visit attacks the image at
``eps_prev + gamma`` and at ``eps_prev`` and sets ``eps = eps_prev + gamma`` if it withstands the
higher one, ``eps_prev`` if only the current, ``eps_prev - gamma`` otherwise (times "correct on the
clean image", clamped at 0, smoothed 0.1 new + 0.9 old); its PGD step is
``max(eps / (K / 2), the threat's step)`` for K iterations.

:class:`InstanceAdaptiveAgent`:

- Faithful: a per-image epsilon memory keyed by ``info["next_indices"]`` / ``info["indices"]``;
  the warm-up at the threat epsilon for the same fraction of training (``warmup_fraction``,
  10/110); raised when the image withstood its attack, lowered when it did not; the step-size rule
  ``max(2 eps / K, threat step)`` (the nearest grid step); K = the threat model's iterations.
- Adapted to the grid and to one attack per step: epsilon moves ONE GRID STEP per visit, within the
  grid's range, on the outcome of the attack the image was trained on at its previous visit
  (``info["adv_correct"]``), instead of two extra attacks per step at +-gamma (their cost triples the
  attack's) and the 0.1 smoothing (a smoothed move of 0.1 gamma would rarely reach the next grid
  value). The "correct on the clean image" factor is not applied: the env reports no per-image
  clean correctness, and an image the target gets wrong clean fails its attack too, so it is
  lowered anyway (one grid step per visit instead of at once to 0).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from agents.base import AgentSpec
from agents.baselines import FixedAgent

PAPER_WARMUP_FRACTION = 10 / 110
"""The paper's warm-up: 10 of its 110 CIFAR-10 epochs at the threat epsilon."""


class InstanceAdaptiveAgent:
    """A per-training-image epsilon, one grid step up when the image withstood its attack, one down
    when it did not (see the module docstring).

    Args:
        spec: the game (``spec.train_images`` sizes the memory).
        warmup_fraction: the part of training (whole epochs, rounded) played at the threat epsilon
            before the memory starts moving.
        step_size, iterations, epsilon, extra: the threat attack, as :class:`FixedAgent` takes it
            (``None``: the threat model's PGD-AT attack): its epsilon is every image's start, its
            iterations are played throughout, its step the floor of the step-size rule.

    Attributes:
        memory: each training image's epsilon, as its rank in the grid's epsilons sorted ascending
            (long, ``(train_images,)``, on the device).
        warmup_epochs: epochs at the threat epsilon.
    """

    def __init__(self, spec: AgentSpec, *, warmup_fraction: float = PAPER_WARMUP_FRACTION,
                 step_size: float | None = None, iterations: int | None = None, epsilon: float | None = None,
                 extra: dict[str, float] | None = None) -> None:
        if spec.train_images is None:
            raise ValueError("InstanceAdaptiveAgent keeps one epsilon per training image and needs the training "
                             "set's size: build its spec with AgentSpec.from_game(env).")
        if not 0 <= warmup_fraction <= 1:
            raise ValueError(f"warmup_fraction={warmup_fraction!r} must lie in [0, 1] (the paper's: 10/110).")
        self.spec = spec
        self.device = torch.device(spec.device)
        grid = spec.grid
        threat = FixedAgent(spec, step_size=step_size, iterations=iterations, epsilon=epsilon, extra=extra)
        self._eps_col, self._step_col = grid.column("epsilon"), grid.column("step_size")
        ascending = sorted(range(len(grid.epsilons)), key=lambda i: grid.epsilons[i])
        # The paper's step for each epsilon: max(eps / (K / 2), the threat's step), nearest grid value.
        steps = [grid.index_of(step_size=max(2 * grid.epsilons[i] / threat.iterations, threat.step_size))[0]
                 for i in ascending]
        self._eps_index = torch.tensor(ascending, dtype=torch.long, device=self.device)
        self._step_index = torch.tensor(steps, dtype=torch.long, device=self.device)
        self._top = len(ascending) - 1
        self.threat_rank = ascending.index(threat.action_indices[self._eps_col])
        self._row = torch.tensor(threat.action_indices, dtype=torch.long, device=self.device)
        epochs = spec.total_steps // spec.steps_per_epoch
        self.warmup_epochs = round(warmup_fraction * epochs)
        self.memory = torch.full((spec.train_images,), self.threat_rank, dtype=torch.long, device=self.device)
        self.steps_played = 0

    def _warming_up(self) -> bool:
        return self.steps_played // self.spec.steps_per_epoch < self.warmup_epochs

    def act(self, observation: Tensor, info: dict[str, Any]) -> Tensor:
        """Each image's remembered epsilon (the threat's during the warm-up) and its step size."""
        action = self._row.repeat(observation.shape[0], 1)
        if self._warming_up():
            return action
        ranks = self.memory[info["next_indices"]]
        action[:, self._eps_col] = self._eps_index[ranks]
        action[:, self._step_col] = self._step_index[ranks]
        return action

    def learn(self, reward: Tensor, info: dict[str, Any]) -> dict[str, Any]:
        """One grid step up for each played image that withstood its attack, one down otherwise."""
        if not self._warming_up():
            idx = info["indices"]
            move = info["adv_correct"].long() * 2 - 1
            self.memory[idx] = (self.memory[idx] + move).clamp_(0, self._top)
        self.steps_played += 1
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"memory": self.memory.clone(), "steps_played": self.steps_played}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        memory = state["memory"]
        if memory.shape != self.memory.shape:
            raise ValueError(f"the checkpoint remembers {memory.shape[0]} images' epsilons, this training set has "
                             f"{self.memory.shape[0]}.")
        self.memory = memory.to(self.device).clone()
        self.steps_played = int(state["steps_played"])
