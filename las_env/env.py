"""LASEnv: LAS-AT's adversarial-training step as a Gymnasium environment.

The agent plays the strategy network: it sees the clean batch the target is about to be
trained on and picks, per image, a PGD configuration. The environment attacks the batch
with those settings, trains the target one SGD step on the examples, and pays the reward
``L1 + alpha*L2 + beta*L3``. One episode is the target's whole training budget.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from las_env.data import ImageData
from las_env.game import LASGame
from las_env.game_config import LASConfig
from las_env.methods import MethodConfig
from las_env.optim import OptimConfig
from las_env.reward import REWARD_TERMS, RewardConfig
from las_env.step_record import BATCH_MEANS, PER_IMAGE, SCALARS, StepRecord
from las_env.strategy_space import StrategySpace


def info_keys() -> frozenset[str]:
    """The step info's own keys; a strategy column's values sit beside them under its name, so no
    column may take one of these names."""
    return frozenset((*PER_IMAGE, *REWARD_TERMS, *BATCH_MEANS, *SCALARS))


def make_config(**kwargs: Any) -> LASConfig:
    """A :class:`LASConfig` from keyword settings; ``optim``, ``reward``, ``grid`` and ``method``
    may be given as dicts (``method`` also as a name: ``method="trades"``). Unknown keys raise a ValueError listing the valid ones."""
    valid = {f.name for f in fields(LASConfig)}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise ValueError(f"Unknown LASEnv setting(s) {unknown}; valid settings: {sorted(valid)}.")
    if isinstance(kwargs.get("optim"), dict):
        kwargs["optim"] = OptimConfig(**kwargs["optim"])
    if isinstance(kwargs.get("reward"), dict):
        kwargs["reward"] = RewardConfig(**kwargs["reward"])
    if isinstance(kwargs.get("grid"), dict):
        kwargs["grid"] = StrategySpace.from_config(kwargs["grid"])
    if isinstance(kwargs.get("method"), str):
        kwargs["method"] = {"name": kwargs["method"]}
    if isinstance(kwargs.get("method"), dict):
        kwargs["method"] = MethodConfig(**kwargs["method"])
    return LASConfig(**kwargs)


class LASEnv(gym.Env):
    """The attack-strategy game of LAS-AT.

    Observation (``Box(0, 1, (B, C, H, W), float32)``): the clean, augmented images of the
    batch the next step trains the target on. Element ``[i, c, h, w]`` is channel ``c`` of
    pixel ``(h, w)`` of image ``i``, in ``[0, 1]``. Labels are in ``info["labels"]``, the training-set
    index of each image in ``info["next_indices"]`` (what a per-image stateful agent keys its memory by).

    Action (``MultiDiscrete`` of shape ``(B, columns)``): one index per column of the strategy
    space ``env.space`` (:class:`las_env.strategy_space.StrategySpace`), in
    ``env.space.columns`` order: ``action[i, 0]`` indexes the step-size table, ``action[i, 1]``
    the iterations table, ``action[i, 2]`` the epsilon table and ``action[i, 3:]`` the space's
    further columns (LAS-TRADES' ``trades_beta``, or any column of the user's own).

    Reward: the batch mean of the per-image rewards ``L1 + alpha*L2 + beta*L3``, computed on
    every ``reward_interval``-th step only; ``info["reward_computed"]`` says whether this
    step's reward is real (on the others it is 0.0 and L2/L3 were not paid for).

    ``info`` after a step (:meth:`las_env.step_record.StepRecord.info`) holds, per image (arrays
    of shape (B,)): ``rewards``, each reward term by name (``l1``, ``l2``, ``l3``),
    ``adv_correct`` (target right on its adversarial example before the update), ``indices``
    (the training-set index of each image of the PLAYED batch), and the value played in every
    column of the space, by column name (``step_size``, ``iterations``, ``epsilon``, then e.g.
    ``trades_beta`` or ``early_stop_tau``); and scalars ``reward_computed``, ``adv_accuracy``,
    ``clean_accuracy`` and ``probe_accuracy`` (of the updated target; NaN when not measured this
    step), ``train_loss``, ``lr``, ``epoch``, ``step``, the attack cost per image of the batch
    (``attack_gradients_per_image``: gradient computations of the training attack;
    ``probe_gradients_per_image``: of the reward's probes and of the ``score`` calls on this
    batch), plus of the NEW observation ``labels``, ``next_indices`` (its training-set indices:
    the next step's ``indices``) and ``reward_next_step``. ``reset`` and ``observe`` give
    ``labels``, ``next_indices``, ``epoch``, ``step`` and ``reward_next_step``.
    On reward steps with ``reward.pre_update_probe``, ``batch_terms_before`` (B,) holds
    ``alpha*L2 + beta*L3`` of the target before the step's update (``credit="unbiased"``).

    With ``tensor_api=True`` observations and info arrays are torch tensors on the
    training device (no host copies, no synchronisation); this is what the built-in
    training loop uses on a GPU. The default returns NumPy, as Gymnasium expects.

    Keyword settings are those of :class:`las_env.game.LASConfig` (``dataset``, ``model``,
    ``batch_size``, ``epochs``, ``reward_interval``, ``optim``, ``reward``, ``device``, ...).
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        config: LASConfig | None = None,
        *,
        data: ImageData | None = None,
        tensor_api: bool = False,
        **settings: Any,
    ) -> None:
        if config is not None and settings:
            raise ValueError("Pass either config=LASConfig(...) or keyword settings, not both.")
        self.config = config if config is not None else make_config(**settings)
        self.game = LASGame(self.config, data)
        self.tensor_api = tensor_api
        self.space = self.game.space
        taken = sorted(info_keys().intersection(self.space.columns))
        if taken:
            raise ValueError(f"data.grid.extra names the column(s) {taken}, which the step info already uses for "
                             f"its own values: rename the column (e.g. my_{taken[0]}).")
        d = self.game.data
        b = self.config.batch_size // self.game.shard.world  # under torchrun: this rank's rows (las_env/sharding.py)
        self.observation_space = spaces.Box(0.0, 1.0, shape=(b, d.channels, d.height, d.width), dtype=np.float32)
        self.action_space = self.space.action_space(b)
        self._nvec = torch.tensor(self.space.nvec, device=self.game.device)

    # ------------------------------------------------------------------ API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start a fresh target network and data order. The same ``seed`` gives the same
        target initialisation, data order, augmentation and attack starts."""
        super().reset(seed=seed)
        game_seed = seed if seed is not None else int(self.np_random.integers(2**31 - 1))
        self.game.reset(game_seed)
        return self._observation(), self._batch_info()

    def step(self, action):
        action_t = self._validate(action)
        record = self.game.play(action_t)
        terminated = self.game.done
        info = self._step_info(record)
        reward = record.reward if self.tensor_api else float(record.reward)
        return self._observation(), reward, terminated, False, info

    def score(self, action) -> tuple[Any, dict[str, Any]]:
        """``(reward, info)`` that ``step(action)`` would give on the current batch, measured
        on a look-ahead copy of the target WITHOUT training the target on it (the authors'
        reward flow: score sampled actions, update the policy, train on a new sample).

        ``info`` has ``step``'s keys (per-image ``rewards``, ``l1``, ``l2``, ``l3``, ...;
        ``reward_computed`` is True) and describes the current batch. Nothing changes: not
        the target, its optimiser, the step counter, the observation or the training RNG
        (see :meth:`las_env.game.LASGame.score`).
        """
        action_t = self._validate(action)
        record = self.game.score(action_t)
        info = self._step_info(record)
        return (record.reward if self.tensor_api else float(record.reward)), info

    def observe(self) -> tuple[Any, dict[str, Any]]:
        """The current observation and its info, as ``reset`` returns them (e.g. after
        ``load_state_dict``), without changing anything."""
        return self._observation(), self._batch_info()

    # ------------------------------------------------------------ helpers

    def _observation(self):
        x = self.game.batch[0]
        if self.tensor_api:
            return x
        return x.contiguous().cpu().numpy()

    def _batch_info(self) -> dict[str, Any]:
        y, idx = self.game.batch[1], self.game.indices
        return {
            "labels": y if self.tensor_api else y.cpu().numpy(),
            "next_indices": idx if self.tensor_api else idx.cpu().numpy(),
            "epoch": self.game.epoch,
            "step": self.game.step_index,
            "reward_next_step": self.game.is_reward_step() if not self.game.done else False,
        }

    def _step_info(self, record: StepRecord) -> dict[str, Any]:
        info = record.info()
        if not self.tensor_api:
            info = {k: (v.cpu().numpy() if v.dim() else float(v)) if isinstance(v, torch.Tensor) else v
                    for k, v in info.items()}
        batch = self._batch_info()  # the NEW observation's labels; step and epoch stay the record's
        info.update(labels=batch["labels"], next_indices=batch["next_indices"],
                    reward_next_step=batch["reward_next_step"])
        return info

    def _validate(self, action) -> torch.Tensor:
        """Turn an action into a long tensor on the game's device, or raise ValueError
        saying what is wrong. Validation happens before any state changes."""
        expected = self.action_space.shape
        if isinstance(action, torch.Tensor):
            t = action
        else:
            try:
                arr = np.asarray(action)
            except Exception as e:  # ragged lists and the like
                raise ValueError(f"Action could not be read as an array of shape {expected}: {e}") from None
            if arr.dtype == object:
                raise ValueError(f"Action must be an integer array of shape {expected}, got a ragged/object array.")
            t = torch.from_numpy(arr) if arr.dtype.kind in "iubf" else None
            if t is None:
                raise ValueError(f"Action must be an integer array of shape {expected}, got dtype {arr.dtype}.")
        if tuple(t.shape) != expected:
            raise ValueError(
                f"Action has shape {tuple(t.shape)}; expected {expected} = (batch_size, {expected[1]}): one "
                f"({', '.join(c + ' index' for c in self.space.columns)}) row per image."
            )
        if t.dtype.is_floating_point:
            if torch.isnan(t).any():
                raise ValueError("Action contains NaN; actions are integer grid indices.")
            raise ValueError(f"Action dtype is {t.dtype}; actions are integer grid indices (use an integer dtype).")
        if t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"Action dtype is {t.dtype}; actions are integer grid indices.")
        t = t.to(device=self.game.device, dtype=torch.long)
        nvec = self._nvec
        bad = (t < 0) | (t >= nvec)
        if bad.any():  # one small sync; the attack itself needs one per step anyway
            row, col = (int(v) for v in bad.nonzero()[0])
            raise ValueError(
                f"Action index out of range: action[{row}, {col}] = {int(t[row, col])}, but column {col} "
                f"({self.space.columns[col]}) takes 0..{int(nvec[col]) - 1}."
            )
        return t

    def state_dict(self) -> dict:
        return {"game": self.game.state_dict(), "np_random": self.np_random.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.game.load_state_dict(state["game"])
        self.np_random.bit_generator.state = state["np_random"]
