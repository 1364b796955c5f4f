"""The strategy network p(a | x; theta): one categorical distribution per attack parameter.

It sees the clean (augmented) image only, never the label (SPEC section 2), runs it
through a classifier backbone's ``features`` and puts one linear head per action column
on top::

    x (B, C, H, W) -> backbone.features -> (B, F) -> head_step_size  -> logits (B, n_step)
                                                  -> head_iterations -> logits (B, n_iter)
                                                  -> head_epsilon    -> logits (B, n_eps)

The heads are in action-column order (``StrategySpace.columns``): one head per column of the
space, whatever its columns are (the attack's three, then e.g. ``trades_beta``).

Initialisation: the heads start at ZERO (weights and biases) by default, so the initial
strategy is exactly uniform over the grid for every image. A randomly initialised head
would start from an arbitrary, image-dependent preference that the strategy must first
unlearn (with the paper's SGD at lr 1e-4 that takes many updates); uniform is the
maximum-entropy start, which is what an exploring policy wants. Zero heads do not stall
learning: the heads' gradient is ``features * dlogits`` (non-zero), and the backbone
receives gradient from the second update on, once the heads are non-zero.
``zero_init_heads=False`` gives PyTorch's default Linear initialisation instead.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributions import Categorical

from las_env.models import build_model


class StrategyNet(nn.Module):
    """Backbone features + one categorical head per action column (step size, iterations,
    epsilon, then the grid's extra columns, e.g. LAS-TRADES' ``trades_beta``: its 4th head).

    Args:
        backbone: a :func:`las_env.models.build_model` name: ``"resnet18"`` (the authors'
            strategy network on CIFAR), ``"resnet18_pool2"`` (theirs on Tiny-ImageNet: 2048
            features), ``"small_cnn"`` (digits), ``"preact_resnet18"``, ...
        in_channels: channels of the observed images.
        nvec: number of values per action column, ``StrategySpace.nvec``.
        zero_init_heads: start every head at zero, i.e. a uniform strategy (see module doc).
        backbone_init: the backbone's initialisation, ``"kaiming"`` (ours) or ``"pytorch"``
            (the authors' ResNet-18: PyTorch's layer defaults); :func:`las_env.models.build_model`.

    Attributes:
        backbone: the feature extractor; its classifier layer is replaced by the identity
            (the strategy never uses it, and dead parameters would only bloat checkpoints).
        heads: ``nn.ModuleList`` of ``nn.Linear(feature_dim, nvec[j])``, column order.
        nvec: the grid sizes the heads were built for.
    """

    def __init__(
        self,
        backbone: str,
        in_channels: int,
        nvec: tuple[int, ...],
        *,
        zero_init_heads: bool = True,
        backbone_init: str = "kaiming",
    ) -> None:
        super().__init__()
        if len(nvec) < 3 or any(int(n) < 1 for n in nvec):
            raise ValueError(f"nvec must be positive grid sizes (step size, iterations, epsilon, then any extra "
                             f"columns), got {nvec}.")
        self.nvec = tuple(int(n) for n in nvec)
        net = build_model(backbone, in_channels, num_classes=1, init=backbone_init)
        net.linear = nn.Identity()
        self.backbone = net
        self.backbone_name = backbone
        self.feature_dim = int(net.feature_dim)
        self.heads = nn.ModuleList(nn.Linear(self.feature_dim, n) for n in self.nvec)
        if zero_init_heads:
            for head in self.heads:
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Unnormalised logits of the heads, one ``(B, nvec[j])`` per action column."""
        h = self.backbone.features(x)
        return tuple(head(h) for head in self.heads)  # type: ignore[return-value]

    def distribution(self, x: Tensor) -> tuple[Categorical, Categorical, Categorical]:
        """The per-image categorical distributions, one per action column."""
        # validate_args=False: argument validation calls .all() on a tensor, a host
        # synchronisation on every step on a GPU, for logits we produce ourselves.
        return tuple(Categorical(logits=z, validate_args=False) for z in self(x))  # type: ignore[return-value]

    @torch.no_grad()
    def probs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-image probabilities of every grid value (for analysis, e.g. the paper's Fig. 4/5)."""
        return tuple(z.softmax(dim=1) for z in self(x))  # type: ignore[return-value]

    def sample(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Sample one action per image.

        Returns:
            actions: ``(B, len(nvec))`` long grid indices (step size, iterations, epsilon, extras).
            log_prob: ``(B,)`` log p(a_i | x_i), the sum of the heads' log-probabilities
                (the heads are independent given x, so the joint is their product).
            entropy: ``(B,)`` entropy of the joint distribution, the sum of the heads' entropies.
        Both carry autograd history when called with gradients enabled.
        """
        dists = self.distribution(x)
        actions = sample_categoricals([d.logits for d in dists], generator)
        log_prob = sum(d.log_prob(actions[:, j]) for j, d in enumerate(dists))
        entropy = sum(d.entropy() for d in dists)
        return actions, log_prob, entropy  # type: ignore[return-value]


def sample_categoricals(logits: list[Tensor], generator: torch.Generator | None = None) -> Tensor:
    """One sample per row from each ``(B, n_j)`` logits tensor, as a ``(B, len(logits))`` long tensor.

    Gumbel-max (argmax of logits + Gumbel noise) instead of ``Categorical.sample``: it takes
    an explicit ``torch.Generator`` (so the agent's sampling is reproducible and resumable
    without touching the global RNG) and draws the noise of all heads in one call.
    """
    sizes = [z.shape[1] for z in logits]
    ref = logits[0]
    u = torch.rand((ref.shape[0], sum(sizes)), generator=generator, device=ref.device, dtype=torch.float32)
    # u in [0, 1): clamp away 0 so -log(-log(u)) is finite (u = 0 would only give -inf anyway).
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
    columns = [
        (z.detach().float() + g).argmax(dim=1)
        for z, g in zip(logits, gumbel.split(sizes, dim=1))
    ]
    return torch.stack(columns, dim=1)
