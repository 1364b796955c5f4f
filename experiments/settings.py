"""From a composed Hydra config to validated, typed run settings, before anything is loaded.

:func:`settings_from_config` checks everything that is cheap to check (names of the data set,
model and agent, the strategy grid, k, the evaluation attacks, the logger) and raises
:class:`experiments.errors.ConfigError` with one paragraph naming the problem and the valid
choices. Missing data folders are reported by :func:`las_env.data.load_dataset` when the loop
loads the data, still before any training.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from agents.base import Agent, AgentSpec
from evaluation import attack_spec
from experiments.errors import ConfigError
from experiments.guard import MODES as NONFINITE_MODES
from experiments.selection import SelectionSettings, selection_settings
from las_env.data import DATASET_NAMES
from las_env.game import LASConfig
from las_env.grids import StrategyGrid
from las_env.methods import MethodConfig
from las_env.models import build_model
from las_env.reward import RewardConfig
from las_env.target import OptimConfig
from las_env.validate import SettingError, check_whole

AgentFactory = Callable[[AgentSpec], Agent]
"""Anything that builds an agent from the game's :class:`AgentSpec`."""

AGENT_META_KEYS = ("name",)
"""Keys of an agent config that describe it rather than being constructor arguments."""

FIDELITY_KEYS = ("attack_start", "last_batch")
"""Top-level config keys that are ours-vs-the-authors' switches of ``LASConfig`` (defaults there)."""

LOGGERS = ("none", "wandb")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass(frozen=True)
class EvalSettings:
    """Evaluation during and after training (see ``conf/config.yaml``, section ``eval``)."""

    every: int = 1
    test_subset: int | None = 200
    train_subset: int | None = 200
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


# ----------------------------------------------------------------------------- agents


def agent_factory(node: Mapping[str, Any] | DictConfig) -> AgentFactory:
    """A factory for the agent an agent config describes: ``_target_`` plus its keyword
    arguments (``name`` is dropped). The class is imported and its signature checked now, so
    a typo fails before any data is loaded; the agent itself is built once the spec is known.
    """
    cfg = OmegaConf.create(node) if not isinstance(node, DictConfig) else node
    try:
        target = cfg._target_
    except MissingMandatoryValue:
        target = None
    if not target:
        raise ConfigError(
            "agent=custom needs the class to build: add agent._target_=my_module.MyAgent (a class "
            "implementing agents.base.Agent, importable from the current directory or PYTHONPATH)."
        )
    try:
        cls = _import_object(str(target))
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's to fix
        raise ConfigError(
            f"agent._target_={target} cannot be imported ({type(exc).__name__}: {exc}). Give a "
            f"dotted path module.Class; the module must be importable from the current directory "
            f"or PYTHONPATH."
        ) from None
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
              if not k.startswith("_") and k not in AGENT_META_KEYS}
    _check_signature(cls, str(target), kwargs)
    for key in ("k", "reward_interval"):  # the names agents give the update interval k
        k = kwargs.get(key)
        if k is not None and (isinstance(k, bool) or not isinstance(k, (int, float)) or int(k) != k or k < 1):
            raise ConfigError(
                f"agent.{key}={k!r}: k, the strategy's update interval (the env pays for the full "
                f"reward every k steps), must be a whole number >= 1 (the paper uses 20 or 40)."
            )

    def build(spec: AgentSpec) -> Agent:
        # Nested nodes with their own _target_ (e.g. a policy class) are built by Hydra; the spec
        # is passed directly (Hydra would turn a dataclass argument into a config node).
        from hydra.utils import instantiate  # noqa: PLC0415

        return cls(spec=spec, **instantiate(OmegaConf.create(kwargs), _convert_="all"))

    build.target = str(target)  # type: ignore[attr-defined]  # for records and messages
    return build


def _import_object(path: str) -> Any:
    """``module.Class`` -> the class (no logging on failure, unlike Hydra's own locator)."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ImportError(f"{path!r} is not a dotted path module.Class")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"module {module_name!r} has no attribute {attr!r}") from None


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


# ----------------------------------------------------------------------------- validation


def _positive_or_none(name: str, value: Any) -> int | None:
    """A whole number >= 1 or ``None`` (the key says what ``null`` means, e.g. all images)."""
    try:
        return check_whole(name, value, 1, allow_none=True)
    except SettingError as exc:
        raise ConfigError(str(exc)) from None


def _positive(name: str, value: Any) -> int:
    try:
        return check_whole(name, value, 1)  # type: ignore[return-value]
    except SettingError as exc:
        raise ConfigError(str(exc)) from None


def _whole(name: str, value: Any, low: int) -> int:
    try:
        return check_whole(name, value, low)  # type: ignore[return-value]
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


def _dataset_name(name: str) -> str:
    key = str(name).lower().replace("_", "-")
    if key not in DATASET_NAMES:
        raise ConfigError(
            f"Unknown data set {name!r}. Valid data sets: {', '.join(DATASET_NAMES)} "
            f"(data=digits|cifar10|cifar100|svhn|gtsrb|tiny_imagenet)."
        )
    return key


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
    attacks = [str(a) for a in cfg.get("final_attacks") or ()]
    if not attacks:
        raise ConfigError("eval.final_attacks is empty: name at least one attack, e.g. [clean, pgd20].")
    for name in attacks:
        try:
            attack_spec(name)
        except ValueError as exc:
            raise ConfigError(f"eval.final_attacks: {exc}") from None
    autoattack = bool(cfg.get("autoattack", False))
    if autoattack or "autoattack" in attacks:
        if not any(importlib.util.find_spec(m) for m in ("pyautoattack", "autoattack")):
            raise ConfigError(
                "AutoAttack was asked for (eval.autoattack=true or in eval.final_attacks) but the "
                "official implementation is not installed: `pip install pyautoattack` (torch and "
                "numpy only), or set eval.autoattack=false."
            )
    return EvalSettings(
        every=_positive("eval.every", cfg.get("every", 1)),
        test_subset=_positive_or_none("eval.test_subset", cfg.get("test_subset")),
        train_subset=_positive_or_none("eval.train_subset", cfg.get("train_subset")),
        pgd_iterations=_positive("eval.pgd_iterations", cfg.get("pgd_iterations", 10)),
        batch_size=_positive("eval.batch_size", cfg.get("batch_size", 512)),
        final_attacks=tuple(attacks),
        final_n=_positive_or_none("eval.final_n", cfg.get("final_n")),
        autoattack=autoattack,
        autoattack_n=_positive("eval.autoattack_n", cfg.get("autoattack_n", 1000)),
        seed=_whole("eval.seed", cfg.get("seed", 0), 0),
    )


def logger_settings(cfg: Mapping[str, Any], *, agent: str, data: str, model: str, seed: int) -> LoggerSettings:
    name = str(cfg.get("name", "none"))
    if name not in LOGGERS:
        raise ConfigError(f"Unknown logger {name!r}; valid loggers: {', '.join(LOGGERS)} (logger=wandb|none).")
    if name == "none":
        return LoggerSettings(name="none")
    mode = str(cfg.get("mode") or "offline").lower()
    if mode not in WANDB_MODES:
        raise ConfigError(f"logger.mode={mode!r} (or WANDB_MODE) must be one of {', '.join(WANDB_MODES)}.")
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("logger=wandb but the wandb package is not installed: `pip install wandb`, or logger=none.")
    extra = tuple(str(t) for t in cfg.get("tags") or ())
    return LoggerSettings(
        name="wandb",
        mode=mode,
        project=str(cfg.get("project") or "las-at"),
        entity=cfg.get("entity"),
        group=str(cfg.get("group") or f"{data}-{model}"),
        run_name=str(cfg.get("run_name") or f"{agent}-seed{seed}"),
        # agent, data set and model as tags: W&B filters and groups runs side by side by them.
        tags=tuple(dict.fromkeys((agent, data, model, *extra))),
        log_checkpoint=bool(cfg.get("log_checkpoint", True)),
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
    dataset = _dataset_name(data["name"])
    model = _check_model(str(resolved["model"]["name"]))
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
    seed = resolved.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed={seed!r} must be a whole number >= 0.")
    env = _build(LASConfig, "game settings", keys=GAME_KEYS, values=dict(
        dataset=dataset,
        data_root=_absolute(str(data.get("root") or "data")),
        model=model,
        batch_size=_positive("data.batch_size", data.get("batch_size")),
        epochs=_positive("data.epochs", data.get("epochs")),
        max_steps_per_epoch=_positive_or_none("data.max_steps_per_epoch", data.get("max_steps_per_epoch")),
        optim=optim,
        reward=reward,
        reward_interval=1,  # replaced by the agent's once it is built
        grid=grid,
        method=method,
        augment=data.get("augment"),
        device=str(resolved.get("device", "cpu")),
        precision=str(resolved.get("precision", "fp32")),
        channels_last=bool(resolved.get("channels_last", False)),
        **({"sync_batchnorm": resolved["ddp"]["sync_batchnorm"]} if "sync_batchnorm" in (resolved.get("ddp") or {}) else {}),
        **{key: resolved[key] for key in FIDELITY_KEYS if key in resolved},
    ))
    stop = _positive_or_none("stop_after_epochs", resolved.get("stop_after_epochs"))
    log_every = resolved.get("log_every_steps", 20)
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 0:
        raise ConfigError(f"log_every_steps={log_every!r} must be a whole number >= 0 (0: once per epoch).")
    threads = _positive_or_none("threads", resolved.get("threads"))
    on_nonfinite = str(resolved.get("on_nonfinite") or "stop")
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
        logger=logger_settings(resolved.get("logger") or {}, agent=agent_name, data=dataset, model=model, seed=seed),
        resume=bool(resolved.get("resume")),
        stop_after_epochs=stop,
        progress=bool(resolved.get("progress", True)),
        log_every_steps=int(log_every),
        threads=threads,
        selection=selection_settings(resolved.get("selection") or {}),
        config=resolved,
        settings_hash=settings_hash,
        on_nonfinite=on_nonfinite,
        init_from=None if init_from in (None, "") else Path(_absolute(str(init_from))),
    )

