"""The look-ahead target ``w_hat``: a copy of the target after one SGD step, the real one untouched.

Two users:

- ``reward.w_hat="deepcopy"`` (the authors'): L2/L3 are measured on a deep copy of the target
  trained one FRESH SGD step (no momentum history) on the strategy's examples, before the
  real training step; :meth:`las_env.game.LASGame.play` calls :func:`lookahead_step`.
- :meth:`las_env.game.LASGame.score` (the authors' reward flow): the reward of some actions
  without training the real target on them. With ``w_hat="this_step"`` the copy also carries
  the real optimiser's momentum buffers, so it is exactly the target the real step would
  produce on those examples; with ``"deepcopy"`` it is the authors' fresh-SGD copy.

The copy's training forward is in train mode (BatchNorm uses the batch's statistics and
updates the COPY's running statistics), as the real step's is; its per-image CE is the free
"train"-mode L1 of ``score``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from las_env.methods import PGDAT, MethodBatch, MethodLoss, TrainingMethod
from las_env.optim import OptimConfig, Precision
from las_env.sharding import average_gradients


def lookahead_step(
    target: nn.Module,
    x_adv: Tensor,
    y: Tensor,
    optim: OptimConfig,
    lr: float,
    *,
    precision: Precision = "fp32",
    optimizer_state: dict[str, Any] | None = None,
    method: TrainingMethod | None = None,
    x: Tensor | None = None,
    extras: dict[str, Tensor] | None = None,
    epoch: int = 0,
) -> tuple[nn.Module, MethodLoss]:
    """Deep-copy ``target`` and train the copy one step on ``(x_adv, y)`` by ``method``.

    Returns ``(w_hat, loss)``: the copy after its step, and the method's loss of the copy BEFORE
    its step, in train mode (= the real target's, which it equals before the step): the
    per-image L1 and correctness of the training forward.

    Args:
        optim: the target's optimiser settings (momentum, weight decay, label smoothing).
        lr: the learning rate of the step (the real step's current one).
        precision: autocast precision of the forward (fp16: no grad scaler, the copy is
            thrown away after one step).
        optimizer_state: the real optimiser's ``state_dict()`` to continue from (momentum
            buffers); it is deep-copied, so the real optimiser's state is never written.
            ``None``: a fresh SGD, the authors' ``w_hat``.
        method: the training method (``None``: PGD-AT); its step is the real step's code, so
            AWP's weight perturbation is part of the look-ahead too.
        x, extras, epoch: the clean images, the strategy's extra columns and the epoch (AWP's
            warm-up), as the real step gets them.
    """
    method = method if method is not None else PGDAT()
    w_hat = copy.deepcopy(target)
    opt = torch.optim.SGD(w_hat.parameters(), lr=lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    if optimizer_state is not None:
        opt.load_state_dict(copy.deepcopy(optimizer_state))
        for group in opt.param_groups:
            group["lr"] = lr
    batch = MethodBatch(x if x is not None else x_adv, x_adv, y, extras or {})
    # under torchrun: the global batch's step, as DDP's for the real target (las_env/sharding.py)
    out = method.step(w_hat, opt, batch, optim, precision, epoch=epoch, before_update=average_gradients)
    return w_hat, out
