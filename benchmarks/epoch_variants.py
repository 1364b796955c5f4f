"""The variants benchmarks/epoch_cost.py times side by side: the data, the agent's spec and grid,
and :class:`Variant` (one configuration that restarts from the same state and plays one step)."""

from __future__ import annotations

import argparse
import copy
import math
import sys
from dataclasses import replace
from typing import Any

import torch

from agents.base import AgentSpec
from agents.baselines import FixedAgent
from agents.reinforce import ReinforceAgent
from las_env.data import ImageData
from las_env.datasets import load_dataset
from las_env.env import LASEnv
from las_env.game_config import LASConfig
from las_env.game import LASGame
from las_env.strategy_space import StrategySpace
from las_env.datasets.registry import lookup
from las_env.methods import MethodConfig
from las_env.optim import OptimConfig
from las_env.reward import RewardConfig

VARIANT_KINDS = ("pgdat", "las", "game")

# ----------------------------------------------------------------------------- data


def random_cifar(n_train: int, n_test: int, seed: int) -> ImageData:
    """CIFAR-10-shaped random images (3x32x32 in [0, 1], 10 classes): timing needs no files."""
    g = torch.Generator().manual_seed(seed)
    return ImageData(
        name="cifar10",
        x_train=torch.rand(n_train, 3, 32, 32, generator=g),
        y_train=torch.randint(0, 10, (n_train,), generator=g),
        x_test=torch.rand(n_test, 3, 32, 32, generator=g),
        y_test=torch.randint(0, 10, (n_test,), generator=g),
        num_classes=10,
        class_names=[str(i) for i in range(10)],
        description=f"random CIFAR-10-shaped tensors ({n_train} train images)",
    )


def load_data(args: argparse.Namespace) -> tuple[str, ImageData]:
    """``(dataset name for the grid / threat model, data)``."""
    if args.data == "cifar10-random":
        return "cifar10", random_cifar(args.batch_size * args.batches, 16, args.seed)
    try:
        return args.data, load_dataset(args.data, args.data_root, download=False)
    except FileNotFoundError as exc:
        sys.exit(
            f"{exc}\nFor CIFAR-10 offline: python ../shared/data/prepare_cifar.py --help writes the "
            f"'python version' folder; or time on random tensors of CIFAR shape: --data cifar10-random."
        )


# ----------------------------------------------------------------------------- variants


def make_spec(dataset: str, data: ImageData, cfg: LASConfig, total_steps: int, steps_per_epoch: int,
              seed: int) -> AgentSpec:
    return AgentSpec(
        grid=cfg.grid,
        observation_shape=(cfg.batch_size, data.channels, data.height, data.width),
        num_classes=data.num_classes,
        dataset=dataset,
        device=torch.device(cfg.device),
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        seed=seed,
        reward_interval=cfg.reward_interval,
    )


def method_grid(dataset: str, method: str, *, learns: bool) -> StrategySpace:
    """The data set's grid; a learning agent of TRADES also picks beta (the authors' 5..9)."""
    grid = lookup(dataset).grid
    return replace(grid, extra=(("trades_beta", (5, 6, 7, 8, 9)),)) if method == "trades" and learns else grid


class Variant:
    """One timed configuration: ``start()`` puts it back to the same initial state (target,
    data order, agent), ``step()`` plays one training step and returns its iteration counts.

    ``kind``: "pgdat" (FixedAgent through LASEnv), "las" (ReinforceAgent through LASEnv) or
    "game" (ReinforceAgent on LASGame, no Gymnasium wrapper).
    """

    def __init__(self, kind: str, k: int | None, precision: str, channels_last: bool, args: argparse.Namespace,
                 dataset: str, data: ImageData) -> None:
        self.kind, self.seed = kind, args.seed
        n_train = data.x_train.shape[0]
        per_epoch = min(n_train // args.batch_size, args.batches)
        epochs = math.ceil(max(args.batches, args.warmup) / per_epoch)
        cfg = LASConfig(
            dataset=dataset,
            model=args.model,
            batch_size=args.batch_size,
            epochs=epochs,
            max_steps_per_epoch=per_epoch,
            reward_interval=None if kind == "pgdat" else k,
            optim=OptimConfig(lr=0.05 if dataset == "digits" else 0.1, schedule="constant"),
            method=MethodConfig(name=args.method),
            reward=RewardConfig(probe_fraction=args.probe_fraction),
            grid=method_grid(dataset, args.method, learns=kind != "pgdat"),
            device=args.device,
            precision=precision,
            channels_last=channels_last,
        )
        spec = make_spec(dataset, data, cfg, per_epoch * epochs, per_epoch, args.seed)
        if kind == "pgdat":
            self.agent: Any = FixedAgent(spec)
        else:
            self.agent = ReinforceAgent(spec, credit="per_image", backbone=args.strategy_backbone, seed=args.seed)
            if channels_last:
                self.agent.net.to(memory_format=torch.channels_last)
        self.initial = copy.deepcopy(self.agent.state_dict())
        if kind == "game":
            self.game = LASGame(cfg, data)
        else:
            self.env = LASEnv(config=cfg, data=data, tensor_api=True)
            self.game = self.env.game

    def start(self) -> None:
        if self.kind == "game":
            self.game.reset(self.seed)
        else:
            self.obs, self.info = self.env.reset(seed=self.seed)
        self.agent.load_state_dict(copy.deepcopy(self.initial))

    def step(self) -> torch.Tensor:
        agent = self.agent
        if self.kind == "game":  # what LASEnv.step does, minus validation and the info dict
            outcome = self.game.play(agent.act(self.game.batch[0], {"reward_next_step": self.game.is_reward_step()}))
            agent.learn(outcome.reward, {"reward_computed": outcome.reward_computed, "rewards": outcome.rewards})
            return outcome.strategy["iterations"]
        action = agent.act(self.obs, self.info)  # the training loop's hot loop (experiments/training/loop.py)
        self.obs, reward, _, _, self.info = self.env.step(action)
        agent.learn(reward, self.info)
        return self.info["iterations"]
