"""What a training method of the game is: the seam every method (PGD-AT, TRADES, AWP) plugs into.

A method owns (a) the loss the per-image attack ascends (:meth:`TrainingMethod.attack_objective`),
(b) the target's training loss on a batch (:meth:`TrainingMethod.loss`), (c) the extra strategy
columns it reads (:attr:`TrainingMethod.reads`, e.g. LAS-TRADES' per-image ``trades_beta``) and
(d) the reward's L1, which is the per-image form of its training loss (:attr:`MethodLoss.per_image`;
the authors' LAS-TRADES R1 is the TRADES loss itself). One training step
(:meth:`TrainingMethod.step`) is the same code for the env's real step and for the look-ahead copy
``w_hat`` (``las_env.lookahead``), so whatever a method does to a step (AWP's weight perturbation)
is in both.

Methods are found by name in :data:`METHODS`, where each method's own module registers its
builder (:func:`register_method`): a new method is one module, its ``conf/method/*.yaml`` and
its test, and nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from las_env.attack import Loss
from las_env.optim import OptimConfig, Precision
from las_env.validate import SettingError, check_number, check_whole


@dataclass
class MethodConfig:
    """Which adversarial-training method the target is trained with (``method=`` on the command line).

    Attributes:
        name: a registered method (:data:`METHODS`): "pgd_at" (Madry et al.; LAS-AT), "trades"
            (Zhang et al. 2019; LAS-TRADES), "awp" (Wu et al. 2020, adversarial weight
            perturbation around ``awp_base``; LAS-AWP), or one of your own.
        trades_beta: TRADES' weight of the KL term, for every image, when the strategy grid has
            no ``trades_beta`` column (TRADES' own 6.0); with the column the strategy picks it
            per image.
        awp_base: the method AWP perturbs the weights around: "pgd_at" (AT-AWP) or "trades".
        awp_gamma: relative size of the weight perturbation, ``gamma * ||w||`` per tensor (0.01).
        awp_warmup_epochs: epochs trained without the perturbation first (the authors' 0;
            10 on Tiny-ImageNet).
        awp_proxy_lr: learning rate of the proxy's one ascent step (0.01).
        awp_proxy_loss: what the proxy climbs: "step" (ours: the loss of the step it perturbs,
            label-smoothed when that step's is, e.g. the authors' LAS-AWP look-ahead copy) or
            "unsmoothed" (the authors': always the method's plain loss, CE for PGD-AT).
        awp_clean_forward: after each real training step, one more forward of the CLEAN batch in
            train mode, so BatchNorm's running statistics also average clean batches (the authors'
            AWP and LAS-AWP scripts); False (ours) = running statistics of adversarial batches only.
    """

    name: str = "pgd_at"
    trades_beta: float = 6.0
    awp_base: str = "pgd_at"
    awp_gamma: float = 0.01
    awp_warmup_epochs: int = 0
    awp_proxy_lr: float = 0.01
    awp_proxy_loss: str = "step"
    awp_clean_forward: bool = False

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise SettingError("name", self.name, f"must be a registered method, one of {sorted(METHODS)} (a new one "
                               "registers itself with las_env.methods.register_method(name, build)).")
        if self.awp_base not in ("pgd_at", "trades"):
            raise SettingError("awp_base", self.awp_base, "must be pgd_at (AT-AWP) or trades (TRADES-AWP).")
        check_number("trades_beta", self.trades_beta, 0, meaning="(TRADES' KL weight; theirs 6.0)")
        check_number("awp_gamma", self.awp_gamma, 0, 1, meaning="(relative weight perturbation; theirs 0.01)")
        check_number("awp_proxy_lr", self.awp_proxy_lr, 0, low_open=True, meaning="(the proxy's step; theirs 0.01)")
        check_whole("awp_warmup_epochs", self.awp_warmup_epochs, 0)
        if self.awp_proxy_loss not in ("step", "unsmoothed"):
            raise SettingError("awp_proxy_loss", self.awp_proxy_loss,
                               "must be step (ours: the perturbed step's own loss) or unsmoothed (the authors').")


@dataclass
class MethodBatch:
    """One training batch as a method sees it.

    Attributes:
        x: clean images ``(B, C, H, W)``; x_adv: the strategy's adversarial examples; y: labels.
        extras: per-image values of the strategy's extra columns (name -> ``(B,)`` float).
    """

    x: Tensor
    x_adv: Tensor
    y: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class MethodLoss:
    """A method's loss on a batch, from one forward of the (not yet updated) model.

    Attributes:
        loss: the mean training loss (0-d, with autograd history) the optimiser descends.
        per_image: the reward's L1 per image ``(B,)``, detached: the unsmoothed per-image form
            of the training loss (PGD-AT: CE on x_adv; TRADES: CE(clean) + beta_i * KL_i).
        correct: whether the model classified each adversarial example correctly ``(B,)``.
    """

    loss: Tensor
    per_image: Tensor
    correct: Tensor


class TrainingMethod:
    """Base class: PGD-AT's attack objective and plain optimiser step; subclasses override."""

    name: str = "base"
    reads: tuple[str, ...] = ()
    """Extra strategy columns this method reads from :attr:`MethodBatch.extras`."""
    attack_uses_labels: bool = True
    """Whether the training attack's objective has labels, so it can stop early once an image is
    misclassified (the ``early_stop_tau`` column); TRADES' KL attack has none."""

    def attack_objective(self, model: nn.Module, x: Tensor, y: Tensor, precision: Precision) -> tuple[Loss, Tensor]:
        """``(loss name, reference)`` for :func:`las_env.attack.per_image_pgd`: the attack ascends
        ``attack_loss(model(x_adv), reference, loss)``. PGD-AT: cross-entropy against the labels."""
        return "ce", y

    def loss(self, model: nn.Module, batch: MethodBatch, optim: OptimConfig, precision: Precision) -> MethodLoss:
        raise NotImplementedError

    def step(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        batch: MethodBatch,
        optim: OptimConfig,
        precision: Precision,
        *,
        scaler: torch.amp.GradScaler | None = None,
        epoch: int = 0,
        before_update: Callable[[nn.Module], None] | None = None,
    ) -> MethodLoss:
        """One optimiser step of ``model`` on ``batch`` in train mode (the learning rate is the caller's).

        ``before_update(model)`` runs between the backward pass and the optimiser step (the
        look-ahead copies average their gradients over the ranks there), before ``optim.grad_clip``.
        """
        model.train()
        out = self.loss(model, batch, optim, precision)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(out.loss).backward()
            if before_update is not None:
                before_update(model)
            if optim.grad_clip is not None:
                scaler.unscale_(optimizer)  # the norm is clipped on the true gradient, not the scaled one
                nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            out.loss.backward()
            if before_update is not None:
                before_update(model)
            if optim.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
            optimizer.step()
        return out

    def after_target_step(self, model: nn.Module, batch: MethodBatch, precision: Precision) -> None:
        """Runs after the target's real step (never after a look-ahead copy's); nothing by default."""


METHODS: dict[str, Callable[[MethodConfig], TrainingMethod]] = {}
"""Method name -> the builder of its :class:`TrainingMethod` from the settings (``method=<name>``)."""


def register_method(name: str, build: Callable[[MethodConfig], TrainingMethod]) -> None:
    """Make ``method=<name>`` build ``build(settings)`` (each method's module registers itself)."""
    METHODS[name] = build


def build_method(cfg: MethodConfig) -> TrainingMethod:
    """The method ``cfg`` names."""
    return METHODS[cfg.name](cfg)
