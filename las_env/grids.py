"""The data sets' strategy grids and threat models.

The space itself (columns, value tables, index <-> value conversion) is
:class:`las_env.strategy_space.StrategySpace`; ``StrategyGrid`` is its earlier name, re-exported here.
All step sizes and epsilons are in pixel units (images live in ``[0, 1]``).
"""

from __future__ import annotations

from dataclasses import dataclass

from las_env.strategy_space import ACTION_COLUMNS, ATTACK_COLUMNS, StrategyGrid, StrategySpace  # noqa: F401


@dataclass(frozen=True)
class ThreatModel:
    """The evaluation threat model of a data set: L-infinity ball of radius ``epsilon``.

    ``step_size`` is the PGD step used by evaluation and by the L2 reward probe
    (2/255 for CIFAR's 8/255, i.e. epsilon / 4).
    """

    epsilon: float
    step_size: float
    description: str


def _range(start: int, stop: int, scale: float = 1.0) -> tuple[float, ...]:
    return tuple(v * scale for v in range(start, stop + 1))


# The authors' grids (SPEC section 2), in /255 units, inclusive.
CIFAR10_GRID = StrategyGrid(_range(1, 5, 1 / 255), tuple(range(3, 15)), _range(3, 15, 1 / 255))
CIFAR100_GRID = StrategyGrid(_range(1, 5, 1 / 255), tuple(range(3, 13)), _range(3, 15, 1 / 255))
TINY_IMAGENET_GRID = CIFAR10_GRID
# Digits (8x8, 17 grey levels): the evaluation radius is 0.2 (see the README's threat-model
# section); the grid spans weak to strong attacks around it, as the CIFAR grid spans 3..15/255
# around 8/255; the step sizes 0.025..0.125 hold the evaluation step 0.05 = eps/4 at
# index 1, as CIFAR's 1..5/255 hold 2/255.
DIGITS_GRID = StrategyGrid(
    step_sizes=(0.025, 0.05, 0.075, 0.1, 0.125),
    iterations=(1, 2, 3, 4, 5, 6, 7, 8),
    epsilons=(0.05, 0.10, 0.15, 0.20, 0.25, 0.30),
)

GRIDS: dict[str, StrategyGrid] = {
    "digits": DIGITS_GRID,
    "cifar10": CIFAR10_GRID,
    "cifar100": CIFAR100_GRID,
    "svhn": CIFAR10_GRID,
    "gtsrb": CIFAR10_GRID,
    "tiny-imagenet": TINY_IMAGENET_GRID,
}

THREAT_MODELS: dict[str, ThreatModel] = {
    "digits": ThreatModel(0.2, 0.05, "L-inf eps=0.2 (digits)"),
    **{
        name: ThreatModel(8 / 255, 2 / 255, "L-inf eps=8/255")
        for name in ("cifar10", "cifar100", "svhn", "gtsrb", "tiny-imagenet")
    },
}

# The fixed attack of PGD-AT (the `fixed` agent): 10 steps for CIFAR.
FIXED_ITERATIONS: dict[str, int] = {"digits": 5, "cifar10": 10, "cifar100": 10, "svhn": 10, "gtsrb": 10, "tiny-imagenet": 10}


def grid_for(dataset: str) -> StrategyGrid:
    """The default strategy grid of a data set."""
    if dataset not in GRIDS:
        raise ValueError(f"No strategy grid for data set {dataset!r}; known: {sorted(GRIDS)}.")
    return GRIDS[dataset]


def threat_model_for(dataset: str) -> ThreatModel:
    """The evaluation threat model of a data set."""
    if dataset not in THREAT_MODELS:
        raise ValueError(f"No threat model for data set {dataset!r}; known: {sorted(THREAT_MODELS)}.")
    return THREAT_MODELS[dataset]
