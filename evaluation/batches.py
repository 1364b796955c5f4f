"""Small helpers shared by the PGD evaluator and the AutoAttack runner: batches, devices, seeds."""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from las_env.attack import eval_mode


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters live (the CPU for a parameter-free model)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def slices(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices of ``batch_size`` covering ``range(n)`` (the last one may be shorter)."""
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def attack_generator(device: torch.device, seed: int, salt: str = "") -> torch.Generator:
    # One generator per attack, seeded from (seed, attack name): an attack's result does not
    # depend on which other attacks ran before it, and the global RNG is left alone.
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + zlib.crc32(salt.encode())) % (2**63))
    return g


@torch.no_grad()
def predict(model: nn.Module, x: Tensor) -> Tensor:
    """Predicted labels of ``x`` in eval mode (the model's mode is restored after)."""
    with eval_mode(model):
        return model(x).argmax(1)


def check_inputs(x: Tensor, y: Tensor, eps: float) -> None:
    """Refuse inputs the numbers would be meaningless for (shapes, no images, bad eps, not in [0, 1])."""
    if x.dim() != 4 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"Expected images (N, C, H, W) and labels (N,), got {tuple(x.shape)} and {tuple(y.shape)}.")
    if x.shape[0] == 0:
        raise ValueError("No images to evaluate (n = 0).")
    if not eps >= 0 or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}.")
    if float(x.min()) < 0 or float(x.max()) > 1:
        # Epsilons are in pixel units of [0, 1] images; normalised inputs would make them meaningless.
        raise ValueError(f"Images must lie in [0, 1] (no normalisation), got values in [{float(x.min()):.3g}, "
                         f"{float(x.max()):.3g}].")

