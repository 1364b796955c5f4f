"""The attack-strategy space: the value grids an action indexes into.

An action for one image is three integers ``(step-size index, iterations index,
epsilon index)``, followed by one integer per EXTRA column a training method reads (LAS-TRADES:
``trades_beta``); :class:`StrategyGrid` turns them into the physical settings.
All step sizes and epsilons are in pixel units (images live in ``[0, 1]``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from las_env.validate import SettingError, check_numbers

ACTION_COLUMNS = ("step_size", "iterations", "epsilon")
"""The attack's columns, always the first three of an action; extra columns follow them."""
EXTRA_COLUMNS = ("trades_beta",)
"""Extra columns a training method knows how to read (``las_env.methods``)."""
_EXAMPLES = {"step_sizes": "[0.0078,0.0157]", "iterations": "[3,5,10]", "epsilons": "[0.0314,0.0627]"}
"""What the error messages suggest (CIFAR-like values in pixel units)."""


@dataclass(frozen=True)
class ThreatModel:
    """The evaluation threat model of a data set: L-infinity ball of radius ``epsilon``.

    ``step_size`` is the PGD step used by evaluation and by the L2 reward probe
    (2/255 for CIFAR's 8/255, i.e. epsilon / 4).
    """

    epsilon: float
    step_size: float
    description: str


@dataclass(frozen=True)
class StrategyGrid:
    """Per-parameter value grids. Index ``i`` of an action column selects ``values[i]``.

    Attributes:
        step_sizes: PGD step sizes (pixel units), one per step-size index.
        iterations: PGD iteration counts, one per iterations index.
        epsilons: L-infinity radii (pixel units), one per epsilon index.
        extra: further columns after the attack's three, as ``(name, values)`` pairs in action
            order (a mapping is accepted); e.g. ``(("trades_beta", (5, 6, 7, 8, 9)),)`` for
            LAS-TRADES. Names come from :data:`EXTRA_COLUMNS`.
    """

    step_sizes: tuple[float, ...]
    iterations: tuple[int, ...]
    epsilons: tuple[float, ...]
    extra: tuple[tuple[str, tuple[float, ...]], ...] = ()

    def __post_init__(self) -> None:
        self._check_extra()
        # Pixel units: images live in [0, 1], so a radius or step above 1 covers the whole range
        # and means nothing; 0 or less is no attack at all.
        pixel = "(pixel units for images in [0, 1]: 8/255 = 0.0314; a value above 1 covers the whole pixel range)"
        for key, values in (("step_sizes", self.step_sizes), ("iterations", self.iterations),
                            ("epsilons", self.epsilons)):
            if len(values) == 0:
                raise SettingError(key, list(values), "the grid is empty: give at least one value, e.g. "
                                   "{key}=" + f"{_EXAMPLES[key]}.")
        for key, values in (("step_sizes", self.step_sizes), ("epsilons", self.epsilons)):
            check_numbers(key, values, meaning=pixel)  # numbers, finite
            bad = [v for v in values if not 0 < v <= 1]
            if bad:
                word = "non-positive" if min(bad) <= 0 else "above-1"
                raise SettingError(key, list(values),
                                   f"has {word} values {bad}: every value must be in (0, 1] {pixel}.")
        for v in self.iterations:
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or int(v) != v or v < 1:
                raise SettingError("iterations", list(self.iterations), "every iteration count must be a whole "
                                   "number >= 1, e.g. {key}=" + f"{_EXAMPLES['iterations']}.")
        # Stored as Python numbers of one kind, whatever the config gave (2.0 -> 2).
        object.__setattr__(self, "step_sizes", tuple(float(v) for v in self.step_sizes))
        object.__setattr__(self, "iterations", tuple(int(v) for v in self.iterations))
        object.__setattr__(self, "epsilons", tuple(float(v) for v in self.epsilons))

    def _check_extra(self) -> None:
        pairs = tuple(self.extra.items()) if isinstance(self.extra, Mapping) else tuple(self.extra)
        checked = []
        for name, values in pairs:
            if name not in EXTRA_COLUMNS:
                raise SettingError("extra", dict(pairs), f"names an unknown column {name!r}: the extra columns a "
                                   f"training method reads are {list(EXTRA_COLUMNS)}, e.g. "
                                   "{key}={trades_beta: {start: 5, stop: 9}}.")
            values = tuple(values)
            check_numbers(f"extra.{name}", values, meaning="(values of an extra strategy column)")
            if not values:
                raise SettingError(f"extra.{name}", [], "is empty: give at least one value.")
            checked.append((str(name), tuple(float(v) for v in values)))
        object.__setattr__(self, "extra", tuple(checked))

    @property
    def columns(self) -> tuple[str, ...]:
        """Names of the action columns, in order: the attack's three, then the extra ones."""
        return ACTION_COLUMNS + tuple(name for name, _ in self.extra)

    @property
    def values(self) -> dict[str, tuple]:
        """Column name -> its grid values, for every column."""
        return {**dict(zip(ACTION_COLUMNS, (self.step_sizes, self.iterations, self.epsilons))), **dict(self.extra)}

    def extra_tables(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The extra columns' values as float tensors on ``device``, by name."""
        return {name: torch.tensor(values, dtype=torch.float32, device=device) for name, values in self.extra}

    @classmethod
    def from_config(cls, cfg: Mapping) -> StrategyGrid:
        """Build from a mapping with keys ``step_sizes``, ``iterations``, ``epsilons`` and
        optionally ``extra`` (name -> values, in action order).

        Each entry is either a list of values or ``{start, stop, scale}`` (inclusive integer
        range multiplied by ``scale``, e.g. ``{start: 3, stop: 15, scale: 1/255}``).
        """
        missing = [k for k in ("step_sizes", "iterations", "epsilons") if k not in cfg]
        if missing:
            raise ValueError(f"Strategy grid config lacks {missing}; it needs step_sizes, iterations, epsilons.")
        values = {}
        for key in ("step_sizes", "iterations", "epsilons"):
            try:
                values[key] = tuple(_expand(cfg[key]))
            except (ValueError, TypeError, ZeroDivisionError, OverflowError, KeyError) as exc:
                raise SettingError(key, cfg[key], f"cannot be read as grid values ({exc}): give a list of numbers "
                                   "(fractions such as 8/255 allowed), e.g. {key}=" + f"{_EXAMPLES[key]}, or "
                                   "{start, stop, scale}.") from None
        extra = []
        for name, spec in (cfg.get("extra") or {}).items():
            try:
                extra.append((name, tuple(_expand(spec))))
            except (ValueError, TypeError, ZeroDivisionError, OverflowError, KeyError) as exc:
                raise SettingError(f"extra.{name}", spec, f"cannot be read as grid values ({exc}): give a list of "
                                   "numbers or {start, stop, scale}, e.g. {key}={start: 5, stop: 9}.") from None
        return cls(**values, extra=tuple(extra))

    @property
    def nvec(self) -> tuple[int, ...]:
        """Number of choices per action column (extra columns included), as Gymnasium's
        ``MultiDiscrete`` wants it."""
        return (len(self.step_sizes), len(self.iterations), len(self.epsilons), *(len(v) for _, v in self.extra))

    def tables(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three grids as tensors on ``device`` (for on-device index lookups)."""
        return (
            torch.tensor(self.step_sizes, dtype=torch.float32, device=device),
            torch.tensor(self.iterations, dtype=torch.long, device=device),
            torch.tensor(self.epsilons, dtype=torch.float32, device=device),
        )

    def index_of(self, step_size: float, iterations: int, epsilon: float) -> tuple[int, int, int]:
        """The action indices of the grid values closest to the given physical settings."""

        def nearest(values: Sequence[float], v: float) -> int:
            return min(range(len(values)), key=lambda i: abs(values[i] - v))

        return (nearest(self.step_sizes, step_size), nearest(self.iterations, iterations), nearest(self.epsilons, epsilon))


def _expand(spec) -> list[float]:
    if isinstance(spec, (str, bytes)) or not isinstance(spec, (Mapping, Sequence)):
        raise TypeError(f"expected a list or a mapping, got {type(spec).__name__}")
    if isinstance(spec, Mapping):
        start, stop = spec["start"], spec["stop"]
        scale = _number(spec.get("scale", 1.0))
        if stop < start:
            raise ValueError(f"Grid range {dict(spec)} is empty: stop must be >= start.")
        return [v * scale for v in range(int(start), int(stop) + 1)]
    return [_number(v) for v in spec]


def _number(v) -> float:
    # Configs write fractions such as "8/255"; accept them without eval().
    if isinstance(v, str) and "/" in v:
        num, den = v.split("/")
        return float(num) / float(den)
    return float(v)


class _FixedIterations(Mapping):
    """Read-only view ``name -> PGD-AT iterations`` over the registry (kept for callers that index
    it; new code reads ``las_env.datasets.lookup(name).fixed_iterations``)."""

    def __getitem__(self, name: str) -> int:
        from las_env.datasets.registry import lookup  # noqa: PLC0415 - the registry imports this module

        return lookup(name).fixed_iterations

    def __iter__(self):
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
