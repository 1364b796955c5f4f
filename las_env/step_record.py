"""What one step of the game produced: :class:`StepRecord`, the one shape ``play`` and ``score``
return and the env's ``info`` is built from (:meth:`StepRecord.info`).

Every consumer of the step (the training loop's metrics, the several-process gather, the SB3
adapter) reads the record's names from here: per-image values are the tensors of shape ``(B,)``
(:data:`PER_IMAGE`, the reward terms, the strategy's columns), batch means are 0-d.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PER_IMAGE = ("rewards", "adv_correct", "indices", "batch_terms_before")
"""``info``'s per-image keys besides the reward terms (:data:`las_env.reward.REWARD_TERMS`) and the
strategy's columns."""
COST_KEYS = ("attack_gradients_per_image", "probe_gradients_per_image")
"""``info``'s attack cost (host floats: input-gradient computations per image of the batch, of the training
attack and of the reward's probes and ``score`` calls); the run logs them as ``cost/<key>``."""
BATCH_MEANS = ("adv_accuracy", "clean_accuracy", "probe_accuracy", "train_loss")
"""``info``'s batch means (0-d; NaN when not measured on this step)."""
SCALARS = ("reward_computed", "lr", "epoch", "step", *COST_KEYS, "labels", "next_indices", "reward_next_step")
"""``info``'s plain values (``labels``, ``next_indices`` and ``reward_next_step`` describe the NEW observation)."""


@dataclass
class StepRecord:
    """What one step of the game produced. Tensors stay on the training device.

    Attributes:
        reward: the batch reward, mean of ``rewards`` (0-d); 0 when not computed.
        reward_computed: whether this step paid for the full reward (L2/L3 included).
        rewards: the per-image reward ``(B,)``, the weighted sum of ``terms``.
        terms: each reward term's per-image value, name -> ``(B,)`` (``l1``, ``l2``, ``l3``, ...);
            a term of the updated target is zeros when not computed.
        adv_correct: whether the target (before the update) classified each adversarial
            example correctly ``(B,)``.
        clean_correct: the updated target right on each probed clean image ``(m,)`` (the whole batch,
            or the subset of ``reward.probe_fraction``), or None when not measured.
        probe_correct: the updated target right on each probed image under the probe attack ``(m,)``, or None.
        terms_before: the updated-target terms (``alpha*L2 + beta*L3``) per image of the target
            BEFORE this step's update ``(B,)``, on reward steps with ``reward.pre_update_probe``;
            otherwise None.
        train_loss: batch mean of the method's per-image loss (unsmoothed; 0-d).
        strategy: the values played per image, column name -> ``(B,)`` (``step_size``,
            ``iterations``, ``epsilon``, then the space's extra columns).
        indices: the training-set index of each image of the batch ``(B,)``.
        attack_gradients: input-gradient computations the training attack made on this batch, summed
            over its images (host int; early stop makes it less than the sum of chosen iterations).
        probe_gradients: those of the reward's probes (the L2 probe, the pre-update probe) and of the
            ``score`` calls made on this batch before it was played (host int; 0 on most steps).
        step: index of this step in the episode (0-based); epoch: its epoch; lr: its learning rate.
    """

    reward: Tensor
    reward_computed: bool
    rewards: Tensor
    terms: dict[str, Tensor]
    adv_correct: Tensor
    clean_correct: Tensor | None
    probe_correct: Tensor | None
    terms_before: Tensor | None
    train_loss: Tensor
    strategy: dict[str, Tensor]
    indices: Tensor
    attack_gradients: int
    probe_gradients: int
    step: int
    epoch: int
    lr: float

    def info(self) -> dict[str, object]:
        """The step's ``info`` as device tensors (the env adds the new observation's ``labels``,
        ``next_indices`` and ``reward_next_step``, and converts to NumPy unless asked for tensors);
        the gradient counts as host floats per image of this batch."""
        nan = torch.full((), float("nan"), device=self.reward.device)

        def mean(t: Tensor | None) -> Tensor:
            return t.float().mean() if t is not None else nan

        info: dict[str, object] = {"rewards": self.rewards, **self.terms, "adv_correct": self.adv_correct,
                                   "indices": self.indices, **self.strategy,
                                   "adv_accuracy": mean(self.adv_correct), "clean_accuracy": mean(self.clean_correct),
                                   "probe_accuracy": mean(self.probe_correct), "train_loss": self.train_loss}
        if self.terms_before is not None:  # reward steps with reward.pre_update_probe only
            info["batch_terms_before"] = self.terms_before
        rows = self.indices.shape[0]
        info.update(reward_computed=self.reward_computed, lr=self.lr, step=self.step, epoch=self.epoch,
                    attack_gradients_per_image=self.attack_gradients / rows,
                    probe_gradients_per_image=self.probe_gradients / rows)
        return info
