"""The env as a replicated agent sees it under ``torchrun``: the global batch and global rewards.

Each rank's :class:`las_env.env.LASEnv` plays its rows of every global batch (``las_env/sharding.py``);
:class:`GlobalView` shows the agent the GLOBAL batch and per-image rewards (one all-gather per step),
so every replica takes the single process's update, and broadcasts rank 0's actions so the ranks
cannot drift apart. Used by ``experiments/training`` inside its process group.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from las_env.reward import REWARD_TERMS
from las_env.sharding import Shard
from las_env.step_record import BATCH_MEANS, COST_KEYS, PER_IMAGE


class GlobalView:
    """The env as the agent and the loop see it under DDP: this rank's :class:`las_env.env.LASEnv`
    (``tensor_api=True``) playing its rows of the global action (rank 0's, broadcast), with the
    per-image info all-gathered and the batch means averaged: the keys and shapes of one process's."""

    def __init__(self, env: Any, shard: Shard) -> None:
        if not env.tensor_api:
            raise ValueError("GlobalView needs LASEnv(tensor_api=True).")
        self.env, self.shard = env, shard

    def __getattr__(self, name: str) -> Any:
        return getattr(self.env, name)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self.env.reset(seed=seed, options=options)
        return self.observe()

    def observe(self) -> tuple[Tensor, dict[str, Any]]:
        _, info = self.env.observe()
        x, y = self.env.game.global_batch
        return x, {**info, "labels": y, "next_indices": self.env.game.global_indices}

    def step(self, action):
        a = self._shared(action)
        _, _, terminated, truncated, info = self.env.step(self.shard.rows(a))
        info = self._global_info(a, info)
        return self.env.game.global_batch[0], self._reward(info), terminated, truncated, info

    def score(self, action) -> tuple[Tensor, dict[str, Any]]:
        a = self._shared(action)
        _, info = self.env.score(self.shard.rows(a))
        info = self._global_info(a, info)
        return self._reward(info), info

    def _shared(self, action) -> Tensor:
        game = self.env.game
        a = torch.as_tensor(action, device=game.device).long().contiguous()
        expected = (game.config.batch_size, len(game.space.nvec))
        if tuple(a.shape) != expected:
            raise ValueError(f"Action has shape {tuple(a.shape)}; expected {expected}: one row per image of the "
                             f"global batch (every rank's), under torchrun as in one process.")
        dist.broadcast(a, src=0)  # rank 0's choice: replicas never act on different actions
        return a

    def _reward(self, info: dict[str, Any]) -> Tensor:
        if info["reward_computed"]:
            return info["rewards"].mean()
        return torch.zeros((), device=self.env.game.device)

    def _global_info(self, action: Tensor, info: dict[str, Any]) -> dict[str, Any]:
        # The step record's per-image values (reward terms included) are gathered, its batch means
        # averaged (equal shards); float64 carries indices, flags and float32 values exactly.
        keys = [k for k in (*PER_IMAGE, *REWARD_TERMS) if k in info]
        local = torch.stack([info[k].double() for k in keys])  # (keys, B / world)
        parts = [torch.empty_like(local) for _ in range(self.shard.world)]
        dist.all_gather(parts, local)
        full = torch.cat(parts, dim=1)
        # adv_accuracy: of the gathered flags; the attack cost (host floats per image of this rank's rows) too
        averaged = [k for k in (*BATCH_MEANS, *COST_KEYS) if k != "adv_accuracy"]
        device = self.env.game.device
        means = torch.stack([torch.as_tensor(info[k], dtype=torch.float32, device=device) for k in averaged])
        dist.all_reduce(means)
        means /= self.shard.world
        out = dict(info)
        for i, k in enumerate(keys):
            out[k] = full[i].to(info[k].dtype)
        for i, k in enumerate(averaged):
            out[k] = means[i]
        out["adv_accuracy"] = out["adv_correct"].float().mean()  # exactly the single process's
        out.update(self.env.game.strategy(action))  # every column of the space, global rows
        out["labels"] = self.env.game.global_batch[1]
        out["next_indices"] = self.env.game.global_indices
        return out


def global_view(env: Any) -> Any:
    """``env`` itself in one process, :class:`GlobalView` of it under DDP."""
    shard = env.game.shard
    return GlobalView(env, shard) if shard.distributed else env
