"""LAS-AT as a Gymnasium environment.

``import las_env`` registers ``"LAS-v0"``, so ``gymnasium.make("LAS-v0")`` builds a
:class:`LASEnv` on the offline digits data (``gymnasium.make("las_env:LAS-v0")`` imports
this package by itself). ``las_env.register_dataset(name, loader)`` adds a data set, after which
``gymnasium.make("LAS-v0", dataset=name)`` trains on it.
"""

from gymnasium.envs.registration import register, registry

from las_env.datasets import DatasetRecord, register_dataset
from las_env.env import LASEnv, make_config
from las_env.game import LASGame
from las_env.game_config import LASConfig
from las_env.methods import MethodConfig
from las_env.optim import OptimConfig
from las_env.reward import RewardConfig
from las_env.step_record import StepRecord
from las_env.strategy_space import StrategySpace

__all__ = [
    "LASEnv",
    "LASGame",
    "LASConfig",
    "StepRecord",
    "StrategySpace",
    "RewardConfig",
    "OptimConfig",
    "MethodConfig",
    "make_config",
    "register_dataset",
    "DatasetRecord",
]

if "LAS-v0" not in registry:
    # Not declared nondeterministic: on CPU a seeded episode is reproducible bit for bit.
    # On CUDA, cuDNN's non-deterministic kernels can make episodes differ slightly.
    register(id="LAS-v0", entry_point="las_env.env:LASEnv")
