"""From a composed Hydra config to validated, typed run settings, before anything is loaded.

:func:`settings_from_config` checks everything that is cheap to check (names of the data set,
model and agent, the strategy grid, k, the evaluation attacks, the logger) and raises
:class:`experiments.errors.ConfigError` with one paragraph naming the problem and the valid
choices. Missing data folders and unusable data are reported by :func:`las_env.data.load_dataset`
when the loop loads the data, still before any training.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from evaluation import attack_spec
from experiments.agent_settings import AgentFactory, agent_factory
from experiments.data_config import resolve_data_section
from experiments.errors import ConfigError
from experiments.guard import MODES as NONFINITE_MODES
from experiments.selection import SelectionSettings, selection_settings
from las_env.game import LASConfig
from las_env.grids import StrategyGrid
from las_env.methods import MethodConfig
from las_env.models import build_model
from las_env.reward import RewardConfig
from las_env.target import OptimConfig
from las_env.validate import SettingError, check_whole

FIDELITY_KEYS = ("attack_start", "last_batch")
"""Top-level config keys that are ours-vs-the-authors' switches of ``LASConfig`` (defaults there)."""

LOGGERS = ("none", "wandb")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass(frozen=True)
class EvalSettings:
    """Evaluation during and after training (see ``conf/config.yaml``, section ``eval``; the
    defaults equal that section's, ``tests/test_defaults.py``)."""

    every: int = 3
    test_subset: int | None = 500
    train_subset: int | None = 500
    pgd_iterations: int = 10
    batch_size: int = 512
    final_attacks: tuple[str, ...] = ("clean", "pgd10", "pgd20")
    final_n: int | None = None
    autoattack: bool = False
    autoattack_n: int = 1000
    seed: int = 0


@dataclass(frozen=True)
class LoggerSettings:
    """The experiment tracker (see ``conf/logger/*.yaml``)."""

    name: str = "none"
    mode: str = "offline"
    project: str = "las-at"
    entity: str | None = None
    group: str | None = None
    run_name: str | None = None
    tags: tuple[str, ...] = ()
    log_checkpoint: bool = True


@dataclass
class RunSettings:
    """Everything the training loop needs, validated.

    Attributes:
        run_dir: the run's own folder (checkpoint, results, plots, logs).
        env: the game's settings; ``reward_interval`` is replaced by the agent's.
        agent: a factory ``spec -> Agent`` (a plain callable, or built from a Hydra node).
        agent_name: short name for folders, tags and tables ("reinforce", "fixed", ...).
        seed: the episode's seed (``env.reset(seed=...)``; agents get it in their spec).
        config: the resolved config, recorded in the checkpoint and results.
        settings_hash: digest of the settings (``experiments.rundir.settings_hash``); a resume
            refuses a checkpoint written under another one.
        resume: continue from ``run_dir/checkpoint.pt`` when it exists.
        stop_after_epochs: end this invocation after that many epochs (resumable).
        threads: torch CPU threads for the run (``None``: leave torch's setting).
        on_nonfinite: "stop" (a non-finite loss, reward, gradient or weight ends the run) or
            "skip" (drop the updates of batches with a non-finite gradient, counted);
            ``experiments/guard.py``.
        init_from: start from this run folder's (or checkpoint file's) last checkpoint, with
            these settings (``experiments/recovery.py::start_from``); ``None``: from scratch.
        selection: the validation split and which weights are kept as best (experiments/selection.py).
    """

    run_dir: Path
    env: LASConfig
    agent: AgentFactory
    agent_name: str
    seed: int = 0
    eval: EvalSettings = field(default_factory=EvalSettings)
    logger: LoggerSettings = field(default_factory=LoggerSettings)
    resume: bool = False
    stop_after_epochs: int | None = None
    progress: bool = True
    log_every_steps: int = 20
    threads: int | None = None
    selection: SelectionSettings = field(default_factory=SelectionSettings)
    config: dict[str, Any] = field(default_factory=dict)
    settings_hash: str | None = None
    on_nonfinite: str = "stop"
    init_from: Path | None = None


# ----------------------------------------------------------------------------- validation


def _whole(name: str, value: Any, low: int = 1, *, allow_none: bool = False) -> Any:
    """A whole number >= ``low`` (or ``None`` when allowed: the key says what ``null`` means, e.g.
    all images); else one paragraph naming ``name`` (:func:`las_env.validate.check_whole`)."""
    try:
        return check_whole(name, value, low, allow_none=allow_none)
    except SettingError as exc:
        raise ConfigError(str(exc)) from None


def _absolute(path: str) -> str:
    """``path`` made absolute against the directory the command was run from (Hydra may
    change the working directory of a job; the user meant the one they typed in)."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return str(p)
    try:
        from hydra.core.hydra_config import HydraConfig  # noqa: PLC0415

        base = Path(HydraConfig.get().runtime.cwd) if HydraConfig.initialized() else Path(os.getcwd())
    except Exception:  # noqa: BLE001
        base = Path(os.getcwd())
    return str((base / p).resolve())


def _check_model(name: str) -> str:
    try:
        # On the meta device: checks the name (and WRN depth) without allocating any weights.
        with torch.device("meta"):
            build_model(name, 3, 10)
    except ValueError as exc:
        raise ConfigError(f"model.name={name!r}: {exc} Set it with model=GROUP_OPTION or model.name=NAME.") from None
    return name


GAME_KEYS = {"batch_size": "data.batch_size", "epochs": "data.epochs", "max_steps_per_epoch": "data.max_steps_per_epoch",
             "reward_interval": "agent.k", "device": "device", "precision": "precision",
             "channels_last": "channels_last", "augment": "data.augment", "sync_batchnorm": "ddp.sync_batchnorm",
             "grid.extra": "data.grid.extra"}
"""Command-line key of each :class:`LASConfig` field that is not in a section of its own."""


def _build(cls: type, section: str, values: Mapping[str, Any], keys: Mapping[str, str] | None = None) -> Any:
    """``cls(**values)``; a rejected value becomes one paragraph naming its command-line key
    (``<section>.<field>``, or ``keys[field]``)."""
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ConfigError(f"{section}: unknown setting(s) {unknown}; valid: {sorted(valid)}.")
    try:
        return cls(**values)
    except SettingError as exc:
        raise ConfigError(exc.describe(key=(keys or {}).get(exc.key) or f"{section}.{exc.key}")) from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{section}: {exc}") from None


def eval_settings(cfg: Mapping[str, Any]) -> EvalSettings:
    attacks = [str(a) for a in cfg.get("final_attacks", EvalSettings.final_attacks) or ()]
    if not attacks:
        raise ConfigError("eval.final_attacks is empty: name at least one attack, e.g. [clean, pgd20].")
    for name in attacks:
        try:
            attack_spec(name)
        except ValueError as exc:
            raise ConfigError(f"eval.final_attacks: {exc}") from None
    autoattack = bool(cfg.get("autoattack", EvalSettings.autoattack))
    if autoattack or "autoattack" in attacks:
        if not any(importlib.util.find_spec(m) for m in ("pyautoattack", "autoattack")):
            raise ConfigError(
                "AutoAttack was asked for (eval.autoattack=true or in eval.final_attacks) but the "
                "official implementation is not installed: `pip install pyautoattack` (torch and "
                "numpy only), or set eval.autoattack=false."
            )
    return EvalSettings(
        every=_whole("eval.every", value=cfg.get("every", EvalSettings.every)),
        test_subset=_whole("eval.test_subset", allow_none=True, value=cfg.get("test_subset", EvalSettings.test_subset)),
        train_subset=_whole("eval.train_subset", allow_none=True, value=cfg.get("train_subset", EvalSettings.train_subset)),
        pgd_iterations=_whole("eval.pgd_iterations", value=cfg.get("pgd_iterations", EvalSettings.pgd_iterations)),
        batch_size=_whole("eval.batch_size", value=cfg.get("batch_size", EvalSettings.batch_size)),
        final_attacks=tuple(attacks),
        final_n=_whole("eval.final_n", allow_none=True, value=cfg.get("final_n", EvalSettings.final_n)),
        autoattack=autoattack,
        autoattack_n=_whole("eval.autoattack_n", value=cfg.get("autoattack_n", EvalSettings.autoattack_n)),
        seed=_whole("eval.seed", cfg.get("seed", EvalSettings.seed), 0),
    )


def logger_settings(cfg: Mapping[str, Any], *, agent: str, data: str, model: str, seed: int) -> LoggerSettings:
    name = str(cfg.get("name", LoggerSettings.name))
    if name not in LOGGERS:
        raise ConfigError(f"Unknown logger {name!r}; valid loggers: {', '.join(LOGGERS)} (logger=wandb|none).")
    if name == "none":
        return LoggerSettings(name="none")
    mode = str(cfg.get("mode") or LoggerSettings.mode).lower()
    if mode not in WANDB_MODES:
        raise ConfigError(f"logger.mode={mode!r} (or WANDB_MODE) must be one of {', '.join(WANDB_MODES)}.")
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("logger=wandb but the wandb package is not installed: `pip install wandb`, or logger=none.")
    extra = tuple(str(t) for t in cfg.get("tags") or ())
    return LoggerSettings(
        name="wandb",
        mode=mode,
        project=str(cfg.get("project") or LoggerSettings.project),
        entity=cfg.get("entity"),
        group=str(cfg.get("group") or f"{data}-{model}"),
        run_name=str(cfg.get("run_name") or f"{agent}-seed{seed}"),
        # agent, data set and model as tags: W&B filters and groups runs side by side by them.
        tags=tuple(dict.fromkeys((agent, data, model, *extra))),
        log_checkpoint=bool(cfg.get("log_checkpoint", LoggerSettings.log_checkpoint)),
    )


def settings_from_config(cfg: DictConfig, run_dir: str | Path, *, settings_hash: str | None = None) -> RunSettings:
    """Validate a composed ``conf/config.yaml`` and build :class:`RunSettings` for ``run_dir``.

    Raises:
        ConfigError: anything wrong, one paragraph naming the key and the valid choices.
    """
    agent_node = cfg.agent
    factory = agent_factory(agent_node)  # first: agent=custom without _target_ cannot be resolved
    try:
        resolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    except Exception as exc:  # noqa: BLE001 - interpolation errors name the key themselves
        raise ConfigError(f"The configuration cannot be resolved: {exc}") from None
    data = resolved["data"]
    record = resolve_data_section(data)  # the registry's defaults for the nulls, in the recorded config too
    dataset = record.name
    model_name = str(resolved["model"]["name"])
    model = None if model_name == "auto" else _check_model(model_name)  # auto: by the loaded images' size
    agent_name = str(resolved["agent"].get("name") or getattr(factory, "target", "agent").rsplit(".", 1)[-1])

    grid_cfg = data.get("grid")
    try:
        grid = StrategyGrid.from_config(grid_cfg) if grid_cfg is not None else None
    except SettingError as exc:
        raise ConfigError(exc.describe("data.grid.")) from None
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"data.grid: {exc}") from None
    optim = _build(OptimConfig, "data.optim", data.get("optim") or {})
    reward = _build(RewardConfig, "reward", resolved.get("reward") or {})
    method = _build(MethodConfig, "method", resolved.get("method") or {})
    seed = resolved.get("seed", RunSettings.seed)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed={seed!r} must be a whole number >= 0.")
    env = _build(LASConfig, "game settings", keys=GAME_KEYS, values=dict(
        dataset=dataset,
        data_root=_absolute(str(data["path"] if record.needs_path else data.get("root") or "data")),
        model=model,
        batch_size=_whole("data.batch_size", value=data.get("batch_size")),
        epochs=_whole("data.epochs", value=data.get("epochs")),
        max_steps_per_epoch=_whole("data.max_steps_per_epoch", allow_none=True, value=data.get("max_steps_per_epoch")),
        optim=optim,
        reward=reward,
        reward_interval=1,  # replaced by the agent's once it is built
        grid=grid,
        method=method,
        augment=data.get("augment"),
        device=str(resolved.get("device", LASConfig.device)),
        precision=str(resolved.get("precision", LASConfig.precision)),
        channels_last=bool(resolved.get("channels_last", LASConfig.channels_last)),
        **({"sync_batchnorm": resolved["ddp"]["sync_batchnorm"]} if "sync_batchnorm" in (resolved.get("ddp") or {}) else {}),
        **{key: resolved[key] for key in FIDELITY_KEYS if key in resolved},
    ))
    stop = _whole("stop_after_epochs", allow_none=True, value=resolved.get("stop_after_epochs"))
    log_every = resolved.get("log_every_steps", RunSettings.log_every_steps)
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 0:
        raise ConfigError(f"log_every_steps={log_every!r} must be a whole number >= 0 (0: once per epoch).")
    threads = _whole("threads", allow_none=True, value=resolved.get("threads"))
    on_nonfinite = str(resolved.get("on_nonfinite") or RunSettings.on_nonfinite)
    if on_nonfinite not in NONFINITE_MODES:
        raise ConfigError(f"on_nonfinite={on_nonfinite!r} must be stop (a non-finite loss, reward, gradient or "
                          f"weight ends the run) or skip (drop the updates of batches with a non-finite gradient).")
    init_from = resolved.get("init_from")
    return RunSettings(
        run_dir=Path(run_dir),
        env=env,
        agent=factory,
        agent_name=agent_name,
        seed=seed,
        eval=eval_settings(resolved.get("eval") or {}),
        logger=logger_settings(resolved.get("logger") or {}, agent=agent_name, data=dataset, model=model_name, seed=seed),
        resume=bool(resolved.get("resume")),
        stop_after_epochs=stop,
        progress=bool(resolved.get("progress", RunSettings.progress)),
        log_every_steps=int(log_every),
        threads=threads,
        selection=selection_settings(resolved.get("selection") or {}),
        config=resolved,
        settings_hash=settings_hash,
        on_nonfinite=on_nonfinite,
        init_from=None if init_from in (None, "") else Path(_absolute(str(init_from))),
    )

