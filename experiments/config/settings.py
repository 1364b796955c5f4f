"""From a composed Hydra config to complete, frozen run settings (:func:`settings_from_config`) before
anything is built (the agent's class imported and its keys checked before any data is loaded); every bad value
raises :class:`experiments.config.errors.ConfigError` naming its key."""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from agents.base import Agent, AgentSpec
from experiments.config.errors import ConfigError
from experiments.config.schema import (NONFINITE_MODES, EvalSettings, LoggerSettings, RunConfig,
                                       SelectionSettings)
from las_env.datasets import dataset_names, is_registered, lookup
from las_env.datasets.registry import DatasetRecord, ThreatModel
from las_env.datasets.user import peek_size
from las_env.game_config import LASConfig
from las_env.strategy_space import StrategySpace
from las_env.methods import MethodConfig
from las_env.models import build_model
from las_env.reward import RewardConfig
from las_env.imports import import_object
from las_env.optim import OptimConfig
from las_env.validate import SettingError, check_whole

AgentFactory = Callable[[AgentSpec], Agent]
"""Anything that builds an agent from the game's :class:`AgentSpec`."""

AGENT_META_KEYS = ("name", "k", "needs_columns")  # display name; the env's k; grid columns the env must have


def agent_factory(node: Mapping[str, Any] | DictConfig) -> AgentFactory:
    """A factory for the agent of ``_target_`` and its keyword arguments, built once the spec is known."""
    cfg = OmegaConf.create(node) if not isinstance(node, DictConfig) else node
    target = OmegaConf.select(cfg, "_target_", default=None)  # None also when missing (???)
    if not target:
        raise ConfigError(
            "agent=custom needs the class to build: add agent._target_=my_module.MyAgent (a class "
            "implementing agents.base.Agent, importable from the current directory or PYTHONPATH)."
        )
    try:
        cls = import_object(str(target))
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's to fix
        raise ConfigError(
            f"agent._target_={target} cannot be imported ({type(exc).__name__}: {exc}). Give a "
            f"dotted path module.Class; the module must be importable from the current directory "
            f"or PYTHONPATH."
        ) from None
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
              if not k.startswith("_") and k not in AGENT_META_KEYS}
    _check_signature(cls, str(target), kwargs)

    def build(spec: AgentSpec) -> Agent:
        # Hydra builds nested _target_ nodes (a policy class); the spec goes in as is (Hydra would make it a node).
        from hydra.utils import instantiate  # noqa: PLC0415

        return cls(spec=spec, **instantiate(OmegaConf.create(kwargs), _convert_="all"))

    build.target = str(target)  # type: ignore[attr-defined]  # for records and messages
    return build


def _check_signature(cls: Any, target: str, kwargs: Mapping[str, Any]) -> None:
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return  # not introspectable (C extension...): let the call itself complain
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    if "spec" not in params:
        raise ConfigError(
            f"agent._target_={target} does not take a `spec` argument: an agent is built as "
            f"Class(spec=AgentSpec(...), **agent settings) (see agents/base.py)."
        )
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        accepted = sorted(n for n in params if n != "spec" and params[n].kind is not inspect.Parameter.VAR_POSITIONAL)
        raise ConfigError(
            f"agent._target_={target} does not accept the setting(s) {unknown} (it accepts "
            f"{accepted or 'none besides spec'}). A class of your own takes the keys of "
            f"agent=custom (plus +agent.KEY=VALUE), not those of another agent's config."
        )


@dataclass
class RunSettings:
    """Everything the training loop needs, validated: ``env`` the game's final settings (k included), ``agent``
    a factory ``spec -> Agent``, ``config`` the resolved config (recorded), the rest :class:`RunConfig`'s keys."""

    run_dir: Path
    env: LASConfig
    agent: AgentFactory
    agent_name: str
    config: dict[str, Any]
    settings_hash: str | None
    resume: bool
    eval: EvalSettings
    logger: LoggerSettings
    selection: SelectionSettings
    init_from: Path | None
    seed: int
    stop_after_epochs: int | None
    progress: bool
    log_every_steps: int
    threads: int | None
    on_nonfinite: str
    init_from_other_data: bool

    def __post_init__(self) -> None:
        for key, low in (("seed", 0), ("log_every_steps", 0), ("threads", 1), ("stop_after_epochs", 1)):
            check_whole(key, getattr(self, key), low, allow_none=key in ("threads", "stop_after_epochs"))
        if self.on_nonfinite not in NONFINITE_MODES:
            raise SettingError("on_nonfinite", self.on_nonfinite, "must be stop (a non-finite loss, reward, gradient "
                               "or weight ends the run) or skip (drop the updates of batches with a non-finite "
                               "gradient).")


GAME_KEYS = {"batch_size": "data.batch_size", "epochs": "data.epochs", "max_steps_per_epoch": "data.max_steps_per_epoch",
             "reward_interval": "agent.k", "grid.extra": "data.grid.extra", "augment": "data.augment",
             "threat.epsilon": "data.threat.epsilon", "threat.step_size": "data.threat.step_size",
             "sync_batchnorm": "ddp.sync_batchnorm",
             "augment_padding": "data.augment_padding", "model_init": "model.init"}
"""Command-line key of each :class:`LASConfig` field that is not a top-level key of its own name."""


def _build(cls: type, section: str, values: Mapping[str, Any], keys: Mapping[str, str] | None = None) -> Any:
    """``cls(**values)``; a rejected value's paragraph names its key (``<section>.<field>``, or ``keys[field]``)."""
    try:
        return cls(**values)
    except SettingError as exc:
        prefix = f"{section}." if section else ""
        raise ConfigError(exc.describe(key=(keys or {}).get(exc.key) or prefix + exc.key)) from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{section or 'settings'}: {exc}") from None


def _absolute(path: str) -> str:
    """``path`` made absolute against the directory the command was run from."""
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (Path(os.getcwd()) / p).resolve())


def import_plugin(module: str | None) -> None:
    """``data.plugin``: import the user's module (it registers a data set) before the registry is read."""
    if not module:
        return
    try:
        importlib.import_module(str(module))
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's to fix
        raise ConfigError(f"data.plugin={module} cannot be imported ({type(exc).__name__}: {exc}). Give a module "
                          f"importable from the current directory or PYTHONPATH that calls "
                          f"las_env.register_dataset(...) (README, \"Your own data\").") from None


def dataset_record(data: Mapping[str, Any]) -> DatasetRecord:
    """The record of ``data.name``, or the one-paragraph error listing the registered names."""
    name = str(data["name"])
    if not is_registered(name):
        names = dataset_names()
        raise ConfigError(
            f"Unknown data set {name!r}. Valid data sets: {', '.join(names)} "
            f"(data={'|'.join(n.replace('-', '_') for n in names)}); your own images: data=npz data.path=FILE.npz "
            f"or data=folder data.path=DIR, or a data set your module registers: data.plugin=MODULE data.name=NAME "
            f"(README, \"Your own data\")."
        )
    record = lookup(name)
    if record.needs_path and not data.get("path"):
        raise ConfigError(
            f"data={record.name} needs the data: add data.path=FILE ({record.description}). Example: python "
            f"experiments/run.py data={record.name} data.path=/path/to/mine{'.npz' if record.name == 'npz' else ''}."
        )
    return record


def fill_from_registry(data: dict[str, Any], record: DatasetRecord) -> None:
    """The data set's grid, optimiser and threat into a resolved ``data``'s ``null`` values (in place, so recorded)."""
    for section, source, keys in (("grid", record.grid, ("step_sizes", "iterations", "epsilons")),
                                  ("optim", record.optim, [f.name for f in fields(OptimConfig)]),
                                  ("threat", record.threat, ("epsilon", "step_size"))):
        for key in keys:
            if data[section].get(key) is None:
                value = getattr(source, key)
                data[section][key] = list(value) if isinstance(value, tuple) else value
    if not data["grid"].get("extra") and record.grid.extra:
        data["grid"]["extra"] = {name: list(values) for name, values in record.grid.extra}


def _check_model(name: str) -> str:
    try:
        with torch.device("meta"):  # checks the name (and WRN depth) without allocating any weights
            build_model(name, 3, 10)
    except ValueError as exc:
        raise ConfigError(f"model.name={name!r}: {exc} Set it with model=GROUP_OPTION or model.name=NAME.") from None
    return name


def _game(resolved: dict[str, Any], record: DatasetRecord) -> LASConfig:
    """The game's final settings: the command line's, k and the reward flow from the agent's."""
    data, agent = resolved["data"], resolved["agent"]
    model = str(resolved["model"]["name"])
    try:
        grid = StrategySpace.from_config(data["grid"])
    except SettingError as exc:
        raise ConfigError(exc.describe("data.grid.")) from None
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"data.grid: {exc}") from None
    eps, step = data["threat"]["epsilon"], data["threat"]["step_size"]
    reward = dict(resolved["reward"])
    # credit=unbiased's control variate: the batch terms of the target before each reward step's update.
    reward["pre_update_probe"] = bool(reward.get("pre_update_probe")) or agent.get("credit") == "unbiased"
    return _build(LASConfig, "", keys=GAME_KEYS, values=dict(
        dataset=record.name,
        data_root=_absolute(str(data["path"] if record.needs_path else data["root"])),
        model=None if model == "auto" else _check_model(model),  # auto: by the loaded images' size
        optim=_build(OptimConfig, "data.optim", data["optim"]),
        reward=_build(RewardConfig, "reward", reward),
        reward_interval=agent.get("k"),  # None: no reward step (fixed, random)
        step_reward=agent.get("reward_flow") != "score_then_resample",  # the authors': the agent scores itself
        grid=grid,
        threat=record.threat if (eps, step) == (record.threat.epsilon, record.threat.step_size) else
        ThreatModel(eps, step, f"L-inf eps={eps:g} (data.threat)"),
        method=_build(MethodConfig, "method", resolved["method"]),
        model_init=resolved["model"]["init"],
        sync_batchnorm=resolved["ddp"]["sync_batchnorm"],
        **{key: data[key] for key in ("batch_size", "epochs", "max_steps_per_epoch", "augment", "augment_padding")},
        **{key: resolved[key] for key in ("device", "precision", "channels_last", "attack_start", "attack_clip",
                                          "last_batch")},  # LASConfig's own names, on top of the command line
    ))


def _logger(resolved: dict[str, Any], agent: str, model: str) -> LoggerSettings:
    logger = _build(LoggerSettings, "logger", resolved["logger"])
    if logger.name == "none":
        return LoggerSettings()
    seed, extra = resolved["seed"], tuple(logger.tags)
    return replace(logger, group=logger.group or f"{resolved['data']['name']}-{model}",
                   run_name=logger.run_name or f"{agent}-seed{seed}",
                   # agent, data set and model as tags: W&B filters and groups runs side by side by them.
                   tags=list(dict.fromkeys((agent, resolved["data"]["name"], model, *extra))))


def settings_from_config(cfg: DictConfig, run_dir: str | Path, *, settings_hash: str | None = None) -> RunSettings:
    """A composed ``conf/config.yaml`` (or a recorded one) resolved into :class:`RunSettings` for ``run_dir``."""
    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)  # a recorded config gets the schema too
    import_plugin(cfg.data.plugin)  # before anything reads the registry
    factory = agent_factory(cfg.agent)  # first: agent=custom without _target_ cannot be resolved
    try:
        resolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    except Exception as exc:  # noqa: BLE001 - interpolation errors name the key themselves
        raise ConfigError(f"The configuration cannot be resolved: {exc}") from None
    record = dataset_record(resolved["data"])
    fill_from_registry(resolved["data"], record)
    if needs := resolved["agent"].get("needs_columns"):  # columns the agent plays (fat: early_stop_tau), before the env
        resolved["data"]["grid"]["extra"] = {**needs, **(resolved["data"]["grid"].get("extra") or {})}
    env = _game(resolved, record)
    resolved["data"]["name"] = record.name
    agent_name = str(resolved["agent"].get("name") or getattr(factory, "target", "agent").rsplit(".", 1)[-1])
    return _build(RunSettings, "", dict(
        run_dir=Path(run_dir), env=env, agent=factory, agent_name=agent_name, config=resolved,
        settings_hash=settings_hash, resume=bool(resolved["resume"]),
        eval=_build(EvalSettings, "eval", resolved["eval"]),
        logger=_logger(resolved, agent_name, str(resolved["model"]["name"])),
        selection=_build(SelectionSettings, "selection", resolved["selection"]),
        init_from=Path(_absolute(str(resolved["init_from"]))) if resolved["init_from"] else None,
        **{key: resolved[key] for key in ("seed", "stop_after_epochs", "progress", "log_every_steps", "threads",
                                          "on_nonfinite", "init_from_other_data")},  # RunConfig's, as they are
    ))


def _resolve_default_model(*, _root_: DictConfig) -> str:
    """``${las_default_model:}``: the data set's architecture (user data: by the peeked image size); an
    unknown data set gives a placeholder, rejected by the settings with the proper message."""
    data = _root_.data
    import_plugin(OmegaConf.select(_root_, "data.plugin", default=None))
    if not is_registered(str(data.name)):
        return "unknown"
    record = lookup(str(data.name))
    if record.model:
        return record.model
    path = OmegaConf.select(_root_, "data.path", default=None)
    size = peek_size(record.name, Path(str(path)).expanduser()) if path else None
    return record.model_for(*size) if size else "auto"


if not OmegaConf.has_resolver("las_default_model"):  # at import: also for configs composed outside run.py
    OmegaConf.register_new_resolver("las_default_model", _resolve_default_model)
