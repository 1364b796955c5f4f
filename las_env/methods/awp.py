"""AWP (Wu et al. 2020): adversarial weight perturbation around another method's step.

Per training step: a proxy (ONE persistent copy of the model, loaded by in-place weight copies,
never re-allocated) takes one SGD ascent step on the base method's loss; for every weight tensor
with >= 2 dimensions (convolutions, linear layers; not BatchNorm, not biases) the direction
``d = (w_proxy - w) * ||w|| / ||w_proxy - w||`` is scaled to ``v = gamma * d`` (so
``||v|| = gamma * ||w||``); the model steps at ``w + v`` and ``v`` is subtracted afterwards.
The weights after perturb -> step -> restore are thus those of an optimiser step at ``w`` with
the gradient taken at ``w + v`` (the weight-decay term, too, sees ``w + v``, as in AWP's code).

Two of the authors' choices are switches (``MethodConfig``): the proxy's loss (``proxy_loss``:
ours climbs the perturbed step's own loss, theirs always the unsmoothed one) and a clean
train-mode forward after every real step (``clean_forward``: BatchNorm's running statistics then
average adversarial and clean batches, as in AWP's and LAS-AWP's scripts).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor, nn

from las_env.attack import Loss
from las_env.methods.base import MethodBatch, MethodConfig, MethodLoss, TrainingMethod, build_method, register_method
from las_env.optim import OptimConfig, Precision, autocast

_TINY = 1e-20  # AWP's EPS: a zero direction stays zero instead of dividing by zero


class AWP(TrainingMethod):
    """Wraps ``base``: same attack, same loss, each step taken at the perturbed weights."""

    name = "awp"

    def __init__(self, base: TrainingMethod, gamma: float = 0.01, warmup_epochs: int = 0, proxy_lr: float = 0.01,
                 *, proxy_loss: str = "step", clean_forward: bool = False) -> None:
        self.base = base
        self.proxy_loss = proxy_loss
        self.clean_forward = bool(clean_forward)
        self.reads = base.reads
        self.attack_uses_labels = base.attack_uses_labels
        self.gamma = float(gamma)
        self.warmup_epochs = int(warmup_epochs)
        self.proxy_lr = float(proxy_lr)
        self._proxy: nn.Module | None = None
        self._proxy_opt: torch.optim.SGD | None = None

    def attack_objective(self, model: nn.Module, x: Tensor, y: Tensor, precision: Precision) -> tuple[Loss, Tensor]:
        return self.base.attack_objective(model, x, y, precision)

    def loss(self, model: nn.Module, batch: MethodBatch, optim: OptimConfig, precision: Precision) -> MethodLoss:
        return self.base.loss(model, batch, optim, precision)

    def _load_proxy(self, model: nn.Module) -> nn.Module:
        """The persistent proxy holding ``model``'s weights and buffers (copied in place)."""
        proxy = self._proxy
        shapes = [p.shape for p in model.parameters()]
        if proxy is None or [q.shape for q in proxy.parameters()] != shapes:
            # Once per architecture (first step): a deep copy; every later step copies in place.
            proxy = self._proxy = copy.deepcopy(model)
            self._proxy_opt = torch.optim.SGD(proxy.parameters(), lr=self.proxy_lr)
        else:
            with torch.no_grad():
                for q, p in zip(proxy.parameters(), model.parameters()):
                    q.copy_(p)
                for qb, pb in zip(proxy.buffers(), model.buffers()):
                    qb.copy_(pb)
        return proxy

    def perturbation(self, model: nn.Module, batch: MethodBatch, optim: OptimConfig,
                     precision: Precision) -> list[tuple[Tensor, Tensor]]:
        """``(weight, v)`` for every weight tensor with >= 2 dims: ``v = gamma * d``, ``||v|| = gamma * ||w||``."""
        proxy = self._load_proxy(model)
        proxy.train()
        if self.proxy_loss == "unsmoothed":
            optim = replace(optim, label_smoothing=0.0, true_class_prob=None)
        out = self.base.loss(proxy, batch, optim, precision)
        self._proxy_opt.zero_grad(set_to_none=True)
        (-out.loss).backward()  # ascent: the proxy moves to where the loss is higher
        self._proxy_opt.step()
        pairs = []
        with torch.no_grad():
            for p, q in zip(model.parameters(), proxy.parameters()):
                if p.dim() < 2:
                    continue
                v = q - p
                v.mul_(self.gamma * p.norm() / (v.norm() + _TINY))
                pairs.append((p, v))
        return pairs

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, batch: MethodBatch, optim: OptimConfig,
             precision: Precision, *, scaler: torch.amp.GradScaler | None = None, epoch: int = 0,
             before_update: Callable[[nn.Module], None] | None = None) -> MethodLoss:
        if epoch < self.warmup_epochs or self.gamma == 0:
            return self.base.step(model, optimizer, batch, optim, precision, scaler=scaler, epoch=epoch, before_update=before_update)
        pairs = self.perturbation(model, batch, optim, precision)
        with torch.no_grad():
            for p, v in pairs:
                p.add_(v)
        out = self.base.step(model, optimizer, batch, optim, precision, scaler=scaler, epoch=epoch, before_update=before_update)
        with torch.no_grad():
            for p, v in pairs:
                p.sub_(v)
        return out

    def after_target_step(self, model: nn.Module, batch: MethodBatch, precision: Precision) -> None:
        """``clean_forward``: one train-mode forward of the clean batch, no gradient: only BatchNorm's
        running statistics move (they then average adversarial and clean batches, the authors')."""
        if not self.clean_forward:
            return
        model.train()
        with torch.no_grad(), autocast(batch.x.device, precision):
            model(batch.x)


def _build(cfg: MethodConfig) -> AWP:
    """AWP around the method ``cfg.awp_base`` names, with that method's own settings."""
    return AWP(build_method(replace(cfg, name=cfg.awp_base)), cfg.awp_gamma, cfg.awp_warmup_epochs, cfg.awp_proxy_lr,
               proxy_loss=cfg.awp_proxy_loss, clean_forward=cfg.awp_clean_forward)


register_method("awp", _build)
