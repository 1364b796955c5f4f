"""Strategy players of the LAS-AT game: the :class:`Agent` protocol and its implementations.

- :class:`ReinforceAgent`: the learnable attack strategy (REINFORCE on :class:`StrategyNet`).
- :class:`FixedAgent`: one attack for every image (PGD-AT).
- :class:`RandomAgent`: uniformly random attack settings per image.
- The literature's adaptive strategies: :class:`CurriculumAgent` (CAT), :class:`InstanceAdaptiveAgent`
  (IAAT), :class:`FriendlyAgent` (FAT) and :class:`Exp3Agent` (a batch-level bandit).
"""

from agents.base import Agent, AgentSpec
from agents.bandit import Exp3Agent
from agents.baselines import FixedAgent, RandomAgent
from agents.curriculum import CurriculumAgent
from agents.friendly import FriendlyAgent
from agents.instance_adaptive import InstanceAdaptiveAgent
from agents.reinforce import ReinforceAgent
from agents.strategy_net import StrategyNet

__all__ = ["Agent", "AgentSpec", "ReinforceAgent", "FixedAgent", "RandomAgent", "StrategyNet", "CurriculumAgent",
           "InstanceAdaptiveAgent", "FriendlyAgent", "Exp3Agent"]
