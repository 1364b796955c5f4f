"""Setting up the game of a run: the env with its final settings, then the agent built from it."""

from __future__ import annotations

from agents.base import Agent, AgentSpec
from experiments.training import distributed
from experiments.config.errors import ConfigError
from experiments.config.settings import RunSettings
from las_env.data import ImageData
from las_env.env import LASEnv
from las_env.global_view import global_view
from las_env.validate import SettingError


def build_game(settings: RunSettings, data: ImageData) -> tuple[LASEnv, Agent, AgentSpec]:
    """The env from the final ``settings.env``, then the agent from ``AgentSpec.from_game(env)``.

    Raises:
        ConfigError: the game or the agent refuses its settings, or the agent is not an :class:`Agent`.
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
    env = global_view(env)  # under torchrun: the global batch (las_env/global_view.py)
    spec = AgentSpec.from_game(env, seed=settings.seed)
    try:
        agent = settings.agent(spec)
    except SettingError as exc:
        raise ConfigError(exc.describe("agent.")) from None
    except (ValueError, TypeError) as exc:
        target = getattr(settings.agent, "target", settings.agent_name)
        raise ConfigError(f"The agent {target} rejected its settings: {exc}") from None
    if not isinstance(agent, Agent):
        raise ConfigError(
            f"{type(agent).__name__} is not an agent: it needs act, learn, state_dict and load_state_dict "
            f"(agents/base.py)."
        )
    distributed.check_agent(agent, env.game.shard)
    if not cfg.step_reward:  # the authors' reward flow: the agent scores its actions itself
        agent.bind_scorer(env.score)
    return env, agent, spec

