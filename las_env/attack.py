"""L-infinity PGD with a different (epsilon, step size, iterations) for every image.

:func:`per_image_pgd` is the adversarial example generator ``g(x, a, w)`` of LAS-AT. Its
cost is proportional to the SUM of the chosen iteration counts: images are sorted by
their count once, so at iteration ``t`` the images still attacking are a prefix of the
sorted batch and the forward/backward pass runs on a view of that prefix only. The
authors' loop (:func:`masked_pgd`) runs every image for the batch's maximum count and
masks the updates, paying ``batch size x max``.

Early stopping (``early_stop=tau``, one mechanism for the authors' reward probe and evaluation
attacks, tau = 0, and for FAT's tau > 0, also per image: the strategy column ``early_stop_tau``):
before each step an image is checked; once the model misclassifies it and it has already taken
``tau`` steps while misclassified, it is frozen where it is. The forward pass of the check is the
step's own, and frozen images leave the batch, so the cost is the iterations actually run.

Cost: pass ``count=GradientCount()`` and the attack adds the input-gradient computations it made
(summed over images) from numbers it already has on the host (the sorted counts; the number of
images still running), so counting never adds a host-device synchronisation.

Clip order (``clip_start``): ours clips the random start into each image's own ball before the
first step; ``clip_start=False`` is the authors' order (the start only kept inside [0, 1], the
first step's projection brings it into the ball), which matters when the start is drawn in a
larger ball than the image's (``attack_start=threat_ball``).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from las_env.sharding import Shard

Loss = Literal["ce", "margin", "kl"]


@dataclass
class GradientCount:
    """Input-gradient computations (one forward and backward per image and step) attacks made,
    summed over images; a host int each attack adds to (see the module docstring)."""

    gradients: int = 0


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode (BatchNorm statistics frozen) and restore its mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def attack_loss(logits: Tensor, y: Tensor, loss: Loss = "ce") -> Tensor:
    """Per-image loss an attack ascends: cross-entropy, the C&W margin ``max_{j != y} z_j - z_y``,
    or (``"kl"``, TRADES) ``KL(y || softmax(logits))`` where ``y`` is then the clean images'
    probabilities ``(B, K)`` instead of labels."""
    if loss == "kl":
        return (torch.special.xlogy(y, y) - y * F.log_softmax(logits, dim=1)).sum(1)
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if loss == "margin":
        true = logits.gather(1, y[:, None]).squeeze(1)
        others = logits.scatter(1, y[:, None], float("-inf"))
        return others.amax(1) - true
    raise ValueError(f"Unknown attack loss {loss!r}; use 'ce', 'margin' or 'kl'.")


def random_start(x: Tensor, epsilon: Tensor, generator: torch.Generator | None = None,
                 shard: Shard | None = None) -> Tensor:
    """A uniform random perturbation inside each image's own L-inf ball (``epsilon``: (B,)).
    With ``shard`` (several processes) the noise is drawn for the global batch and this rank's
    rows kept (:meth:`las_env.sharding.Shard.noise`)."""
    u = (shard or Shard()).noise(x.shape, generator, x.device, x.dtype)
    return (2 * u - 1) * epsilon.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


_random_start = random_start  # pgd() has a parameter of that name


def per_image_pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    epsilon: Tensor,
    step_size: Tensor,
    iterations: Tensor,
    *,
    start: Tensor | None = None,
    generator: torch.Generator | None = None,
    loss: Loss = "ce",
    shard: Shard | None = None,
    early_stop: int | Tensor | None = None,
    clip_start: bool = True,
    count: GradientCount | None = None,
) -> Tensor:
    """Adversarial examples with per-image settings.

    Args:
        model: the classifier attacked; put in eval mode during the attack, its previous
            mode restored after. No parameter gradient is accumulated.
        x: clean images ``(B, C, H, W)`` in ``[0, 1]``.
        y: labels ``(B,)`` (for ``loss="kl"``: the clean probabilities ``(B, K)``).
        epsilon: L-inf radius per image ``(B,)``.
        step_size: sign-gradient step per image ``(B,)``.
        iterations: number of steps per image ``(B,)`` (0 leaves the random start).
        start: initial perturbation ``(B, C, H, W)``; drawn uniformly inside each image's
            ball from ``generator`` when omitted.
        loss: ``"ce"`` (cross-entropy), ``"margin"`` (C&W-inf) or ``"kl"`` (TRADES).
        shard: under several processes, this rank's rows of the global batch (the random start
            is drawn for the global batch); ``None``: one process.
        early_stop: ``None`` (ours: every image runs its full count) or ``tau >= 0``: an image
            is frozen at the check before a step once it is misclassified and has taken ``tau``
            steps while misclassified (the authors' early stop: 0; FAT: its tau). A whole number,
            or one per image ``(B,)`` (long, each >= 0; not checked here: the grid checks it).
            Needs labels.
        clip_start: clip the start into each image's ball before the first step (ours), or only
            after it (``False``, the authors').
        count: if given, the gradient computations made are added to it.

    Returns:
        ``x + delta`` with ``|delta|_inf <= epsilon`` per image, clipped to ``[0, 1]``.
    """
    b = x.shape[0]
    for name, t in (("epsilon", epsilon), ("step_size", step_size), ("iterations", iterations)):
        if t.shape != (b,):
            raise ValueError(f"{name} must have shape ({b},) (one value per image), got {tuple(t.shape)}.")
    if start is None:
        start = random_start(x, epsilon.to(x.device), generator, shard)
    elif start.shape != x.shape:
        raise ValueError(f"start must have the images' shape {tuple(x.shape)}, got {tuple(start.shape)}.")
    if early_stop is not None:
        x_adv, gradients = _early_stopping_pgd(model, x, y, epsilon, step_size, iterations, start, loss, early_stop,
                                               clip_start)
        if count is not None:
            count.gradients += gradients
        return x_adv

    # Sort once by iteration count (descending): the images still attacking at step t are
    # then the prefix [:n_t], and slicing a prefix is a view, not a gather.
    order = torch.argsort(iterations, descending=True, stable=True)
    counts = iterations[order].tolist()  # the one host sync: slice sizes must be known on the host
    if count is not None:
        count.gradients += sum(counts)
    return _sorted_pgd(model, x, y, epsilon, step_size, start, counts, order, loss, clip_start)


def _ball(x: Tensor, epsilon: Tensor, step_size: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-image ``(lower, upper, step)`` bounds of the projection, as ``(B, 1, ..., 1)``-broadcast
    tensors in ``x``'s dtype, and ``eps`` likewise."""
    shape = (x.shape[0], *([1] * (x.dim() - 1)))
    eps = epsilon.to(device=x.device, dtype=x.dtype).view(shape)
    step = step_size.to(device=x.device, dtype=x.dtype).view(shape)
    return (x - eps).clamp_(min=0), (x + eps).clamp_(max=1), step, eps


def _first_point(x: Tensor, start: Tensor, eps: Tensor, lower: Tensor, upper: Tensor, clip_start: bool) -> Tensor:
    """Where the attack starts: in the image's ball (ours) or, ``clip_start=False``, only in [0, 1]."""
    if clip_start:
        return torch.max(torch.min(x + start.clamp(-eps, eps), upper), lower)
    return (x + start).clamp(0, 1)


def _early_stopping_pgd(model: nn.Module, x: Tensor, y: Tensor, epsilon: Tensor, step_size: Tensor,
                        iterations: Tensor, start: Tensor, loss: Loss, tau: int | Tensor,
                        clip_start: bool) -> tuple[Tensor, int]:
    """:func:`per_image_pgd` with early stopping (see the module docstring): the still-running
    images are gathered by index each step (one host read per step: how many still run).
    Returns the examples and the gradient computations made (the images running at each step)."""
    if loss == "kl":
        raise ValueError("early_stop needs labels (misclassified = argmax differs from the label); the KL "
                         "attack (TRADES) has clean probabilities instead: use early_stop=None.")
    left = iterations.to(x.device).long().clone()  # steps each image may still take
    if isinstance(tau, Tensor):
        if tau.shape != left.shape or tau.is_floating_point():
            raise ValueError(f"a per-image early_stop must be a whole-number tensor of shape {tuple(left.shape)}, "
                             f"got {tau.dtype} of shape {tuple(tau.shape)}.")
        patience = tau.to(device=x.device, dtype=torch.long).clone()  # steps it may still take while misclassified
    elif isinstance(tau, bool) or int(tau) != tau or tau < 0:
        raise ValueError(f"early_stop must be None (off) or a whole number tau >= 0, got {tau!r}.")
    else:
        patience = torch.full_like(left, int(tau))
    lower, upper, step, eps = _ball(x, epsilon, step_size)
    x_adv = _first_point(x, start, eps, lower, upper, clip_start)
    running = torch.nonzero(left > 0).squeeze(1)
    gradients = 0
    with eval_mode(model), torch.enable_grad():
        while running.numel() > 0:
            gradients += running.numel()
            xa = x_adv[running].detach().requires_grad_(True)
            yr = y[running]
            logits = model(xa)
            wrong = logits.argmax(1) != yr
            go = ~(wrong & (patience[running] == 0))
            (grad,) = torch.autograd.grad(attack_loss(logits, yr, loss).sum(), xa)
            stepped = torch.max(torch.min(xa.detach() + step[running] * grad.sign(), upper[running]), lower[running])
            x_adv[running] = torch.where(go.view(-1, *([1] * (x.dim() - 1))), stepped, xa.detach())
            patience[running] -= (wrong & go).long()
            left[running] -= 1
            running = running[go & (left[running] > 0)]
    return torch.max(torch.min(x_adv, upper), lower).detach(), gradients


def _sorted_pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    epsilon: Tensor,
    step_size: Tensor,
    start: Tensor,
    counts: list[int],
    order: Tensor | None,
    loss: Loss,
    clip_start: bool = True,
) -> Tensor:
    """The PGD loop of :func:`per_image_pgd` once the images are ordered by descending count.

    ``counts`` (host ints, descending) are the iteration counts in that order; ``order`` is the
    permutation that sorts the batch, or ``None`` when the batch already is in order (uniform
    counts: no gather, no scatter, no host read).
    """
    b = x.shape[0]
    shape = (b, *([1] * (x.dim() - 1)))
    eps = epsilon.to(device=x.device, dtype=x.dtype)
    step = step_size.to(device=x.device, dtype=x.dtype)
    if order is not None:
        x, y, eps, step, start = x[order], y[order], eps[order], step[order], start[order]
    eps_s, step_s = eps.view(shape), step.view(shape)
    lower = (x - eps_s).clamp_(min=0)
    upper = (x + eps_s).clamp_(max=1)
    x_adv = _first_point(x, start, eps_s, lower, upper, clip_start)

    ascending = counts[::-1]
    max_iterations = counts[0] if counts else 0
    with eval_mode(model), torch.enable_grad():
        for t in range(max_iterations):
            n = b - bisect.bisect_right(ascending, t)  # images with more than t iterations
            xa = x_adv[:n].detach().requires_grad_(True)
            objective = attack_loss(model(xa), y[:n], loss).sum()
            (grad,) = torch.autograd.grad(objective, xa)
            # In place, no allocation: xa.detach() shares x_adv[:n]'s storage, so the step and
            # the projection (lower <= upper, so clamp == max(min(., upper), lower)) write x_adv.
            xa.detach().add_(grad.sign_().mul_(step_s[:n])).clamp_(lower[:n], upper[:n])
    if not clip_start:  # images with no step are still at their unclipped start
        x_adv = torch.max(torch.min(x_adv, upper), lower)

    if order is None:
        return x_adv.detach()
    out = torch.empty_like(x_adv)
    out[order] = x_adv
    return out.detach()


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    epsilon: float,
    step_size: float,
    iterations: int,
    *,
    random_start: bool = True,
    loss: Loss = "ce",
    generator: torch.Generator | None = None,
    shard: Shard | None = None,
    early_stop: int | None = None,
    count: GradientCount | None = None,
) -> Tensor:
    """Plain PGD with the same settings for every image (the evaluation and probe attack).

    Same result as :func:`per_image_pgd` with constant settings, without its sort: the counts
    are known on the host, so there is no host-device synchronisation and no gather/scatter.
    ``early_stop=tau`` freezes misclassified images (module docstring; the authors': 0);
    ``count`` gets the gradient computations made added.
    """
    b = x.shape[0]
    eps = torch.full((b,), float(epsilon), device=x.device)
    step = torch.full((b,), float(step_size), device=x.device)
    start = _random_start(x, eps, generator, shard) if random_start else torch.zeros_like(x)
    if early_stop is not None:
        counts = torch.full((b,), int(iterations), device=x.device, dtype=torch.long)
        x_adv, gradients = _early_stopping_pgd(model, x, y, eps, step, counts, start, loss, early_stop, True)
        if count is not None:
            count.gradients += gradients
        return x_adv
    if count is not None:
        count.gradients += b * int(iterations)
    return _sorted_pgd(model, x, y, eps, step, start, [int(iterations)] * b, None, loss)


def masked_pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    epsilon: Tensor,
    step_size: Tensor,
    iterations: Tensor,
    *,
    start: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The authors' per-image PGD: every image runs for the batch's maximum count and
    updates are masked once its own count is spent. Same result as :func:`per_image_pgd`,
    kept as the reference the benchmark compares against."""
    if start is None:
        start = random_start(x, epsilon.to(x.device), generator)
    shape = (x.shape[0], *([1] * (x.dim() - 1)))
    eps = epsilon.to(x.dtype).view(shape)
    step = step_size.to(x.dtype).view(shape)
    lower, upper = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    x_adv = torch.max(torch.min(x + start.clamp(-eps, eps), upper), lower)
    with eval_mode(model), torch.enable_grad():
        for t in range(int(iterations.max())):
            xa = x_adv.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(model(xa), y, reduction="sum"), xa)
            active = (iterations > t).to(x.dtype).view(shape)
            stepped = xa.detach() + active * step * grad.sign()
            x_adv = torch.max(torch.min(stepped, upper), lower)
    return x_adv.detach()
