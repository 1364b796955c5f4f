"""TRADES (Zhang et al. 2019): clean cross-entropy plus beta times KL(p_clean || p_adv).

The attack ascends, per image, ``KL(p_clean || p_adv)`` with ``p_clean`` the model's softmax on the
clean image (eval mode, fixed during the attack); the loss is
``CE(f(x), y) + (1/B) * sum_i beta_i * KL(p_clean,i || p_adv,i)`` with the clean softmax NOT
detached (gradients flow through both forwards), as in TRADES and the authors' LAS-TRADES. With a
``trades_beta`` strategy column each image has its own beta; without one every image has
``MethodConfig.trades_beta``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from las_env.attack import Loss, eval_mode
from las_env.methods.base import MethodBatch, MethodLoss, TrainingMethod, register_method
from las_env.optim import OptimConfig, Precision, autocast, training_loss


def kl_per_image(logits_clean: Tensor, logits_adv: Tensor) -> Tensor:
    """``KL(softmax(logits_clean) || softmax(logits_adv))`` per row ``(B,)``."""
    log_p = F.log_softmax(logits_clean, dim=1)
    return (log_p.exp() * (log_p - F.log_softmax(logits_adv, dim=1))).sum(1)


class TRADES(TrainingMethod):
    """TRADES' attack objective and loss; ``beta`` is the KL weight when the grid has no column."""

    name = "trades"
    reads = ("trades_beta",)
    attack_uses_labels = False  # the KL attack ascends towards no label

    def __init__(self, beta: float = 6.0) -> None:
        self.beta = float(beta)

    def attack_objective(self, model: nn.Module, x: Tensor, y: Tensor, precision: Precision) -> tuple[Loss, Tensor]:
        """KL against the clean softmax, computed once in eval mode (the attack's own mode)."""
        with torch.no_grad(), eval_mode(model), autocast(x.device, precision):
            p_clean = model(x).float().softmax(1)
        return "kl", p_clean

    def betas(self, batch: MethodBatch) -> Tensor:
        """Per-image beta ``(B,)``: the strategy's column, or the constant."""
        beta = batch.extras.get("trades_beta")
        return beta if beta is not None else torch.full(batch.y.shape, self.beta, device=batch.y.device)

    def loss(self, model: nn.Module, batch: MethodBatch, optim: OptimConfig, precision: Precision) -> MethodLoss:
        with autocast(batch.x.device, precision):
            logits_clean = model(batch.x)
            logits_adv = model(batch.x_adv)
        logits_clean, logits_adv = logits_clean.float(), logits_adv.float()
        weighted_kl = self.betas(batch) * kl_per_image(logits_clean, logits_adv)
        loss = training_loss(logits_clean, batch.y, optim) + weighted_kl.mean()
        with torch.no_grad():
            per_image = F.cross_entropy(logits_clean, batch.y, reduction="none") + weighted_kl
            correct = logits_adv.argmax(1) == batch.y
        return MethodLoss(loss, per_image.detach(), correct)


register_method("trades", lambda cfg: TRADES(cfg.trades_beta))
