"""A batch-level bandit over the strategy grid: Exp3 (Auer, Cesa-Bianchi, Freund and Schapire,
SIAM J. Computing 2002), one per column of the grid, the cheapest learner of the arena.

Every image of a batch gets the same action (the arm); on the steps that carry the full reward
(every ``k``-th, ``spec.reward_interval``) the batch reward updates the arms that were played.
It asks whether the per-image deep policy (agent=reinforce, ppo) is needed at all.

Why Exp3 and not Thompson sampling: the reward is not stationary. The target trains between
pulls, so an arm's payoff drifts (and depends on the arms pulled before); Exp3 is the adversarial
bandit, with regret guarantees against the best fixed arm whatever the payoff sequence, while
Thompson sampling's posterior assumes fixed payoff distributions and grows overconfident on an
arm that was good early.

Adapted: one Exp3 per column (step size, iterations, epsilon, then any further column), each with
its column's values as arms, all updated with the same batch reward (a factored, "semi-bandit"
Exp3, as the strategy network factorises its heads per column): a joint Exp3 over all cells (240
on digits, 650 on CIFAR-10) would not pull each arm once in a short run's reward steps. Exp3 wants
rewards in [0, 1]: each reward is rescaled by the smallest and largest batch rewards seen so far
(kept on the device: no synchronisation). ``gamma=None`` takes Auer et al.'s Corollary 3.2 choice
``min(1, sqrt(K ln K / ((e - 1) T)))`` per column, with ``T`` the run's reward steps.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from agents.base import AgentSpec
from las_env.checkpoint import restore_generator


class Exp3Agent:
    """Exp3 per grid column on the batch reward (see the module docstring).

    Args:
        spec: the game; needs ``spec.reward_interval`` (agent=bandit's config sets ``k``).
        gamma: Exp3's exploration rate in (0, 1], one for all columns; ``None``: Auer et al.'s choice
            per column.
        seed: seed of the agent's own generator on ``spec.device``; ``None`` takes ``spec.seed``.

    Attributes:
        log_weights: each column's arms' log-weights ``(arms,)``, by column name.
        gammas: each column's exploration rate.
    """

    def __init__(self, spec: AgentSpec, *, gamma: float | None = None, seed: int | None = None) -> None:
        if spec.reward_interval is None:
            raise ValueError("Exp3Agent learns from the batch reward, so the env must pay it: give the agent k "
                             "(agent.k=5: every 5th step carries the reward).")
        if gamma is not None and not 0 < gamma <= 1:
            raise ValueError(f"gamma={gamma!r} must lie in (0, 1] (None: Auer et al.'s choice).")
        self.spec = spec
        self.device = torch.device(spec.device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(spec.seed if seed is None else seed))
        pulls = max(1, spec.total_steps // spec.reward_interval)
        self.columns = spec.grid.columns
        self.gammas = {name: float(gamma) if gamma is not None else exp3_gamma(n, pulls)
                       for name, n in zip(self.columns, spec.grid.nvec)}
        self.log_weights = {name: torch.zeros(n, device=self.device) for name, n in zip(self.columns, spec.grid.nvec)}
        self.low = torch.full((), math.inf, device=self.device)  # the smallest batch reward seen
        self.high = torch.full((), -math.inf, device=self.device)
        self.arms = torch.zeros(len(self.columns), dtype=torch.long, device=self.device)  # the last pull
        self._probs = torch.zeros(len(self.columns), device=self.device)  # each pulled arm's probability

    def probabilities(self, name: str) -> Tensor:
        """Exp3's distribution over column ``name``'s arms: ``(1 - gamma) softmax(w) + gamma / K``."""
        w, g = self.log_weights[name], self.gammas[name]
        return (1 - g) * torch.softmax(w, 0) + g / w.shape[0]

    def act(self, observation: Tensor, info: dict[str, Any]) -> Tensor:
        """One arm per column, drawn from Exp3's distributions, for every image ``(B, columns)``."""
        for j, name in enumerate(self.columns):
            p = self.probabilities(name)
            arm = torch.multinomial(p, 1, generator=self.generator)[0]
            self.arms[j] = arm
            self._probs[j] = p[arm]
        return self.arms.expand(observation.shape[0], -1)

    def learn(self, reward: Tensor, info: dict[str, Any]) -> dict[str, Any]:
        """On a reward step: rescale the batch reward to [0, 1] and credit each column's pulled arm
        with its importance-weighted reward."""
        if not info["reward_computed"]:
            return {}
        r = torch.as_tensor(reward, device=self.device).float()
        self.low = torch.minimum(self.low, r)
        self.high = torch.maximum(self.high, r)
        span = self.high - self.low
        x = torch.where(span > 0, (r - self.low) / span.clamp(min=1e-12), torch.full_like(r, 0.5))
        for j, name in enumerate(self.columns):
            w = self.log_weights[name]
            estimate = x / self._probs[j]  # unbiased for the pulled arm, 0 for the others
            w[self.arms[j]] += self.gammas[name] * estimate / w.shape[0]
            w -= w.max()  # keeps exp() finite; the softmax is unchanged
        return {"scaled_reward": x}

    def state_dict(self) -> dict[str, Any]:
        return {"log_weights": {n: w.clone() for n, w in self.log_weights.items()}, "low": self.low.clone(),
                "high": self.high.clone(), "arms": self.arms.clone(), "probs": self._probs.clone(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["log_weights"]) != set(self.columns):
            raise ValueError(f"the checkpoint's bandit has the columns {sorted(state['log_weights'])}, this grid "
                             f"{list(self.columns)}.")
        self.log_weights = {n: state["log_weights"][n].to(self.device).clone() for n in self.columns}
        self.low, self.high = state["low"].to(self.device).clone(), state["high"].to(self.device).clone()
        self.arms, self._probs = state["arms"].to(self.device).clone(), state["probs"].to(self.device).clone()
        restore_generator(self.generator, state["generator"])


def exp3_gamma(arms: int, pulls: int) -> float:
    """Auer et al.'s (2002, Corollary 3.2) exploration rate for ``arms`` arms and ``pulls`` pulls."""
    if arms < 2:
        return 1.0
    return min(1.0, math.sqrt(arms * math.log(arms) / ((math.e - 1) * pulls)))
