"""Stable-Baselines3 bridge: train the attack strategy with PPO, A2C, or any SB3 on-policy
algorithm that accepts ``MultiDiscrete`` actions.

The problem
-----------
LASEnv's observation is a whole batch ``(B, C, H, W)`` and its action a 2-D ``MultiDiscrete``
``(B, 3)``. SB3 takes neither a 2-D ``MultiDiscrete`` nor a Gymnasium vector env, and its
default ``NatureCNN`` needs images of at least 36x36 (digits are 8x8, CIFAR 32x32).

The design: each image is one sub-environment, each choice a one-step episode
---------------------------------------------------------------------------
The strategy game is a contextual bandit: the strategy sees an image (the context), picks
a (step size, iterations, epsilon) triple for it, and is paid once; its choice does not
change which image comes next. So the batch maps onto an SB3 ``VecEnv`` with
``num_envs = B``: sub-environment ``i`` sees image ``i`` (``Box(0, 1, (C, H, W), float32)``)
and plays a 1-D ``MultiDiscrete(nvec)`` action; every step ends every sub-episode
(``dones`` all True, ``terminal_observation`` = the image just played), and the next
observations are the next batch. With all ``dones`` True, SB3's GAE collapses to the
bandit's advantage ``A_i = r_i - V(x_i)`` (gamma and gae_lambda play no part): the value
head is a learned per-image baseline.

Two ways to drive it:

- :class:`LASVecEnv` (SB3 drives): ``PPO(policy, LASVecEnv(env)).learn(n)`` works as is.
  The env MUST compute the reward on every step (``reward_interval=1``): SB3 stores every
  transition it sees, and on a non-reward step LASEnv pays 0, which SB3 would learn from
  as if it were a real reward. Rather than silently feeding it zeros, the constructor
  raises a ValueError for ``reward_interval != 1``.
- :class:`SB3Agent` (our training loop drives; ``python experiments/run.py agent=ppo``):
  implements :class:`agents.base.Agent`. The SB3 algorithm is built against a spec-only
  ``VecEnv`` that is never stepped; ``act`` samples actions from SB3's policy on every step,
  and ``learn`` adds a rollout-buffer step ONLY on steps that carry the real reward
  (``info["reward_computed"]``); when the buffer holds ``n_steps`` such steps, SB3's own
  ``train()`` runs (PPO's clipped objective, A2C's update, ...). So with
  ``reward_interval=k`` the policy acts on every step but learns from every k-th one, and
  never from a zero that is not a reward.

The features extractor (:class:`SmallImageExtractor`): three 3x3 convolutions (the 2nd and
3rd strided once the image is big enough), adaptive average pooling to 4x4, then a linear
layer; it fits 8x8 (1 channel), 32x32 (3 channels) and larger images alike. Our
observations are float32 in ``[0, 1]``; SB3's ``preprocess_obs`` divides by 255 only for
spaces ``is_image_space`` accepts (uint8 in ``[0, 255]``), which ours is not, so nothing is
rescaled. The policy is built with ``normalize_images=False`` anyway, so that stays true
whatever SB3's heuristic becomes.

The reward interval's cost
--------------------------
On a reward step the env pays, on top of the attack and the training step, the L2 probe
(PGD-10 on the updated target) and a clean forward pass (L3). Measured on digits
(small_cnn target, batch 64, actions uniform on the digits grid; per k, a fresh LASEnv,
one warm-up step, then 20 timed steps; the k's interleaved, median over 5 and over 7
repeats in two sessions; CPU time of the process with one torch thread, so that the other
jobs on the shared 2-core machine distort it little; wall-clock ratios agreed)::

    per-step cost relative to no reward at all (0.057-0.063 s CPU per step)
    k = 1  (reward every step)     2.87x - 3.01x
    k = 10                         1.18x - 1.25x
    k = 20                         1.07x - 1.11x

So paying the reward on every step costs about +190% per step on digits (the probe's 10
PGD iterations outweigh the 4.5 the strategy chooses on average), and with interval k about
1.9/k of a step (k=5, the demo configs: about +40%). The trade-off with SB3: ``n_steps``
reward steps fill one rollout, so an update comes every ``n_steps * k`` env steps on
``n_steps * B`` samples; a larger k is cheaper per step but gives SB3 k times fewer samples
over the same training budget. On CIFAR the probe's 10 iterations are likewise comparable
to the chosen attack's 3..14, so the relative cost of k = 1 is of the same order.

SB3's logs: after every ``train()``, ``learn`` returns SB3's logger values
(``train/policy_gradient_loss``, ``train/value_loss``, ``train/entropy_loss``,
``train/approx_kl``, ``train/learning_rate``, ...) prefixed ``sb3/``; the training loop
logs agent metrics under ``agent/``, so they reach ``metrics.json`` and W&B as
``agent/sb3/train/value_loss`` and so on. ``log_dir`` also writes them as SB3's CSV and
text logs.

Device: the policy lives on the training device and samples there; only a reward step
copies its batch, actions and rewards to the host (SB3's rollout buffer is NumPy), so the
other steps never synchronise.

Reproducibility: the policy is initialised from ``seed`` without touching the global RNG;
actions are sampled with the agent's own ``torch.Generator`` on the training device, and
SB3's minibatch shuffling (which uses NumPy's global RNG) runs under the agent's own saved
NumPy state. ``state_dict`` holds the policy, its optimiser, the partly filled rollout
buffer, the counters and both RNG states, so a resumed run continues exactly.
"""

from __future__ import annotations

import copy
import importlib
import warnings
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.distributions import CategoricalDistribution, MultiCategoricalDistribution
from stable_baselines3.common.env_util import is_wrapped
from stable_baselines3.common.logger import Logger, configure, make_output_format
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env import VecEnv
from torch import Tensor, nn

from agents.base import AgentSpec
from las_env.checkpoint import restore_generator

ALGOS = {"ppo": "stable_baselines3:PPO", "a2c": "stable_baselines3:A2C"}


# --------------------------------------------------------------------------- features
class SmallImageExtractor(BaseFeaturesExtractor):
    """A CNN features extractor for small images in ``[0, 1]`` (8x8 digits, 32x32 CIFAR, ...).

    ``conv3x3(C -> c1) -> conv3x3(c1 -> c2, stride 2 if H >= 8) -> conv3x3(c2 -> c2,
    stride 2 if H >= 32) -> AdaptiveAvgPool(pool) -> Linear(c2*pool*pool -> features_dim)``,
    ReLU after each. 8x8 -> 8 -> 4 -> 4; 32x32 -> 32 -> 16 -> 8 -> pooled 4; 64x64 ->
    pooled 4. Inputs are used as they come (no /255): build the policy with
    ``normalize_images=False``.

    Args:
        observation_space: ``Box`` of shape ``(C, H, W)``.
        features_dim: size of the output features.
        channels: ``(c1, c2)``, the convolutions' widths.
        pool: side of the pooled map.
    """

    def __init__(
        self,
        observation_space: spaces.Box,
        features_dim: int = 128,
        channels: tuple[int, int] = (32, 64),
        pool: int = 4,
    ) -> None:
        if not isinstance(observation_space, spaces.Box) or len(observation_space.shape) != 3:
            raise ValueError(
                f"SmallImageExtractor needs a Box observation space of shape (C, H, W), got {observation_space}."
            )
        super().__init__(observation_space, features_dim)
        c, h, w = observation_space.shape
        c1, c2 = (int(v) for v in channels)
        side = min(h, w)
        self.cnn = nn.Sequential(
            nn.Conv2d(c, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, stride=2 if side >= 8 else 1, padding=1),
            nn.ReLU(),
            nn.Conv2d(c2, c2, 3, stride=2 if side >= 32 else 1, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(pool),
            nn.Flatten(),
        )
        self.linear = nn.Sequential(nn.Linear(c2 * pool * pool, features_dim), nn.ReLU())

    def forward(self, observations: Tensor) -> Tensor:
        return self.linear(self.cnn(observations))


def default_policy_kwargs(features_dim: int = 128) -> dict[str, Any]:
    """The policy settings both drivers use unless told otherwise."""
    return {
        "features_extractor_class": SmallImageExtractor,
        "features_extractor_kwargs": {"features_dim": int(features_dim)},
        "normalize_images": False,  # observations are already in [0, 1]
        "net_arch": {"pi": [64], "vf": [64]},
    }


def per_image_spaces(observation_shape, nvec) -> tuple[spaces.Box, spaces.MultiDiscrete]:
    """The observation and action space of ONE image (one SB3 sub-environment)."""
    c, h, w = (int(v) for v in observation_shape[-3:])
    obs = spaces.Box(0.0, 1.0, shape=(c, h, w), dtype=np.float32)
    act = spaces.MultiDiscrete(np.asarray(nvec, dtype=np.int64))
    return obs, act


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
                "or let our training loop drive SB3 through agents.sb3.SB3Agent(reward_interval=k), "
                "which learns only from the steps that carry the real reward."
            )
        self.env = env
        self.las = las
        b = las.config.batch_size
        obs_space, act_space = per_image_spaces(las.observation_space.shape, las.grid.nvec)
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
        l1, l2, l3 = (_np(info[key]) for key in ("l1", "l2", "l3"))
        game_over = bool(terminated or truncated)
        infos = [
            {
                "terminal_observation": played[i],
                "l1": float(l1[i]),
                "l2": float(l2[i]),
                "l3": float(l3[i]),
                "game_over": game_over,
            }
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
        self.observation_space, self.action_space = per_image_spaces(las.observation_space.shape, las.grid.nvec)
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
        step_info = {k: float(_np(info[k])[0]) for k in ("l1", "l2", "l3")}
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


def _import(path: str) -> Any:
    """``"pkg.module:Name"`` or ``"pkg.module.Name"`` -> the object."""
    if ":" in path:
        module, name = path.split(":", 1)
    else:
        module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"{path!r} is not an import path ('package.module:Class').")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def resolve_algo(algo: str | type) -> type[OnPolicyAlgorithm]:
    """``"ppo"``, ``"a2c"``, ``"module:Class"`` (or a class) -> an SB3 on-policy algorithm class."""
    if isinstance(algo, str):
        path = ALGOS.get(algo.lower(), algo)
        if path is algo and ":" not in algo and "." not in algo:
            raise ValueError(
                f"Unknown SB3 algorithm {algo!r}: use one of {sorted(ALGOS)} or an import path "
                "'module:Class' of an on-policy algorithm (e.g. 'sb3_contrib:TRPO')."
            )
        cls = _import(path)
    else:
        cls = algo
    if not (isinstance(cls, type) and issubclass(cls, OnPolicyAlgorithm)):
        raise ValueError(
            f"{algo!r} is not a Stable-Baselines3 on-policy algorithm (OnPolicyAlgorithm subclass). "
            "SB3Agent drives rollout-buffer algorithms such as PPO and A2C; off-policy ones (DQN, SAC) "
            "do not take MultiDiscrete actions."
        )
    return cls


def _plain(value: Any) -> Any:
    """OmegaConf containers (Hydra passes them for nested keys) -> plain dicts and lists."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra, a dependency
        pass
    return value


_CLASS_KEYS = ("features_extractor_class", "activation_fn", "optimizer_class")


def _policy_kwargs(features_dim: int, user: dict | None) -> dict[str, Any]:
    pk = default_policy_kwargs(features_dim)
    for key, value in (_plain(user) or {}).items():
        if key in _CLASS_KEYS and isinstance(value, str):
            value = _import(value)  # configs name classes by import path
        pk[key] = value
    return pk


@dataclass
class _Pending:
    """What ``act`` keeps on a reward step, for ``learn``'s rollout-buffer entry."""

    obs: Tensor  # (B, C, H, W) float32, on the policy's device
    actions: Tensor  # (B, 3) long
    values: Tensor  # (B, 1)
    log_probs: Tensor  # (B,)


class SB3Agent:
    """The strategy player, trained by a Stable-Baselines3 on-policy algorithm.

    Our loop drives (see the module docstring): ``act`` samples from SB3's policy on every
    step; ``learn`` adds one rollout-buffer step (B transitions, one per image) on each step
    that carries the real reward and runs SB3's ``train()`` when ``n_steps`` of them are in.

    Args:
        spec: the game.
        algo: ``"ppo"``, ``"a2c"`` or ``"module:Class"`` of an SB3 on-policy algorithm.
        reward_interval: k; the env computes the full reward on every k-th step and SB3
            learns from those steps only (the agent acts on every step).
        policy: SB3 policy name or class (``"CnnPolicy"``: an actor-critic policy; its
            features extractor is replaced by :class:`SmallImageExtractor` unless
            ``policy_kwargs`` says otherwise).
        policy_kwargs: overrides of :func:`default_policy_kwargs` (``net_arch``,
            ``features_extractor_class`` as a class or import path, ...).
        features_dim: output size of the features extractor.
        seed: seed of the policy's initialisation, the sampling generator and SB3's
            minibatch shuffling; ``None`` takes ``spec.seed``.
        verbose: SB3's verbosity; ``>= 1`` also prints SB3's log table after every update.
        log_dir: if given, SB3's logger also writes ``progress.csv`` and ``log.txt`` there.
        name: the config's display name (ignored here; accepted so that a config's
            ``name:`` key may be passed through).
        **algo_kwargs: the algorithm's own arguments: ``n_steps`` (reward steps per
            update), ``learning_rate``, ``ent_coef``, ``batch_size``, ``n_epochs``, ...

    Attributes:
        model: the SB3 algorithm (``model.policy`` is the network, ``model.rollout_buffer``
            the buffer).
        reward_interval: k.
        updates: number of SB3 ``train()`` calls.
        buffer_additions: number of rollout-buffer steps added (one per reward step).
        generator: the sampling RNG, on ``spec.device``.
    """

    def __init__(
        self,
        spec: AgentSpec,
        *,
        algo: str = "ppo",
        reward_interval: int = 1,
        policy: str | type = "CnnPolicy",
        policy_kwargs: dict | None = None,
        features_dim: int = 128,
        seed: int | None = None,
        verbose: int = 0,
        log_dir: str | None = None,
        name: str | None = None,
        **algo_kwargs: Any,
    ) -> None:
        if int(reward_interval) != reward_interval or reward_interval < 1:
            raise ValueError(f"reward_interval must be a whole number >= 1, got {reward_interval}.")
        self.spec = spec
        self.name = name
        self.device = torch.device(spec.device)
        self.reward_interval = int(reward_interval)
        self.seed = int(spec.seed if seed is None else seed)
        self.algo_class = resolve_algo(algo)
        b = int(spec.observation_shape[0])
        self.num_envs = b
        obs_space, act_space = per_image_spaces(spec.observation_shape, spec.grid.nvec)
        kwargs = {k: _plain(v) for k, v in algo_kwargs.items()}

        # seed=None to SB3: it would otherwise reseed the global Python/NumPy/torch RNGs.
        # The policy's initialisation comes from our seed with the global RNG left as it was.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            self.model: OnPolicyAlgorithm = self.algo_class(
                policy,
                _SpecVecEnv(b, obs_space, act_space),
                policy_kwargs=_policy_kwargs(features_dim, policy_kwargs),
                device=self.device,
                verbose=verbose,
                seed=None,
                **kwargs,
            )
        self.model.set_logger(self._make_logger(verbose, log_dir))
        self.model.num_timesteps = 0
        self.model._current_progress_remaining = 1.0
        self.buffer = self.model.rollout_buffer
        self.n_steps = int(self.model.n_steps)

        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.seed)
        self._np_state = np.random.RandomState(self.seed).get_state()
        self.updates = 0
        self.buffer_additions = 0
        self._pending: _Pending | None = None
        self._warned_unmatched = False
        self._epsilons = spec.grid.tables(self.device)[2]

    @staticmethod
    def _make_logger(verbose: int, log_dir: str | None) -> Logger:
        formats = ["stdout"] if verbose >= 1 else []
        if log_dir is not None:
            return configure(str(log_dir), formats + ["csv", "log"])
        return Logger(folder=None, output_formats=[make_output_format(f, ".") for f in formats])

    # ------------------------------------------------------------------ act
    @torch.no_grad()
    def _sample(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """SB3's ``ActorCriticPolicy.forward``, sampling with the agent's own generator."""
        policy = self.model.policy
        policy.set_training_mode(False)  # as SB3 does while collecting rollouts
        features = policy.extract_features(x)
        if policy.share_features_extractor:
            latent_pi, latent_vf = policy.mlp_extractor(features)
        else:
            pi_features, vf_features = features
            latent_pi = policy.mlp_extractor.forward_actor(pi_features)
            latent_vf = policy.mlp_extractor.forward_critic(vf_features)
        values = policy.value_net(latent_vf)
        dist = policy._get_action_dist_from_latent(latent_pi)
        if isinstance(dist, MultiCategoricalDistribution):
            actions = torch.stack(
                [torch.multinomial(d.probs, 1, generator=self.generator).squeeze(1) for d in dist.distribution],
                dim=1,
            )
        elif isinstance(dist, CategoricalDistribution):
            actions = torch.multinomial(dist.distribution.probs, 1, generator=self.generator).squeeze(1)
        else:  # another distribution: SB3's sampler, seeded from our generator
            seed = int(torch.randint(2**62, (1,), generator=self.generator, device=self.device))
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                actions = dist.get_actions()
        log_probs = dist.log_prob(actions)
        return actions, values, log_probs

    def act(self, observation: Tensor, info: dict[str, Any]) -> Tensor:
        """Sample a grid-index triple per image, ``(B, 3)`` long on the observation's device.

        On a step that will carry the full reward (``info["reward_next_step"]``) the
        observations, actions, values and log-probabilities are kept for ``learn``; on the
        others nothing is kept. (SB3 itself collects rollouts without autograd; its
        ``train()`` recomputes what it needs, so both kinds run under ``no_grad``.)
        """
        x = torch.as_tensor(observation)
        out_device = x.device
        x = x.to(self.device, torch.float32)
        actions, values, log_probs = self._sample(x)
        if info.get("reward_next_step", False):
            self._pending = _Pending(x, actions, values, log_probs)
        else:
            self._pending = None
        return actions.to(out_device, torch.long)

    # ---------------------------------------------------------------- learn
    def learn(self, reward: Tensor, info: dict[str, Any]) -> dict[str, Any]:
        """Add a rollout-buffer step on a reward step; run SB3's ``train()`` when it is full.

        Returns ``{}`` on steps without a reward. On a reward step: ``reward_mean``,
        ``value_mean`` (the critic's mean estimate) and ``epsilon`` (mean chosen radius,
        pixel units); after an update also SB3's logger
        values prefixed ``sb3/`` (``sb3/train/value_loss``, ``sb3/train/approx_kl``, ...).
        """
        pending, self._pending = self._pending, None
        if not info.get("reward_computed", False):
            return {}
        if pending is None:
            if not self._warned_unmatched:
                warnings.warn(
                    "SB3Agent.learn got a reward step it kept no observations for: the env's "
                    f"reward_interval does not match the agent's ({self.reward_interval}); build the env "
                    "with reward_interval=agent.reward_interval. Skipping it.",
                    stacklevel=2,
                )
                self._warned_unmatched = True
            return {}

        b = self.num_envs
        rewards = torch.as_tensor(info["rewards"]).detach().float()
        self.buffer.add(
            pending.obs.cpu().numpy(),
            pending.actions.cpu().numpy(),
            rewards.cpu().numpy(),
            np.ones(b, dtype=np.float32),  # every image starts its own one-step episode
            pending.values,
            pending.log_probs,
        )
        self.buffer_additions += 1
        self.model.num_timesteps += b
        metrics: dict[str, Any] = {
            "reward_mean": rewards.mean(),
            "value_mean": pending.values.mean(),
            "epsilon": self._epsilons[pending.actions[:, 2]].mean(),
        }
        if self.buffer.full:
            metrics.update(self._update(info))
        return metrics

    def _update(self, info: dict[str, Any]) -> dict[str, float]:
        model, buf = self.model, self.buffer
        total = max(int(self.spec.total_steps), 1)
        step = int(info.get("step", 0)) + 1
        model._current_progress_remaining = max(0.0, 1.0 - step / total)
        # Every transition is a finished one-step episode: with dones all True and
        # episode_starts all ones, GAE gives advantage = r - V(x) and return = r.
        buf.compute_returns_and_advantage(
            last_values=torch.zeros(self.num_envs, device=self.device), dones=np.ones(self.num_envs)
        )
        model.logger.record("rollout/reward_mean", float(buf.rewards.mean()))
        model.logger.record("rollout/reward_std", float(buf.rewards.std()))
        # SB3 shuffles minibatches with NumPy's global RNG: run it on the agent's own state.
        saved = np.random.get_state()
        np.random.set_state(self._np_state)
        try:
            model.train()
        finally:
            self._np_state = np.random.get_state()
            np.random.set_state(saved)
        self.updates += 1
        model.logger.record("time/total_timesteps", model.num_timesteps)
        logged = dict(model.logger.name_to_value)
        model.logger.dump(step=model.num_timesteps)
        buf.reset()
        out: dict[str, float] = {}
        for key, value in logged.items():
            try:
                out[f"sb3/{key}"] = float(value)
            except (TypeError, ValueError):
                pass  # SB3 logs only numbers from train(); skip anything else
        return out

    # ---------------------------------------------------------- checkpoints
    _BUFFER_FIELDS = ("observations", "actions", "rewards", "episode_starts", "values", "log_probs")

    def state_dict(self) -> dict[str, Any]:
        """Policy, optimiser, the rollout buffer's filled part, counters and RNG states."""
        buf = self.buffer
        pos = int(buf.pos)
        key, counter, has_gauss, gauss = self._np_state[1], *self._np_state[2:]
        return {
            # Copies: a snapshot must not change as training goes on (the optimiser's state
            # tensors are updated in place, and load_state_dict may keep them as given).
            "policy": {k: v.detach().clone() for k, v in self.model.policy.state_dict().items()},
            "optimizer": copy.deepcopy(self.model.policy.optimizer.state_dict()),
            "buffer": {"pos": pos, **{f: torch.from_numpy(getattr(buf, f)[:pos].copy()) for f in self._BUFFER_FIELDS}},
            "num_timesteps": int(self.model.num_timesteps),
            "n_updates": int(self.model._n_updates),
            "progress_remaining": float(self.model._current_progress_remaining),
            "updates": self.updates,
            "buffer_additions": self.buffer_additions,
            "generator": self.generator.get_state(),
            "np_rng": {
                "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
                "pos": int(counter),
                "has_gauss": int(has_gauss),
                "gauss": float(gauss),
            },
            # For the record (not enforced on load): what produced this state.
            "hparams": {"algo": self.algo_class.__name__, "reward_interval": self.reward_interval, "n_steps": self.n_steps},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.policy.load_state_dict(state["policy"])
        self.model.policy.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        buf = self.buffer
        buf.reset()
        pos = int(state["buffer"]["pos"])
        if pos >= buf.buffer_size:
            raise ValueError(f"Saved rollout buffer holds {pos} steps; this agent's n_steps is {buf.buffer_size}.")
        for f in self._BUFFER_FIELDS:
            getattr(buf, f)[:pos] = state["buffer"][f].cpu().numpy()
        buf.pos = pos
        buf.full = False
        self.model.num_timesteps = int(state["num_timesteps"])
        self.model._n_updates = int(state["n_updates"])
        self.model._current_progress_remaining = float(state["progress_remaining"])
        self.updates = int(state["updates"])
        self.buffer_additions = int(state["buffer_additions"])
        restore_generator(self.generator, state["generator"])
        r = state["np_rng"]
        self._np_state = ("MT19937", r["key"].cpu().numpy().astype(np.uint32), int(r["pos"]), int(r["has_gauss"]), float(r["gauss"]))
        self._pending = None
