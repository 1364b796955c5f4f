"""Credit assignment for REINFORCE on LAS-AT's strategy: which objective each mode estimates.

The strategy samples one action per image, independently given the images:
``p(a | x; theta) = prod_i p(a_i | x_i; theta)``. The paper's objective on a batch of B images is

    J(theta) = E_a[ mean_i L1_i + alpha * mean_i L2_i + beta * mean_i L3_i ]
             = E_a[ mean_i L1_i + G(a) ],        G(a) = alpha * L2bar(w_hat(a)) + beta * L3bar(w_hat(a)).

``L1_i`` (the target's loss on image i's adversarial example) depends on ``a_i`` only: the
attack runs the target in eval mode, image by image. The batch terms ``G`` depend on ALL the
actions, through the one shared update ``w -> w_hat(a)``: image i's own L2_i/L3_i is no more
"its" reward than image j's. The score-function identity gives

    grad J = E_a[ (mean_i L1_i + G(a)) * sum_j grad log p(a_j | x_j) ].

For ``i != j``, ``E[L1_i grad log p(a_j)] = E[L1_i] E[grad log p(a_j)] = 0`` (independent
factors, and a score has mean 0), so the other images' L1 is pure noise for image j:

    grad J = E_a[ sum_j (L1_j / B + G(a)) grad log p(a_j) ]
           = E_a[ (1/B) sum_j A_j grad log p(a_j) ]      with   A_j = L1_j + B * G(a).

The agent's loss is ``-mean_j(A_j log p(a_j))``, whose gradient is exactly the bracket above.
Any baseline ``b_j`` that does not depend on ``a_j`` may be subtracted from ``A_j`` without bias,
since ``E[b_j grad log p(a_j)] = E[b_j] E[grad log p(a_j)] = 0``. ``credit="unbiased"`` uses

    A_j = (L1_j - mean_{i != j} L1_i) + B * (G(w_hat) - G(w)),

- the leave-one-out mean of the OTHER images' L1 (independent of ``a_j``; it tracks the batch's
  current level of L1, which a running mean from past batches would lag); with B = 1 there is
  no other image and no L1 baseline;
- ``G(w)``: the same batch terms measured on the NOT-yet-updated target ``w`` on the same batch
  (same probe attack, same clean images). It is measured before this step's attack, so it does
  not depend on this batch's actions; and it is strongly correlated with ``G(w_hat)`` (same
  images, same probe, a network one SGD step away), so ``G(w_hat) - G(w)`` keeps the effect of
  the update and drops most of the batch's difficulty and the probe's luck. It costs one extra
  probe per reward step (one PGD-``probe_iterations`` attack and two forward passes on the
  batch, i.e. as much again as the L2/L3 measurement itself), requested from the env through
  ``RewardConfig.pre_update_probe`` (the agent declares ``needs_pre_update_probe = True`` and
  the training loop passes it on).

Normalisation (``normalize_advantages``): ``A_j / s`` with ``s`` the running RMS of past
updates' advantages only (1 on the first update). A positive factor fixed before the batch is
drawn leaves the direction of the expected gradient unchanged, so the estimate stays unbiased
for a positive multiple of grad J; a scale computed from the current batch would not.

The other modes, and what they estimate:

- ``"paper"`` (the authors'): ``A_j = R = mean_i r_i = mean_i L1_i + G`` for every image, no
  baseline. ``E[(1/B) sum_j R grad log p(a_j)] = grad J / B``: unbiased up to the factor
  ``1/B``, but every image's credit carries the other B-1 images' L1 and the whole level of G as
  noise (no baseline), so its variance is the largest of the three.
- ``"per_image"`` (ours, earlier default): ``A_j = r_j - b = L1_j + alpha*L2_j + beta*L3_j - b``
  with ``b`` a running mean from past batches. It keeps only the diagonal ``i = j`` of the
  batch terms' cross-effects: ``E[(1/B) sum_j (alpha L2_j + beta L3_j) grad log p(a_j)]`` drops
  the effect of ``a_j`` on the other images' L2/L3 through the shared update, which is nearly
  all of it (image j's own share is 1/B of the update). It therefore estimates the gradient of
  ``E[mean_i L1_i]`` plus roughly ``1/B`` of ``grad E[G]``: in effect the "L1 only" ablation,
  with low variance. Biased for J.

Limits of the "unbiased" claim, stated once: (1) gradient-norm clipping (the authors' 1.0) is
nonlinear, so any estimator is biased on the updates where it binds; (2) with our L1 taken from
the target's train-mode training forward, BatchNorm's batch statistics couple the images'
L1 weakly (an O(1/B) effect), which the L1 part above ignores, as ``per_image`` does; the
authors' eval-mode L1 removes the coupling.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Credit = Literal["paper", "per_image", "unbiased"]
CREDITS: tuple[str, ...] = ("paper", "per_image", "unbiased")


def paper_advantages(rewards: Tensor) -> Tensor:
    """The authors' credit: the batch's one scalar reward ``mean_i r_i`` for every image.

    ``rewards`` is ``(..., B)``; the result has its shape. Unbiased for ``grad J / B``.
    """
    return rewards.mean(-1, keepdim=True).expand_as(rewards)


def per_image_advantages(rewards: Tensor, baseline: Tensor | float) -> Tensor:
    """Our earlier credit: each image's own reward minus a baseline from past batches.

    Biased for grad J (it keeps only image i's own share of the batch terms; see the module
    docstring).
    """
    return rewards - baseline


def leave_one_out_mean(values: Tensor) -> Tensor:
    """``mean_{i != j} values_i`` for each ``j`` along the last dimension (zeros when B = 1)."""
    b = values.shape[-1]
    if b == 1:
        return values.new_zeros(values.shape)
    return (values.sum(-1, keepdim=True) - values) / (b - 1)


def unbiased_advantages(l1: Tensor, batch_terms: Tensor, batch_terms_before: Tensor) -> Tensor:
    """``A_j = (L1_j - mean_{i != j} L1_i) + B * (mean_i g_i - mean_i g0_i)``, unbiased for grad J.

    Args:
        l1: per-image L1, ``(..., B)``.
        batch_terms: per-image ``alpha * L2_i + beta * L3_i`` of the updated target ``w_hat``
            (``rewards - l1``), ``(..., B)``.
        batch_terms_before: the same terms of the target before this step's update (the control
            variate; independent of this batch's actions), ``(..., B)``.

    Returns:
        ``(..., B)`` advantages; the agent's loss is ``-mean_j(A_j log p(a_j))``.
    """
    b = l1.shape[-1]
    shared = b * (batch_terms.mean(-1, keepdim=True) - batch_terms_before.mean(-1, keepdim=True))
    return (l1 - leave_one_out_mean(l1)) + shared


class CreditStats:
    """The running statistics of the credit (on the device, so updating them never synchronises).

    ``baseline``: EMA (``momentum``) of the batch-mean reward, initialised from the first batch and
    moved AFTER use, so the baseline subtracted on an update saw only past batches (``per_image``).
    ``advantage_sq``: EMA of the squared advantages, the scale ``s**2`` they are divided by when
    ``normalize``: with ``per_image`` the current batch included, with ``unbiased`` past updates only
    (1 on the first), so the scaling adds no bias. ``paper`` advantages are never rescaled.
    """

    def __init__(self, device: torch.device, momentum: float, normalize: bool) -> None:
        self.baseline = torch.zeros((), device=device)
        self.advantage_sq = torch.ones((), device=device)
        self.started = False  # the first update initialises them from its batch
        self.momentum, self.normalize = momentum, normalize

    def advantages(self, credit: Credit, rewards: Tensor, l1: Tensor | None = None,
                   before: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(advantage (B,), scale, baseline used, batch-mean reward)`` of one update; ``l1`` and
        ``before`` (the pre-update batch terms) are ``credit="unbiased"``'s inputs."""
        m, one = self.momentum, torch.ones((), device=rewards.device)
        batch_mean = rewards.mean()
        if not self.started:
            self.baseline.copy_(batch_mean)
        baseline_used = self.baseline.clone()
        if credit == "paper":
            # The authors: the batch's one scalar reward for every image, no baseline.
            advantage, scale = paper_advantages(rewards), one
        elif credit == "unbiased":
            advantage = unbiased_advantages(l1, rewards - l1, before)
            scale = one
            if self.normalize:
                scale = self.advantage_sq.sqrt().clamp_min(1e-6) if self.started else one
                self._track(advantage.square().mean())
                advantage = advantage / scale
        else:
            advantage, scale = per_image_advantages(rewards, baseline_used), one
            if self.normalize:
                self._track(advantage.square().mean())
                # Floor: a batch whose rewards all equal the baseline has nothing to say.
                scale = self.advantage_sq.sqrt().clamp_min(1e-6)
                advantage = advantage / scale
        # The baseline moves after use, so the one subtracted above saw only past batches.
        if self.started:
            self.baseline.mul_(m).add_(batch_mean, alpha=1 - m)
        self.started = True
        return advantage, scale, baseline_used, batch_mean

    def _track(self, sq: Tensor) -> None:
        if self.started:
            self.advantage_sq.mul_(self.momentum).add_(sq, alpha=1 - self.momentum)
        else:
            self.advantage_sq.copy_(sq)
