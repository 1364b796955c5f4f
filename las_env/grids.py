"""The data sets' strategy grids and threat models.

The space itself (columns, value tables, index <-> value conversion) is
:class:`las_env.strategy_space.StrategySpace`; ``StrategyGrid`` is its earlier name, re-exported here.
All step sizes and epsilons are in pixel units (images live in ``[0, 1]``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
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

class _FixedIterations(Mapping):
    """Read-only view ``name -> PGD-AT iterations`` over the registry (for callers that index it;
    the fact itself is ``las_env.datasets.lookup(name).fixed_iterations``)."""

    def __getitem__(self, name: str) -> int:
        from las_env.datasets.registry import lookup  # noqa: PLC0415 - the registry imports this module

        return lookup(name).fixed_iterations

    def __iter__(self) -> Iterator[str]:
        from las_env.datasets.registry import dataset_names  # noqa: PLC0415

        return iter(dataset_names())

    def __len__(self) -> int:
        return len(tuple(iter(self)))


FIXED_ITERATIONS: Mapping[str, int] = _FixedIterations()
"""PGD-AT's iterations per data set (10 for CIFAR, 5 for digits), read from the registry."""


def grid_for(dataset: str) -> StrategyGrid:
    """The default strategy grid of a data set (its registry record's)."""
    from las_env.datasets.registry import lookup  # noqa: PLC0415 - the registry imports this module

    try:
        return lookup(dataset).grid
    except KeyError as exc:
        raise ValueError(f"No strategy grid: {exc.args[0]}") from None


def threat_model_for(dataset: str) -> ThreatModel:
    """The evaluation threat model of a data set (its registry record's)."""
    from las_env.datasets.registry import lookup  # noqa: PLC0415

    try:
        return lookup(dataset).threat
    except KeyError as exc:
        raise ValueError(f"No threat model: {exc.args[0]}") from None
