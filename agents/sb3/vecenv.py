"""LASEnv as SB3 sees it, one sub-environment per image (see ``agents.sb3``): ``LASVecEnv`` (SB3 drives),
``SingleImageEnv`` (a one-image Gymnasium view) and the never-stepped spec ``VecEnv`` ``SB3Agent`` builds on."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.env_util import is_wrapped
from stable_baselines3.common.vec_env import VecEnv
from torch import Tensor

from agents.sb3.extractor import per_image_spaces
from las_env.reward import REWARD_TERMS


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def _indices(indices, n: int) -> list[int]:
    if indices is None:
        return list(range(n))
    if isinstance(indices, int):
        return [indices]
    return list(indices)


# ------------------------------------------------------------------- SB3 drives
class LASVecEnv(VecEnv):
    """A LASEnv seen by SB3 as ``B`` one-step-episode sub-environments (one per image).

    ``PPO(policy, LASVecEnv(LASEnv(...))).learn(n)`` trains the strategy with SB3 in
    charge of the loop. ``step`` sends the stacked ``(B, 3)`` actions to LASEnv and returns,
    for sub-environment ``i``: reward ``info["rewards"][i]`` (image i's own reward), done
    True, ``infos[i]["terminal_observation"]`` = image i as played, and as the next
    observation image i of the next batch. When LASEnv's episode (the target's whole
    training budget) ends, it is reset (a fresh target; ``infos[i]["game_over"]`` is True
    on that step).

    Args:
        env: a LASEnv (or a Gymnasium wrapper of one), NumPy or tensor API, built with
            ``reward_interval=1``.

    Raises:
        ValueError: the env's ``reward_interval`` is not 1. On the other steps LASEnv
            reports reward 0 (not computed) and SB3, which learns from every transition it
            is given, would take those zeros for rewards. Use ``reward_interval=1`` here, or
            :class:`SB3Agent` in our training loop, which learns from reward steps only.

    ``seed(s)`` takes effect at the next ``reset()`` as SB3 expects; the one game underneath
    is reset with ``s`` (SB3 nominally gives sub-env ``i`` the seed ``s + i``, but all
    sub-environments are views of the same game).
    """

    def __init__(self, env: gym.Env) -> None:
        las = env.unwrapped
        k = las.config.reward_interval
        if k != 1:
            raise ValueError(
                f"LASVecEnv needs an env that computes the reward on every step (reward_interval=1), "
                f"got reward_interval={k}: SB3 learns from every transition, and on the other steps "
                "LASEnv reports a reward of 0 that was never computed. Build LASEnv(reward_interval=1), "
                "or let our training loop drive SB3 through agents.sb3.SB3Agent (agent=ppo agent.k=K), "
                "which learns only from the steps that carry the real reward."
            )
        self.env = env
        self.las = las
        b = las.config.batch_size
        obs_space, act_space = per_image_spaces(las.observation_space.shape, las.space.nvec)
        super().__init__(b, obs_space, act_space)
        self._obs: np.ndarray | None = None
        self._actions: np.ndarray | None = None
        self.games = 0  # completed LASEnv episodes (training budgets)

    def reset(self) -> np.ndarray:
        obs, info = self.env.reset(seed=self._seeds[0], options=self._options[0] or None)
        self._reset_seeds()
        self._reset_options()
        self._obs = _np(obs).astype(np.float32, copy=False)
        labels = _np(info["labels"])
        self.reset_infos = [{"label": int(labels[i])} for i in range(self.num_envs)]
        return self._obs.copy()

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions).reshape(self.num_envs, -1)

    def step_wait(self):
        if self._obs is None:
            raise RuntimeError("Call reset() before step().")
        played = self._obs
        obs, _, terminated, truncated, info = self.env.step(self._actions)
        rewards = _np(info["rewards"]).astype(np.float32)
        terms = {name: _np(info[name]) for name in REWARD_TERMS}
        game_over = bool(terminated or truncated)
        infos = [
            {"terminal_observation": played[i], **{name: float(v[i]) for name, v in terms.items()}, "game_over": game_over}
            for i in range(self.num_envs)
        ]
        if game_over:
            obs, _ = self.env.reset()  # a fresh target; the seed comes from the env's own RNG
            self.games += 1
        self._obs = _np(obs).astype(np.float32, copy=False)
        return self._obs.copy(), rewards, np.ones(self.num_envs, dtype=bool), infos

    def close(self) -> None:
        self.env.close()

    # All sub-environments are views of ONE env: attribute access goes to it once.
    def get_attr(self, attr_name: str, indices=None) -> list[Any]:
        value = getattr(self.env, attr_name)
        return [value for _ in _indices(indices, self.num_envs)]

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        setattr(self.env, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices=None, **method_kwargs) -> list[Any]:
        result = getattr(self.env, method_name)(*method_args, **method_kwargs)  # called once
        return [result for _ in _indices(indices, self.num_envs)]

    def env_is_wrapped(self, wrapper_class, indices=None) -> list[bool]:
        wrapped = is_wrapped(self.env, wrapper_class)
        return [wrapped for _ in _indices(indices, self.num_envs)]

    def get_images(self):
        raise NotImplementedError("LASVecEnv does not render.")


class SingleImageEnv(gym.Env):
    """The per-image game as a plain Gymnasium env, for a LASEnv with ``batch_size=1``.

    Observation ``Box(0, 1, (C, H, W), float32)``, action ``MultiDiscrete(nvec)``; every
    step is a one-step episode (``terminated=True``) with the image's reward.
    ``reset(seed=s)`` restarts the game from ``s``; ``reset()`` without a seed moves on to
    the next image of the same game (restarting it only once its budget is spent). It exists
    so that SB3's ``check_env`` can vet the per-image formulation that :class:`LASVecEnv`
    vectorises, and for SB3 users who want a classic single env (``reward_interval=1``,
    for the reason given in :class:`LASVecEnv`).
    """

    metadata = {"render_modes": []}

    def __init__(self, env: gym.Env) -> None:
        las = env.unwrapped
        if las.config.batch_size != 1:
            raise ValueError(
                f"SingleImageEnv needs a LASEnv with batch_size=1 (one image per step), got "
                f"{las.config.batch_size}; for a batch use LASVecEnv (one sub-environment per image)."
            )
        if las.config.reward_interval != 1:
            raise ValueError(
                "SingleImageEnv needs reward_interval=1: on other steps the reward is a 0 that was "
                "never computed (see LASVecEnv)."
            )
        self.env = env
        self.las = las
        self.observation_space, self.action_space = per_image_spaces(las.observation_space.shape, las.space.nvec)
        self._obs: np.ndarray | None = None
        self._info: dict[str, Any] = {}
        self._started = False

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None or not self._started or self.las.game.done:
            game_seed = seed if seed is not None else int(self.np_random.integers(2**31 - 1))
            obs, info = self.env.reset(seed=game_seed)
            self._obs, self._info = _np(obs)[0].astype(np.float32), {"label": int(_np(info["labels"])[0])}
            self._started = True
        return self._obs.copy(), dict(self._info)

    def step(self, action):
        if not self._started:
            raise RuntimeError("Call reset() before step().")
        if self.las.game.done:
            raise RuntimeError("The game's training budget is spent; call reset().")
        a = np.asarray(action).reshape(1, -1)
        obs, _, _, _, info = self.env.step(a)
        reward = float(_np(info["rewards"])[0])
        step_info = {name: float(_np(info[name])[0]) for name in REWARD_TERMS}
        if not self.las.game.done:  # the next image, shown by the next reset()
            self._obs = _np(obs)[0].astype(np.float32)
            self._info = {"label": int(_np(info["labels"])[0])}
        return self._obs.copy(), reward, True, False, step_info


# ------------------------------------------------------------------ loop drives
class _SpecVecEnv(VecEnv):
    """A VecEnv that only tells SB3 the spaces and the number of sub-environments."""

    def __init__(self, num_envs: int, observation_space: spaces.Space, action_space: spaces.Space) -> None:
        super().__init__(num_envs, observation_space, action_space)

    def _no(self, *args, **kwargs):
        raise RuntimeError(
            "SB3Agent's model is driven by our training loop (act/learn), not by SB3's learn(): "
            "this VecEnv only describes the spaces. To let SB3 drive, use LASVecEnv."
        )

    reset = step_async = step_wait = _no

    def close(self) -> None:
        pass

    def get_attr(self, attr_name: str, indices=None) -> list[Any]:
        if attr_name == "render_mode":
            return [None for _ in _indices(indices, self.num_envs)]
        raise AttributeError(attr_name)

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        pass

    def env_method(self, method_name: str, *method_args, indices=None, **method_kwargs) -> list[Any]:
        return self._no()

    def env_is_wrapped(self, wrapper_class, indices=None) -> list[bool]:
        return [False for _ in _indices(indices, self.num_envs)]
