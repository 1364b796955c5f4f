"""The target's optimiser settings and the helpers every training step shares: the settings
(:class:`OptimConfig`), the smoothed training loss (:func:`training_loss`) and mixed precision
(:func:`autocast`). Imported by :mod:`las_env.target` (the optimiser itself) and by
:mod:`las_env.methods` (the losses), which therefore never import each other back."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from las_env.validate import SettingError, check_number, check_numbers

Precision = Literal["fp32", "bf16", "fp16"]


@dataclass
class OptimConfig:
    """Target-network optimisation settings (SPEC section 2 gives the authors' values).

    Attributes:
        lr: peak learning rate (0.1 for CIFAR).
        momentum, weight_decay: SGD settings (0.9, 5e-4).
        schedule: "piecewise" (x ``gamma`` at each milestone), "cosine" or "constant";
            stepped per iteration over the whole budget.
        milestones: fractions of the budget where "piecewise" decays (the authors' 99/110
            and 104/110 epochs).
        gamma: decay factor at each milestone.
        label_smoothing: PyTorch's ``label_smoothing`` e of the training loss: e is spread
            over ALL K classes, so the true class keeps ``1 - e + e/K``. 0 = plain CE.
        true_class_prob: the authors' label smoothing, their "factor" f (SPEC section 8):
            the target distribution keeps probability f on the true class and spreads
            ``1 - f`` evenly over the other K-1 classes. ``None`` (ours, the default) = off.
            Their LAS-AT code uses 0.7 on CIFAR-10, 0.6 on CIFAR-100, 0.8 on Tiny-ImageNet,
            never mentioned in the paper. Equivalent to PyTorch's e = (1 - f) * K / (K - 1)
            (1/3 for f = 0.7, K = 10), NOT to e = f. Applies to the target's training step
            and to the authors' deep-copied ``w_hat`` step. Exclusive with ``label_smoothing``.
        grad_clip: the largest gradient norm (over all parameters) of a step; ``None`` (ours, the
            default) = no clipping. The authors' Tiny-ImageNet script clips the target's step to 10
            (``clip_grad_norm_``), their CIFAR scripts do not. Applies wherever these settings
            step a model: the target's step and the deep-copied ``w_hat`` step.
    """

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "piecewise"
    milestones: tuple[float, ...] = (99 / 110, 104 / 110)
    gamma: float = 0.1
    label_smoothing: float = 0.0
    true_class_prob: float | None = None
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        if self.grad_clip is not None:
            check_number("grad_clip", self.grad_clip, 0, low_open=True,
                         meaning="(the largest gradient norm of a step; null = no clipping; the authors' Tiny-ImageNet: 10)")
        check_number("lr", self.lr, 0, low_open=True, meaning="(the peak learning rate; CIFAR: 0.1)")
        check_number("momentum", self.momentum, 0, 1, high_open=True, meaning="(SGD momentum; CIFAR: 0.9)")
        check_number("weight_decay", self.weight_decay, 0, meaning="(CIFAR: 5e-4)")
        check_number("gamma", self.gamma, 0, 1, low_open=True, meaning="(the piecewise schedule's decay factor)")
        check_number("label_smoothing", self.label_smoothing, 0, 1, high_open=True)
        if self.schedule not in ("piecewise", "cosine", "constant"):
            raise SettingError("schedule", self.schedule, "must be piecewise, cosine or constant.")
        if isinstance(self.milestones, (str, bytes)) or not hasattr(self.milestones, "__iter__"):
            raise SettingError("milestones", self.milestones,
                               "must be a list of fractions of the budget, e.g. [0.5, 0.75].")
        check_numbers("milestones", self.milestones, 0, 1, meaning="(fractions of the whole training budget)")
        self.milestones = tuple(float(m) for m in self.milestones)
        self._check_true_class_prob()

    def _check_true_class_prob(self) -> None:
        f = self.true_class_prob
        if f is None:
            return
        if not 0 < f <= 1:
            raise ValueError(
                f"optim.true_class_prob={f}: the authors' label-smoothing factor is the probability kept on "
                f"the true class, in (0, 1] (their 0.7 CIFAR-10, 0.6 CIFAR-100, 0.8 Tiny-ImageNet); null = off."
            )
        if self.label_smoothing:
            raise ValueError(
                f"optim.label_smoothing={self.label_smoothing} and optim.true_class_prob={f} are both set: they are "
                f"two spellings of label smoothing (PyTorch's e spreads e over all K classes; the authors' f keeps "
                f"f on the true class), so one must be off. For the authors' setting use true_class_prob={f} "
                f"label_smoothing=0 (PyTorch's equivalent would be e = (1-f)*K/(K-1), not e = f)."
            )


def training_loss(logits: Tensor, y: Tensor, optim: OptimConfig) -> Tensor:
    """The target's mean training loss on ``logits`` (B, K): cross-entropy against the
    smoothed targets ``optim`` asks for (PyTorch's ``label_smoothing`` or the authors'
    ``true_class_prob``; see :class:`OptimConfig`)."""
    f = optim.true_class_prob
    if f is None:
        return F.cross_entropy(logits, y, label_smoothing=optim.label_smoothing)
    # -sum_j q_j log p_j with q_y = f, q_j = (1 - f) / (K - 1) for j != y.
    log_p = F.log_softmax(logits, dim=1)
    on_true = log_p.gather(1, y[:, None]).squeeze(1)
    on_others = log_p.sum(1) - on_true
    k = logits.shape[1]
    off = (1 - f) / (k - 1) if k > 1 else 0.0
    return -(f * on_true + off * on_others).mean()


def autocast(device: torch.device, precision: Precision):
    """The autocast context for ``precision`` on ``device`` (a no-op for fp32)."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
