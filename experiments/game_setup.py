"""Setting up the game of a run: the env first, then the agent built from it, then the env told the agent's k."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from agents.base import Agent, AgentSpec, scores_own_actions
from experiments import distributed
from experiments.errors import ConfigError
from experiments.settings import RunSettings
from las_env.data import ImageData
from las_env.env import LASEnv
from las_env.validate import check_interval


def build_game(settings: RunSettings, data: ImageData) -> tuple[LASEnv, Agent, AgentSpec]:
    """The env first, the agent second (from ``AgentSpec.from_game(env)``), then the env is told the
    agent's k, whether it scores its own actions and whether it needs the pre-update probe.

    Raises:
        ConfigError: the game refuses its settings, the agent rejects its settings, or it is not an
            :class:`Agent`.
    """
    cfg = settings.env
    n_train = data.x_train.shape[0]
    if cfg.batch_size > n_train:
        raise ConfigError(f"data.batch_size={cfg.batch_size} exceeds the {n_train} training images of {data.name}.")
    distributed.check_batch(cfg.batch_size)
    try:
        env = LASEnv(config=cfg, data=data, tensor_api=True)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    env = distributed.global_view(env)  # under torchrun: the global batch (experiments/distributed.py)
    spec = AgentSpec.from_game(env, seed=settings.seed)
    try:
        agent = settings.agent(spec)
    except (ValueError, TypeError) as exc:
        target = getattr(settings.agent, "target", settings.agent_name)
        raise ConfigError(f"The agent {target} rejected its settings: {exc}") from None
    if not isinstance(agent, Agent):
        raise ConfigError(
            f"{type(agent).__name__} is not an agent: it needs reward_interval, act, learn, state_dict "
            f"and load_state_dict (agents/base.py)."
        )
    k = agent.reward_interval
    try:
        check_interval(f"{type(agent).__name__}.reward_interval", k)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    scorer = scores_own_actions(agent)  # the authors' reward flow: the agent calls env.score itself
    probe = True if getattr(agent, "needs_pre_update_probe", False) else None  # e.g. credit=unbiased
    try:
        env.configure_agent(reward_interval=k, step_reward=not scorer, pre_update_probe=probe)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    distributed.check_agent(agent, env.game.shard)
    if scorer:
        agent.bind_scorer(env.score)
    return env, agent, spec


def current_observation(env: LASEnv) -> tuple[Tensor, dict[str, Any]]:
    """The observation and info of the env's current batch (after ``load_state_dict``)."""
    return env.observe()
