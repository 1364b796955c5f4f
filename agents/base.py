"""The one interface the training loop drives: every strategy player implements it.

The loop (``experiments/training/loop.py``) runs, for the whole budget::

    obs, info = env.reset(seed=seed)                  # LASEnv(tensor_api=True)
    while not done:
        action = agent.act(obs, info)                 # (B, columns) long tensor of grid indices
        obs, reward, done, _, info = env.step(action)
        metrics = agent.learn(reward, info)           # learn when info["reward_computed"]

``info`` is LASEnv's (torch tensors on the training device): before a step it says
whether that step will carry the full reward (``reward_next_step``); after it, it holds
the per-image rewards (``rewards``), the terms ``l1``/``l2``/``l3`` and whether they were
computed (``reward_computed``).

The env is built with its final settings and never changed. What it needs from the agent is
read from the agent's settings before either exists (``experiments/config/settings.py``): ``agent.k``
becomes the env's ``reward_interval`` (absent: no reward step, as for fixed and random),
``agent.credit=unbiased`` switches on ``reward.pre_update_probe``, and
``agent.reward_flow=score_then_resample`` sets ``step_reward=False`` (the agent scores its own
actions with ``env.score``). The agent is then built by Hydra from its config's ``_target_`` with
the other keys plus ``spec=AgentSpec.from_game(env)``, so a user's class outside this package
works from the command line: ``agent._target_=my_module.MyAgent``.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from las_env.datasets.registry import ThreatModel
from las_env.strategy_space import StrategySpace


@dataclass(frozen=True)
class AgentSpec:
    """What an agent is told about the game it plays.

    Attributes:
        grid: the strategy space (:class:`las_env.strategy_space.StrategySpace`): an action row
            is one index per column of ``grid.columns`` (step size, iterations, epsilon, then
            any further column); ``grid.lookup(device)`` turns index actions into values.
        observation_shape: (B, C, H, W) of each observation.
        num_classes: classes of the target's task (the strategy does not see labels).
        dataset: data set name ("digits", "cifar10", ...).
        device: where observations live and actions must be put.
        total_steps, steps_per_epoch: the episode's length.
        seed: the run's seed, for the agent's own initialisation.
        reward_interval: k, the env's: every k-th step carries the full reward (an agent that
            learns from it updates every k steps); ``None``: no step does.
        threat: the run's threat model (PGD-AT's default attack); ``None``: the data set's.
        train_images: how many images the training set has (``info["next_indices"]`` and
            ``info["indices"]`` lie in ``0 .. train_images - 1``); ``None``: not known.
    """

    grid: StrategySpace
    observation_shape: tuple[int, int, int, int]
    num_classes: int
    dataset: str
    device: torch.device
    total_steps: int
    steps_per_epoch: int
    seed: int = 0
    reward_interval: int | None = 1
    threat: ThreatModel | None = None
    train_images: int | None = None

    @classmethod
    def from_game(cls, env_or_game: Any, *, seed: int = 0) -> AgentSpec:
        """The spec of a built ``LASEnv`` (or its ``LASGame``, or ``las_env.global_view.GlobalView``): its
        space, the GLOBAL batch's observation shape, classes, data set, device, episode length and
        training-set size."""
        game = getattr(env_or_game, "game", env_or_game)
        data, cfg = game.data, game.config
        return cls(
            grid=game.space,
            observation_shape=(cfg.batch_size, data.channels, data.height, data.width),
            num_classes=data.num_classes,
            dataset=cfg.dataset,
            device=game.device,
            total_steps=game.total_steps,
            steps_per_epoch=game.steps_per_epoch,
            seed=seed,
            reward_interval=cfg.reward_interval,
            threat=cfg.threat,
            train_images=data.x_train.shape[0],
        )


@runtime_checkable
class Agent(Protocol):
    """A player of the attack-strategy side of LAS-AT (its k is ``spec.reward_interval``)."""

    def act(self, observation: Tensor, info: dict[str, Any]) -> Tensor:
        """The (B, columns) long tensor of grid indices for this batch, on ``observation.device``."""
        ...

    def learn(self, reward: Tensor, info: dict[str, Any]) -> dict[str, Any]:
        """Called after every step with its reward and info. Returns metrics to log
        (tensors are fine: the loop aggregates them on the device and logs coarsely)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the agent exactly (networks, optimisers, RNG)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


Scorer = Callable[[Tensor], tuple[Tensor, dict[str, Any]]]
"""``LASEnv.score``: actions -> ``(reward, info)`` of those actions on the current batch,
measured on a look-ahead copy of the target, without training the target on them. An agent with
``reward_flow="score_then_resample"`` (the authors') gets it through ``bind_scorer(env.score)``,
and its env is built with ``step_reward=False``."""
