"""PGD-AT (Madry et al. 2018): the target descends its training loss on the adversarial examples."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from las_env.methods.base import MethodBatch, MethodLoss, TrainingMethod, register_method
from las_env.optim import OptimConfig, Precision, autocast, training_loss


class PGDAT(TrainingMethod):
    """Loss ``training_loss(model(x_adv), y)`` (CE, optionally label-smoothed); L1 = per-image CE."""

    name = "pgd_at"

    def loss(self, model: nn.Module, batch: MethodBatch, optim: OptimConfig, precision: Precision) -> MethodLoss:
        with autocast(batch.x_adv.device, precision):
            logits = model(batch.x_adv)
        logits = logits.float()
        loss = training_loss(logits, batch.y, optim)
        with torch.no_grad():
            per_image = F.cross_entropy(logits, batch.y, reduction="none")
            correct = logits.argmax(1) == batch.y
        return MethodLoss(loss, per_image.detach(), correct)


register_method("pgd_at", lambda cfg: PGDAT())
