"""The strategy's reward ``L1 + alpha * L2 + beta * L3`` (the paper's J), per image.

- L1: the target's loss on the strategy's adversarial examples (before the update).
- L2: robustness of the UPDATED target ``w_hat`` under a standard probe attack.
- L3: clean performance of ``w_hat``.

Two measures: ``"loss"`` follows the slides (L1 = CE, L2 = -CE(probe), L3 = -CE(clean));
``"accuracy"`` follows the authors' code (L1 = CE clamped to [0, 10], L2 = probe
accuracy, L3 = clean accuracy), with alpha = 4 and beta = 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from las_env.attack import eval_mode, pgd
from las_env.target import Precision, autocast
from las_env.validate import SettingError, check_number, check_whole


@dataclass
class RewardConfig:
    """Settings of the reward.

    Attributes:
        alpha, beta: weights of L2 and L3 (the authors' 4 and 2).
        use_l1, use_l2, use_l3: switch each term (the Table 6 ablation). A switched-off
            L2/L3 is not computed at all.
        measure: "accuracy" (authors' code) or "loss" (slides).
        l1_clamp: upper clamp of L1 in the "accuracy" measure (the authors' 10).
        probe_iterations: PGD iterations of the L2 probe attack (PGD-10).
        probe_epsilon, probe_step_size: the probe's radius and step; ``None`` takes the data
            set's threat model (8/255 and 2/255 for CIFAR).
        w_hat: "this_step" measures L2/L3 on the target as updated by the env's own training
            step (free); "deepcopy" reproduces the authors, who train a deep copy of the
            target one extra SGD step on the same examples and measure that.
        l1_forward: which forward of the (not yet updated) target gives L1 on a reward step.
            "train" (ours): the training step's own forward, train mode, free. "eval" (the
            authors'): one extra forward in eval mode (BatchNorm running statistics), the
            mode the attack ran in. Non-reward steps always report the free one.
        l1_clamp_scope: where the "accuracy" measure's clamp to ``[0, l1_clamp]`` applies.
            "per_image" (ours): each image's CE. "batch_mean" (the authors'): the batch-mean
            CE, their R1; per image, every CE is scaled by the same factor, so the batch mean
            of L1 is exactly ``clamp(mean CE, 0, l1_clamp)`` (the scalar the paper credit
            uses) and per-image credit still sees which image was hit hardest.
        probe_restarts: random restarts of the L2 probe attack; per image the restart with
            the highest CE is kept (the worst case), as in the authors' ``attack_pgd``.
            Ours 1, the authors' 2.
        w_hat_true_class_prob: label smoothing of the look-ahead copy's step only (the authors'
            true-class probability, ``OptimConfig.true_class_prob``), whatever the target's own
            step uses; ``None`` (ours) = the target's. The authors' LAS-AWP: 0.7 on the copy,
            plain CE on the target.
        probe_early_stop: stop the probe's PGD on each image once it is misclassified (the
            authors' early-stopping PGD: ``las_env.attack``, tau = 0); False (ours) runs every
            image for ``probe_iterations`` steps.
        pre_update_probe: on reward steps, also measure ``alpha*L2 + beta*L3`` of the target
            BEFORE the step's update, on the same batch with the same probe (reported per image
            as ``batch_terms_before``): the control variate of ``credit="unbiased"``
            (``agents/credit.py``). Costs one more probe per reward step (a PGD-
            ``probe_iterations`` attack plus two forward passes on the batch). Set by the
            training loop when the agent declares ``needs_pre_update_probe``.
    """

    alpha: float = 4.0
    beta: float = 2.0
    use_l1: bool = True
    use_l2: bool = True
    use_l3: bool = True
    measure: Literal["accuracy", "loss"] = "accuracy"
    l1_clamp: float = 10.0
    probe_iterations: int = 10
    probe_epsilon: float | None = None
    probe_step_size: float | None = None
    w_hat: Literal["this_step", "deepcopy"] = "this_step"
    l1_forward: Literal["train", "eval"] = "train"
    l1_clamp_scope: Literal["per_image", "batch_mean"] = "per_image"
    probe_restarts: int = 1
    pre_update_probe: bool = False
    w_hat_true_class_prob: float | None = None
    probe_early_stop: bool = False

    def __post_init__(self) -> None:
        if self.measure not in ("accuracy", "loss"):
            raise SettingError("measure", self.measure,
                               "must be 'accuracy' (the authors' code) or 'loss' (the slides).")
        if self.w_hat not in ("this_step", "deepcopy"):
            raise SettingError("w_hat", self.w_hat, "must be 'this_step' or 'deepcopy'.")
        weight = "(a weight of a reward term; NaN or inf would make every reward meaningless)"
        check_number("alpha", self.alpha, meaning=weight)
        check_number("beta", self.beta, meaning=weight)
        check_number("l1_clamp", self.l1_clamp, 0, low_open=True, meaning="(upper clamp of L1; the authors' 10)")
        check_whole("probe_iterations", self.probe_iterations, 1)
        pixel = "(pixel units for images in [0, 1]; null takes the data set's threat model)"
        for key in ("probe_epsilon", "probe_step_size"):
            if getattr(self, key) is not None:
                check_number(key, getattr(self, key), 0, 1, low_open=True, meaning=pixel)
        if not (self.use_l1 or self.use_l2 or self.use_l3):
            raise ValueError("All reward terms are switched off: enable at least one of use_l1, use_l2, use_l3.")
        self._check_fidelity_switches()

    def _check_fidelity_switches(self) -> None:
        if self.l1_forward not in ("train", "eval"):
            raise ValueError(f"reward.l1_forward must be 'train' (ours) or 'eval' (the authors'), got {self.l1_forward!r}.")
        if self.l1_clamp_scope not in ("per_image", "batch_mean"):
            raise ValueError(
                f"reward.l1_clamp_scope must be 'per_image' (ours) or 'batch_mean' (the authors'), "
                f"got {self.l1_clamp_scope!r}."
            )
        if isinstance(self.probe_restarts, bool) or int(self.probe_restarts) != self.probe_restarts or self.probe_restarts < 1:
            raise ValueError(f"reward.probe_restarts must be a whole number >= 1 (ours 1, the authors' 2), got {self.probe_restarts!r}.")
        self.probe_restarts = int(self.probe_restarts)
        if self.w_hat_true_class_prob is not None:
            check_number("w_hat_true_class_prob", self.w_hat_true_class_prob, 0, 1, low_open=True,
                         meaning="(the look-ahead copy's true-class probability; the authors' LAS-AWP 0.7)")

    @property
    def needs_updated_target(self) -> bool:
        return self.use_l2 or self.use_l3


@dataclass
class UpdatedTargetProbe:
    """Per-image measurements of ``w_hat`` on the training batch.

    Attributes:
        clean_loss, clean_correct: CE and correctness on the clean images (None if L3 off).
        probe_loss, probe_correct: CE and correctness under the probe attack (None if L2 off).
    """

    clean_loss: Tensor | None
    clean_correct: Tensor | None
    probe_loss: Tensor | None
    probe_correct: Tensor | None


def probe_updated_target(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: RewardConfig,
    epsilon: float,
    step_size: float,
    *,
    generator: torch.Generator | None = None,
    precision: Precision = "fp32",
) -> UpdatedTargetProbe:
    """Measure the updated target on the clean batch and under the probe attack (with
    ``cfg.probe_restarts`` restarts, each image keeping the one with the highest CE)."""
    device = x.device
    early_stop = 0 if cfg.probe_early_stop else None
    clean_loss = clean_correct = probe_loss = probe_correct = None
    with eval_mode(model):
        if cfg.use_l2:
            with autocast(device, precision):
                x_probe = pgd(model, x, y, epsilon, step_size, cfg.probe_iterations, generator=generator,
                              early_stop=early_stop)
        with torch.no_grad(), autocast(device, precision):
            if cfg.use_l3:
                logits = model(x).float()
                clean_loss = F.cross_entropy(logits, y, reduction="none")
                clean_correct = logits.argmax(1) == y
            if cfg.use_l2:
                logits = model(x_probe).float()
                probe_loss = F.cross_entropy(logits, y, reduction="none")
                probe_correct = logits.argmax(1) == y
        for _ in range(1, cfg.probe_restarts if cfg.use_l2 else 1):
            with autocast(device, precision):
                x_probe = pgd(model, x, y, epsilon, step_size, cfg.probe_iterations, generator=generator,
                              early_stop=early_stop)
            with torch.no_grad(), autocast(device, precision):
                logits = model(x_probe).float()
            loss = F.cross_entropy(logits, y, reduction="none")
            worse = loss > probe_loss  # ties keep the earlier restart
            probe_loss = torch.where(worse, loss, probe_loss)
            probe_correct = torch.where(worse, logits.argmax(1) == y, probe_correct)
    return UpdatedTargetProbe(clean_loss, clean_correct, probe_loss, probe_correct)


@dataclass
class RewardTerms:
    """Per-image reward and its terms, shape (B,). A switched-off term is zeros."""

    l1: Tensor
    l2: Tensor
    l3: Tensor
    total: Tensor


def reward_terms(cfg: RewardConfig, adv_loss: Tensor, probe: UpdatedTargetProbe | None) -> RewardTerms:
    """Combine the measurements into per-image rewards ``L1 + alpha*L2 + beta*L3``.

    ``adv_loss`` is the target's per-image CE on the strategy's examples (L1's raw form).
    With ``probe=None`` (a step that does not pay for the full reward) only L1 is set.
    """
    zeros = torch.zeros_like(adv_loss)
    accuracy = cfg.measure == "accuracy"
    l1 = (clamp_l1(adv_loss, cfg) if accuracy else adv_loss) if cfg.use_l1 else zeros
    l2 = l3 = zeros
    if probe is not None and cfg.use_l2:
        l2 = probe.probe_correct.float() if accuracy else -probe.probe_loss
    if probe is not None and cfg.use_l3:
        l3 = probe.clean_correct.float() if accuracy else -probe.clean_loss
    return RewardTerms(l1=l1, l2=l2, l3=l3, total=l1 + cfg.alpha * l2 + cfg.beta * l3)


def clamp_l1(adv_loss: Tensor, cfg: RewardConfig) -> Tensor:
    """The "accuracy" measure's L1: per-image CE clamped to ``[0, l1_clamp]`` ("per_image"),
    or scaled so its batch mean is ``clamp(mean CE, 0, l1_clamp)`` ("batch_mean", the
    authors' R1; CE >= 0, so the scale is ``min(1, l1_clamp / mean)``)."""
    if cfg.l1_clamp_scope == "per_image":
        return adv_loss.clamp(0, cfg.l1_clamp)
    mean = adv_loss.mean()
    return adv_loss * (mean.clamp(0, cfg.l1_clamp) / mean.clamp_min(torch.finfo(adv_loss.dtype).tiny))
