"""Finite-or-stop checks of numeric settings, shared by every typed config.

The configs (:class:`las_env.strategy_space.StrategySpace`, :class:`las_env.reward.RewardConfig`,
:class:`las_env.optim.OptimConfig`, :class:`las_env.game_config.LASConfig`) call these helpers
from their ``__post_init__``, so the env and the command line reject the same values with
the same words. A failure raises :class:`SettingError`, a ``ValueError`` that knows which
field it is about: the message starts with ``<field>=<value>``, and the command line
(``experiments/config/settings.py``) prefixes the section, so users read ``data.grid.epsilons=...``
or ``reward.probe_epsilon=...``, the key they type.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch


class SettingError(ValueError):
    """A setting outside its meaningful range.

    Attributes:
        key: the field's name in its config (``epsilons``, ``lr``...).
        value: the rejected value.
        detail: what the value must be, and how to fix it (after ``<key>=<value>``); a literal
            ``{key}`` in it is replaced by the key as spelled in the message, so a suggested fix
            names the key the user types.
    """

    def __init__(self, key: str, value: Any, detail: str) -> None:
        self.key, self.value, self.detail = key, value, detail
        super().__init__(self.describe())

    def describe(self, prefix: str = "", *, key: str | None = None) -> str:
        """The message with the key spelled as ``prefix + key`` (e.g. ``data.optim.`` + ``lr``),
        or as ``key`` when given (a field whose command-line key lives in another section)."""
        key = key or prefix + self.key
        return f"{key}={_show(self.value)}: {self.detail.replace('{key}', key)}"


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_number(key: str, value: Any, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, meaning: str = "",
                 shown: Any = None) -> float:
    """``value`` as a float when it is a finite number in the interval; else :class:`SettingError`.

    ``low``/``high`` of ``None`` mean unbounded; ``*_open`` excludes the bound itself.
    ``meaning`` is appended to the message (why the range is what it is); ``shown`` is the
    value to print when it differs from ``value`` (a whole list, say).
    """
    shown = value if shown is None else shown
    tail = f" {meaning}" if meaning else ""
    if not _is_number(value):
        raise SettingError(key, shown, f"must be a number{tail}, got {type(value).__name__} {value!r}.")
    if not math.isfinite(value):
        raise SettingError(key, shown, f"must be a finite number{tail}, got {value}.")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        left = "-inf" if low is None else f"{low:g}"
        right = "inf" if high is None else f"{high:g}"
        opening = "(" if low_open or low is None else "["
        closing = ")" if high_open or high is None else "]"
        interval = f"{opening}{left}, {right}{closing}"
        raise SettingError(key, shown, f"must be in {interval}{tail}, got {value}.")
    return float(value)


def check_numbers(key: str, values: Iterable[Any], low: float | None = None, high: float | None = None, *,
                  low_open: bool = False, high_open: bool = False, meaning: str = "") -> None:
    """:func:`check_number` on every element; the message shows the whole list."""
    values = list(values)
    for v in values:
        check_number(key, v, low, high, low_open=low_open, high_open=high_open, meaning=meaning, shown=values)


def check_whole(key: str, value: Any, low: int = 1, *, allow_none: bool = False) -> int | None:
    """``value`` as an int when it is a whole number >= ``low`` (or ``None`` when allowed)."""
    if value is None and allow_none:
        return None
    fine = _is_number(value) and math.isfinite(value) and int(value) == value and value >= low
    if not fine:
        extra = " (or null)" if allow_none else ""
        raise SettingError(key, value, f"must be a whole number >= {low}{extra}.")
    return int(value)


def check_interval(key: str, value: Any) -> int:
    """The strategy's update interval k (``k``, ``reward_interval``): a whole number >= 1.

    The one check of k (``LASConfig.reward_interval``, given on the command line as ``agent.k``):
    the env pays for the full reward (with its L2/L3 probes) every k-th step.
    """
    try:
        return check_whole(key, value, 1)  # type: ignore[return-value]
    except SettingError:
        raise SettingError(key, value, "must be a whole number >= 1: the strategy's update interval k (the "
                                       "env pays for the full reward every k steps; the paper uses 20 or 40).") from None


def check_device(key: str, value: Any) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` as given, ``auto`` as cuda when available else cpu; the one
    parser of a device setting (training and evaluation)."""
    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(str(value)).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise SettingError(key, value, "must be cpu, cuda, cuda:N or auto (cuda when available).")
    if kind == "cuda" and not torch.cuda.is_available():
        raise SettingError(key, value, "CUDA is not available here; use {key}=cpu (or auto).")
    return str(value)
