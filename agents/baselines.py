"""Strategies that do not learn: a fixed attack (PGD-AT) and uniform random choices.

Neither agent ever learns, so neither wants the env to pay for the L2/L3 probe: their configs
have no ``k``, and their env has ``reward_interval=None`` (no reward step; every step costs only
the attack and the training step, L1 comes for free).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from agents.base import AgentSpec
from las_env.checkpoint import restore_generator
from las_env.datasets.registry import lookup


class FixedAgent:
    """The same attack for every image on every step: PGD adversarial training (PGD-AT).

    Args:
        spec: the game.
        step_size, iterations, epsilon: the attack (pixel units). ``None`` takes the data
            set's PGD-AT attack (the run's threat model, ``spec.threat``, with its record's iterations: the threat model's
            epsilon and step, 8/255 and 2/255 on CIFAR, 0.2 and 0.05 on digits, with 10
            iterations on CIFAR, 5 on digits).
        extra: the value of each extra grid column (e.g. ``{"trades_beta": 6.0}``); required
            for every extra column the grid has, since no default exists for them.

    Raises:
        ValueError: an explicitly given value is not on the grid. Actions are grid indices,
            so an off-grid value cannot be played; the message lists the grid's values.

    A DEFAULT value that is not on the grid (e.g. a custom grid without the threat
    model's step size) is replaced by the nearest grid value with a warning that names
    the value actually used, so a default run still works but never misreports its attack.

    Attributes:
        step_size, iterations, epsilon: the physical attack actually played.
        action_indices: its grid indices (step size, iterations, epsilon, then the extra columns).
        extra: the extra columns' values actually played, by name.
    """

    def __init__(
        self,
        spec: AgentSpec,
        *,
        step_size: float | None = None,
        iterations: int | None = None,
        epsilon: float | None = None,
        extra: dict[str, float] | None = None,
    ) -> None:
        self.spec = spec
        self.device = torch.device(spec.device)
        grid = spec.grid
        record = lookup(spec.dataset)
        threat = spec.threat or record.threat  # the run's (data.threat.*), else the data set's
        default_step, default_iterations, default_epsilon = threat.step_size, record.fixed_iterations, threat.epsilon
        requested = {
            "step_size": (step_size, default_step),
            "iterations": (iterations, default_iterations),
            "epsilon": (epsilon, default_epsilon),
        }
        extra = dict(extra or {})
        unknown = sorted(set(extra) - set(grid.extra_columns))
        missing = [name for name in grid.extra_columns if name not in extra]
        if unknown or missing:
            raise ValueError(
                f"FixedAgent: the grid's extra columns are {list(grid.extra_columns)}, but extra= gives "
                f"{sorted(extra)}: give one value per extra column, e.g. +agent.extra.trades_beta=6.0 on the "
                f"command line (values: {dict(grid.extra)})."
            )
        requested.update({name: (value, None) for name, value in extra.items()})
        values = grid.values
        indices: list[int] = []
        for name in grid.columns:
            given, default = requested[name]
            want = float(given if given is not None else default)
            grid_values = values[name]
            i = min(range(len(grid_values)), key=lambda j: abs(grid_values[j] - want))
            on_grid = math.isclose(grid_values[i], want, rel_tol=1e-6, abs_tol=1e-9)
            if not on_grid:
                listed = ", ".join(f"{v:.6g}" for v in grid_values)
                if given is not None:
                    raise ValueError(
                        f"FixedAgent: {name}={want:.6g} is not on the {spec.dataset} strategy grid "
                        f"({name} values: {listed}). Actions index the grid, so pick one of these "
                        f"or give the env a grid that contains {want:.6g}."
                    )
                warnings.warn(
                    f"FixedAgent: the default {name} of {spec.dataset} ({want:.6g}) is not on the "
                    f"strategy grid ({listed}); playing the nearest value {grid_values[i]:.6g} "
                    f"instead. Pass {name}= explicitly (a grid value) to silence this.",
                    stacklevel=2,
                )
            indices.append(i)
        self.action_indices: tuple[int, ...] = tuple(indices)
        played = grid.decode(indices)
        self.step_size = float(played["step_size"])
        self.iterations = int(played["iterations"])
        self.epsilon = float(played["epsilon"])
        self.extra = {name: played[name] for name in grid.extra_columns}
        # Allocated once; every act returns this same tensor (callers must not modify it).
        batch = spec.observation_shape[0]
        self._action = torch.tensor(indices, dtype=torch.long, device=self.device).repeat(batch, 1)

    def act(self, observation: Tensor, info: dict[str, Any]) -> Tensor:
        """The constant ``(B, columns)`` action (a read-only view when B differs from the spec's)."""
        b = observation.shape[0]
        if b == self._action.shape[0]:
            return self._action
        return self._action[:1].expand(b, self._action.shape[1])

    def learn(self, reward: Tensor, info: dict[str, Any]) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"action_indices": list(self.action_indices)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The attack is a constructor setting: a checkpoint only records which one it was.
        if tuple(state.get("action_indices", self.action_indices)) != self.action_indices:
            warnings.warn(
                f"FixedAgent: checkpoint played grid indices {state['action_indices']}, this agent "
                f"plays {list(self.action_indices)}; keeping this agent's.",
                stacklevel=2,
            )


class RandomAgent:
    """Every image gets an independent, uniformly random grid value per parameter.

    Args:
        spec: the game.
        seed: seed of the agent's own ``torch.Generator`` on ``spec.device``; ``None`` takes
            ``spec.seed``.

    Attributes:
        generator: the sampling RNG (its state is the agent's whole state).
    """

    def __init__(self, spec: AgentSpec, *, seed: int | None = None) -> None:
        self.spec = spec
        self.device = torch.device(spec.device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(spec.seed if seed is None else seed))
        self._nvec = torch.tensor(spec.grid.nvec, dtype=torch.float32, device=self.device)
        self._last = torch.tensor(spec.grid.nvec, dtype=torch.long, device=self.device) - 1

    def act(self, observation: Tensor, info: dict[str, Any]) -> Tensor:
        """Uniform ``(B, columns)`` long indices: ``floor(u * n)`` with ``u ~ U[0, 1)`` per entry."""
        u = torch.rand((observation.shape[0], self._nvec.shape[0]), generator=self.generator, device=self.device)
        # u < 1, so floor(u * n) <= n - 1 already; the clamp guards float rounding anyway.
        return torch.minimum((u * self._nvec).long(), self._last)

    def learn(self, reward: Tensor, info: dict[str, Any]) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_generator(self.generator, state["generator"])
