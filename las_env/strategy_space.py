"""The attack-strategy space: named columns, their value tables, and index <-> value conversion.

An action for one image is one integer per column: the attack's three (``step_size``,
``iterations``, ``epsilon``, always first, in that order), then any further named columns in
the order the grid config gives them. A further column is data: the training method declares
the columns it READS (LAS-TRADES: ``trades_beta``, ``las_env.methods``); a column no method reads
is still played, counted, logged, plotted and reported, it just changes nothing in the training
step (e.g. a user's agent's own knob). Everything that needs column names, their values or the
``MultiDiscrete`` shape asks :class:`StrategySpace` (env, agents, baselines, SB3 bridge, loop,
compare, plots): a fourth column is a config entry, not an edit in ten files.

All step sizes and epsilons are in pixel units (images live in ``[0, 1]``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from las_env.validate import SettingError, check_numbers

ATTACK_COLUMNS = ("step_size", "iterations", "epsilon")
"""The attack's columns, always the first three of an action; further columns follow them."""
EARLY_STOP_COLUMN = "early_stop_tau"
"""The further column the game's training attack reads, when the grid has it: per image, FAT's early
stop (the attack stops ``tau`` steps after the image is first misclassified; whole numbers >= 0)."""
_EXAMPLES = {"step_sizes": "[0.0078,0.0157]", "iterations": "[3,5,10]", "epsilons": "[0.0314,0.0627]"}
"""What the error messages suggest (CIFAR-like values in pixel units)."""
_PIXEL = "(pixel units for images in [0, 1]: 8/255 = 0.0314; a value above 1 covers the whole pixel range)"


@dataclass(frozen=True)
class StrategySpace:
    """Per-column value tables. Index ``i`` of an action column selects that column's ``values[i]``.

    Attributes:
        step_sizes: PGD step sizes (pixel units), one per step-size index.
        iterations: PGD iteration counts, one per iterations index.
        epsilons: L-infinity radii (pixel units), one per epsilon index.
        extra: further columns after the attack's three, as ``(name, values)`` pairs in action
            order (a mapping is accepted); e.g. ``(("trades_beta", (5, 6, 7, 8, 9)),)`` for
            LAS-TRADES. Any name that is not an attack column works; whether the training
            method reads it is the method's declaration (``LASConfig`` checks it).
    """

    step_sizes: tuple[float, ...]
    iterations: tuple[int, ...]
    epsilons: tuple[float, ...]
    extra: tuple[tuple[str, tuple[float, ...]], ...] = ()

    def __post_init__(self) -> None:
        self._check_extra()
        for key, values in (("step_sizes", self.step_sizes), ("iterations", self.iterations),
                            ("epsilons", self.epsilons)):
            if len(values) == 0:
                raise SettingError(key, list(values), "the grid is empty: give at least one value, e.g. "
                                   "{key}=" + f"{_EXAMPLES[key]}.")
        # Pixel units: images live in [0, 1], so a radius or step above 1 covers the whole range
        # and means nothing; 0 or less is no attack at all.
        for key, values in (("step_sizes", self.step_sizes), ("epsilons", self.epsilons)):
            check_numbers(key, values, meaning=_PIXEL)  # numbers, finite
            bad = [v for v in values if not 0 < v <= 1]
            if bad:
                word = "non-positive" if min(bad) <= 0 else "above-1"
                raise SettingError(key, list(values),
                                   f"has {word} values {bad}: every value must be in (0, 1] {_PIXEL}.")
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
            if not isinstance(name, str) or not name.isidentifier() or name in ATTACK_COLUMNS:
                raise SettingError("extra", dict(pairs), f"names the column {name!r}: a further strategy column "
                                   f"needs a name of its own (letters, digits, _; not one of {list(ATTACK_COLUMNS)}), "
                                   "e.g. {key}={trades_beta: {start: 5, stop: 9}}.")
            values = tuple(values)
            check_numbers(f"extra.{name}", values, meaning="(values of an extra strategy column)")
            if not values:
                raise SettingError(f"extra.{name}", [], "is empty: give at least one value.")
            checked.append((str(name), tuple(float(v) for v in values)))
        object.__setattr__(self, "extra", tuple(checked))

    # ----------------------------------------------------------------- the columns
    @property
    def columns(self) -> tuple[str, ...]:
        """Names of the action columns, in order: the attack's three, then the extra ones."""
        return ATTACK_COLUMNS + self.extra_columns

    @property
    def extra_columns(self) -> tuple[str, ...]:
        """Names of the columns after the attack's three, in action order."""
        return tuple(name for name, _ in self.extra)

    @property
    def values(self) -> dict[str, tuple]:
        """Column name -> its value table, for every column, in action order."""
        return {**dict(zip(ATTACK_COLUMNS, (self.step_sizes, self.iterations, self.epsilons))), **dict(self.extra)}

    @property
    def nvec(self) -> tuple[int, ...]:
        """Number of choices per action column, as Gymnasium's ``MultiDiscrete`` wants it."""
        return tuple(len(v) for v in self.values.values())

    def column(self, name: str) -> int:
        """Position of column ``name`` in an action row."""
        if name not in self.columns:
            raise KeyError(f"No strategy column {name!r}; the columns are {list(self.columns)}.")
        return self.columns.index(name)

    def action_space(self, batch: int):
        """The ``MultiDiscrete`` space of a ``(batch, columns)`` action."""
        from gymnasium import spaces  # noqa: PLC0415 (only the env needs Gymnasium)

        return spaces.MultiDiscrete(np.tile(np.array(self.nvec, dtype=np.int64), (batch, 1)))

    # -------------------------------------------------------- index <-> value
    def lookup(self, device: torch.device | str = "cpu") -> SpaceLookup:
        """The value tables on ``device``, for batched index -> value conversion there."""
        return SpaceLookup(self, torch.device(device))

    def value(self, name: str, index: int) -> float | int:
        """The value of column ``name`` at ``index``."""
        return self.values[name][index]

    def decode(self, indices: Sequence[int]) -> dict[str, float | int]:
        """One action row of indices -> column name -> value (host numbers)."""
        return {name: table[int(i)] for (name, table), i in zip(self.values.items(), indices)}

    def index_of(self, *values: float, **by_name: float) -> tuple[int, ...]:
        """The indices of the table values closest to the given ones: positional values are
        the columns in action order (``index_of(step, iters, eps)``), keywords name columns
        (``index_of(epsilon=0.2, trades_beta=6)``); the result follows the order given."""
        if len(values) > len(self.columns):
            raise ValueError(f"index_of got {len(values)} values for the {len(self.columns)} columns {self.columns}.")
        wanted = list(zip(self.columns, values)) + list(by_name.items())
        tables = self.values
        out = []
        for name, v in wanted:
            if name not in tables:
                raise KeyError(f"No strategy column {name!r}; the columns are {list(self.columns)}.")
            table = tables[name]
            out.append(min(range(len(table)), key=lambda i: abs(table[i] - v)))
        return tuple(out)

    def tables(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
        """The attack's three tables as tensors on ``device`` (float, long, float)."""
        return (
            torch.tensor(self.step_sizes, dtype=torch.float32, device=device),
            torch.tensor(self.iterations, dtype=torch.long, device=device),
            torch.tensor(self.epsilons, dtype=torch.float32, device=device),
        )

    def extra_tables(self, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """The extra columns' tables as float tensors on ``device``, by name."""
        return {name: torch.tensor(values, dtype=torch.float32, device=device) for name, values in self.extra}

    # ------------------------------------------------------------------ config
    @classmethod
    def from_config(cls, cfg: Mapping) -> StrategySpace:
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



class SpaceLookup:
    """A space's value tables on one device: ``lookup(indices)`` turns a ``(B, columns)`` long
    tensor of indices into ``name -> (B,)`` values with ONE gather (no host round trip).

    ``iterations`` comes back as long, every other column as float32.
    """

    def __init__(self, space: StrategySpace, device: torch.device) -> None:
        self.space = space
        self.columns = space.columns
        tables = list(space.values.values())
        # One flat float table [step sizes | iterations | epsilons | extras]; iteration counts
        # are small whole numbers, exact in float32.
        self.flat = torch.tensor([float(v) for t in tables for v in t], dtype=torch.float32, device=device)
        self.offsets = torch.tensor([sum(map(len, tables[:j])) for j in range(len(tables))], device=device)

    def __call__(self, indices: Tensor) -> dict[str, Tensor]:
        # A contiguous (columns, B) index, so each column's values are one contiguous (B,) tensor
        # (a transposed index would give strided columns, whose reductions round differently).
        by_column = self.flat[(indices + self.offsets).t().contiguous()]
        out = dict(zip(self.columns, by_column.unbind(0)))
        out["iterations"] = out["iterations"].long()
        return out


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
