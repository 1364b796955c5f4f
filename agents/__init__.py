"""Strategy players of the LAS-AT game: the :class:`Agent` protocol and its implementations.

- :class:`ReinforceAgent`: the learnable attack strategy (REINFORCE on :class:`StrategyNet`).
- :class:`FixedAgent`: one attack for every image (PGD-AT).
- :class:`RandomAgent`: uniformly random attack settings per image.
"""

from agents.base import Agent, AgentSpec
from agents.baselines import FixedAgent, RandomAgent
from agents.reinforce import ReinforceAgent
from agents.strategy_net import StrategyNet

__all__ = ["Agent", "AgentSpec", "ReinforceAgent", "FixedAgent", "RandomAgent", "StrategyNet"]
