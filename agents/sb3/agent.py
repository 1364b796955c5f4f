"""``SB3Agent``: our loop drives, an SB3 on-policy algorithm learns (see ``agents.sb3``)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.distributions import CategoricalDistribution, MultiCategoricalDistribution
from stable_baselines3.common.logger import Logger, configure, make_output_format
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from torch import Tensor

from agents.base import AgentSpec
from agents.sb3.algos import _plain, _policy_kwargs, resolve_algo
from agents.sb3.extractor import per_image_spaces
from agents.sb3.vecenv import _SpecVecEnv
from las_env.checkpoint import restore_generator
from las_env.validate import check_number, check_whole


@dataclass
class _Pending:
    """What ``act`` keeps on a reward step, for ``learn``'s rollout-buffer entry."""

    obs: Tensor  # (B, C, H, W) float32, on the policy's device
    actions: Tensor  # (B, columns) long
    values: Tensor  # (B, 1)
    log_probs: Tensor  # (B,)


_POSITIVE = ("learning_rate", "clip_range", "max_grad_norm")
_NON_NEGATIVE = ("ent_coef", "vf_coef")
_FRACTIONS = ("gamma", "gae_lambda")
_COUNTS = ("n_steps", "n_epochs", "batch_size")


def _check_numbers(kwargs: dict[str, Any]) -> None:
    """The numeric SB3 arguments in their meaningful range (a schedule or ``None`` is SB3's to read)."""
    for key, value in kwargs.items():
        if value is None or callable(value) or isinstance(value, (dict, list, str)):
            continue
        if key in _POSITIVE:
            check_number(key, value, 0, low_open=True)
        elif key in _NON_NEGATIVE:
            check_number(key, value, 0, meaning="(a loss weight; 0 switches the term off)")
        elif key in _FRACTIONS:
            check_number(key, value, 0, 1)
        elif key in _COUNTS:
            check_whole(key, value, 1)


class SB3Agent:
    """The strategy player, trained by a Stable-Baselines3 on-policy algorithm.

    Our loop drives (see the module docstring): ``act`` samples from SB3's policy on every
    step; ``learn`` adds one rollout-buffer step (B transitions, one per image) on each step
    that carries the real reward (every ``k = spec.reward_interval``-th) and runs SB3's
    ``train()`` when ``n_steps`` of them are in.

    Args:
        spec: the game.
        algo: ``"ppo"``, ``"a2c"`` or ``"module:Class"`` of an SB3 on-policy algorithm.
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
        updates: number of SB3 ``train()`` calls.
        buffer_additions: number of rollout-buffer steps added (one per reward step).
        generator: the sampling RNG, on ``spec.device``.
    """

    def __init__(
        self,
        spec: AgentSpec,
        *,
        algo: str = "ppo",
        policy: str | type = "CnnPolicy",
        policy_kwargs: dict | None = None,
        features_dim: int = 128,
        seed: int | None = None,
        verbose: int = 0,
        log_dir: str | None = None,
        name: str | None = None,
        **algo_kwargs: Any,
    ) -> None:
        _check_numbers(algo_kwargs)
        self.spec = spec
        self.name = name
        self.device = torch.device(spec.device)
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
        self._lookup = spec.grid.lookup(self.device)  # index -> value, on the device

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
        if pending is None:  # a reward step act did not see coming (an env other than spec's)
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
            "epsilon": self._lookup(pending.actions)["epsilon"].mean(),
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
            "hparams": {"algo": self.algo_class.__name__, "reward_interval": self.spec.reward_interval, "n_steps": self.n_steps},
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
