"""What one step of the game produced (:class:`StepOutcome`)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from las_env.reward import RewardTerms


@dataclass
class StepOutcome:
    """What one step of the game produced. Tensors stay on the training device.

    Attributes:
        reward: the batch reward, mean of ``terms.total`` (0-d); 0 when not computed.
        reward_computed: whether this step paid for the full reward (L2/L3 included).
        terms: per-image L1, L2, L3 and total reward (B,). L2/L3 are zeros when not computed.
        adv_correct: target (before the update) right on each adversarial example (B,).
        clean_correct: updated target right on each clean image (B,), or None when not measured.
        probe_correct: updated target right under the probe attack (B,), or None.
        terms_before: ``alpha*L2 + beta*L3`` per image of the target BEFORE this step's update
            (B,), on reward steps with ``reward.pre_update_probe``; otherwise None.
        train_loss: the target's mean training loss on this batch (0-d).
        strategy: the values played per image, column name -> (B,) (``step_size``, ``iterations``,
            ``epsilon``, then the space's extra columns); ``step_size`` etc. are properties.
        step: index of this step in the episode (0-based); epoch: its epoch; lr: its learning rate.
    """

    reward: Tensor
    reward_computed: bool
    terms: RewardTerms
    adv_correct: Tensor
    clean_correct: Tensor | None
    probe_correct: Tensor | None
    train_loss: Tensor
    strategy: dict[str, Tensor]
    step: int
    epoch: int
    lr: float
    terms_before: Tensor | None = None

    @property
    def step_size(self) -> Tensor:
        return self.strategy["step_size"]

    @property
    def iterations(self) -> Tensor:
        return self.strategy["iterations"]

    @property
    def epsilon(self) -> Tensor:
        return self.strategy["epsilon"]
