"""L-infinity PGD with a different (epsilon, step size, iterations) for every image.

:func:`per_image_pgd` is the adversarial example generator ``g(x, a, w)`` of LAS-AT. Its
cost is proportional to the SUM of the chosen iteration counts: images are sorted by
their count once, so at iteration ``t`` the images still attacking are a prefix of the
sorted batch and the forward/backward pass runs on a view of that prefix only. The
authors' loop (:func:`masked_pgd`) runs every image for the batch's maximum count and
masks the updates, paying ``batch size x max``.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from las_env.sharding import Shard

Loss = Literal["ce", "margin", "kl"]


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

    # Sort once by iteration count (descending): the images still attacking at step t are
    # then the prefix [:n_t], and slicing a prefix is a view, not a gather.
    order = torch.argsort(iterations, descending=True, stable=True)
    counts = iterations[order].tolist()  # the one host sync: slice sizes must be known on the host
    return _sorted_pgd(model, x, y, epsilon, step_size, start, counts, order, loss)


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
    x_adv = torch.max(torch.min(x + start.clamp(-eps_s, eps_s), upper), lower)

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
) -> Tensor:
    """Plain PGD with the same settings for every image (the evaluation and probe attack).

    Same result as :func:`per_image_pgd` with constant settings, without its sort: the counts
    are known on the host, so there is no host-device synchronisation and no gather/scatter.
    """
    b = x.shape[0]
    eps = torch.full((b,), float(epsilon), device=x.device)
    step = torch.full((b,), float(step_size), device=x.device)
    start = _random_start(x, eps, generator, shard) if random_start else torch.zeros_like(x)
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
