"""The ``data`` section of the config against the data-set registry.

``conf/data/<name>.yaml`` holds the user-facing keys; every value the registry owns (grid,
optimiser and schedule, default model) is ``null`` there, meaning "the data set's record's"
(``las_env.datasets``). :func:`resolve_data_section` fills those nulls in place, so the config
recorded with a run holds the values it actually trained with, and
``data.grid.epsilons=[...]``, ``data.optim.lr=0.1`` or ``model=...`` override exactly one fact.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from experiments.errors import ConfigError
from las_env.datasets import dataset_names, is_registered, lookup
from las_env.datasets.registry import DatasetRecord
from las_env.datasets.user import peek_size
from las_env.optim import OptimConfig

GRID_KEYS = ("step_sizes", "iterations", "epsilons")


def dataset_record(name: Any) -> DatasetRecord:
    """The record of ``data.name``, or the one-paragraph error listing the registered names."""
    if not is_registered(str(name)):
        names = dataset_names()
        raise ConfigError(
            f"Unknown data set {name!r}. Valid data sets: {', '.join(names)} "
            f"(data={'|'.join(n.replace('-', '_') for n in names)}); your own images: data=npz data.path=FILE.npz "
            f"or data=folder data.path=DIR (README, \"Your own data\")."
        )
    return lookup(str(name))


def resolve_data_section(data: dict[str, Any]) -> DatasetRecord:
    """Fill the registry's defaults into a resolved ``data`` section (in place); its record.

    Raises:
        ConfigError: unknown data set, or a user data set without ``data.path``.
    """
    record = dataset_record(data["name"])
    if record.needs_path and not data.get("path"):
        raise ConfigError(
            f"data={record.name} needs the data: add data.path=FILE ({record.description}). "
            f"Example: python experiments/run.py data={record.name} data.path=/path/to/mine"
            f"{'.npz' if record.name == 'npz' else ''}."
        )
    grid = data.get("grid")
    if grid is not None:  # null grid: the record's whole grid (LASConfig's default)
        for key in GRID_KEYS:
            if grid.get(key) is None:
                grid[key] = list(getattr(record.grid, key))
        if not grid.get("extra") and record.grid.extra:
            grid["extra"] = {name: list(values) for name, values in record.grid.extra}
    optim = data.get("optim")
    if optim is not None:
        for f in fields(OptimConfig):
            if f.name in optim and optim[f.name] is None:
                value = getattr(record.optim, f.name)
                optim[f.name] = list(value) if isinstance(value, tuple) else value
    return record


def _resolve_default_model(*, _root_: DictConfig) -> str:
    """``${las_default_model:}``: ``model=default``'s architecture, the data set's record's; for
    user data decided by the image size (peeked at, not loaded). An unknown data set gives a
    placeholder here: settings reject it with the proper message."""
    data = _root_.data
    if not is_registered(str(data.name)):
        return "unknown"
    record = lookup(str(data.name))
    if record.model:
        return record.model
    path = OmegaConf.select(_root_, "data.path", default=None)
    size = peek_size(record.name, Path(str(path)).expanduser()) if path else None
    return record.model_for(*size) if size else "auto"


def register_data_resolvers() -> None:
    """Register ``las_default_model`` (idempotent)."""
    if not OmegaConf.has_resolver("las_default_model"):
        OmegaConf.register_new_resolver("las_default_model", _resolve_default_model)


register_data_resolvers()  # also for configs composed outside run.py (tests, notebooks)
