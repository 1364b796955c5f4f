"""A run's folder, ``<run_root>/<data>/<agent>/<model>-seed<seed>-<hash of EVERY setting>`` (so the same
command finds it again for ``resume=true``), and the resolvers Hydra names it with (an unwritable folder is
reported before anything is loaded)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import experiments.config.settings  # noqa: F401 - registers model=default's resolver, las_default_model
from experiments.config.errors import fail
from experiments.runfolder.runfiles import CHECKPOINT, PREVIOUS_CHECKPOINT
from experiments.runfolder.runlock import is_held

NON_SETTINGS: tuple[str, ...] = ("hydra", "resume", "stop_after_epochs", "progress", "threads", "run_root",
                                 "ddp_timeout_s", "init_from_other_data")
"""Top-level keys that say how to run, not what to compute: left out of the settings hash."""
HASH_LENGTH = 8
SWEEP_ID = time.strftime("%Y%m%d-%H%M%S")  # when this process started: every job of one multirun shares it


def settings_hash(config: DictConfig | dict[str, Any]) -> str:
    """Digest of every setting, unresolved (environment variables such as ``WANDB_MODE`` do not change it)."""
    container = OmegaConf.to_container(config, resolve=False) if isinstance(config, DictConfig) else dict(config)
    assert isinstance(container, dict)
    settings = {k: v for k, v in container.items() if k not in NON_SETTINGS}
    blob = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:HASH_LENGTH]


def run_subdir(config: DictConfig) -> str:
    """``<data>/<agent>/<model>-seed<seed>-<hash>`` (relative to ``run_root``)."""
    model = str(config.model.name).replace("/", "_")
    return f"{config.data.name}/{config.agent.name}/{model}-seed{config.seed}-{settings_hash(config)}"


def resume_target(resume: Any) -> Path | None:
    """The run directory named by ``resume=<path>``, or ``None`` for ``resume=true/false``."""
    if resume is None or isinstance(resume, bool):
        return None
    text = str(resume).strip()
    if text.lower() in ("true", "false", "yes", "no", "1", "0", ""):
        return None
    return Path(text).expanduser()


def ensure_writable(run_dir: Path) -> None:
    """Create ``run_dir`` and write a probe file in it, else :func:`fail` naming ``run_root``."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        fail(f"The run directory {run_dir} cannot be written ({exc.strerror or exc}). Choose a writable place for "
             f"runs with run_root=/some/writable/folder (runs go to <run_root>/<data>/<agent>/<model>-seed<seed>-<hash>).")


def _resolve_run_dir(*, _root_: DictConfig) -> str:
    target = resume_target(_root_.get("resume"))
    if target is not None:
        if not (target / CHECKPOINT).is_file() and not (target / PREVIOUS_CHECKPOINT).is_file():
            fail(
                f"resume={target} does not name a run directory with a checkpoint: "
                f"{target / CHECKPOINT} does not exist. Pass the folder a run printed at its "
                f"end (runs/<data>/<agent>/<model>-seed<seed>-<hash>), or resume=true to continue "
                f"the run of the same command."
            )
        run_dir = target
    else:
        run_dir = Path(str(_root_.run_root)) / run_subdir(_root_)
    ensure_writable(run_dir)
    return str(run_dir)


def _resolve_run_subdir(*, _root_: DictConfig) -> str:
    # Multirun: each job's folder, as a single run's, absolute (Hydra's os.path.join with hydra.sweep.dir keeps it).
    run_dir = Path(str(_root_.run_root)) / run_subdir(_root_)
    ensure_writable(run_dir)
    return os.path.abspath(run_dir)


def _resolve_sweep_dir(*, _root_: DictConfig) -> str:
    # One folder per multirun for its multirun.yaml: concurrent multiruns never overwrite each other's record.
    return str(Path(str(_root_.run_root)) / "multiruns" / f"{SWEEP_ID}-{os.getpid()}")


def _resolve_hydra_subdir(*, _root_: DictConfig) -> str | None:
    # Hydra must not overwrite the record of the run resume=<run_dir> continues, nor of a run live in the folder
    # (this invocation is about to be refused by the run lock).
    if resume_target(_root_.get("resume")) is not None:
        return None
    folders = [Path(str(_root_.run_root)) / run_subdir(_root_)]
    explicit = OmegaConf.select(_root_, "hydra.run.dir", default=None)
    if explicit is not None:
        folders.append(Path(str(explicit)))
    return None if any(is_held(f) for f in folders) else ".hydra"


def _resolve_sweep_suffix() -> str:
    # logger.group's "-sweep-<start time>" in a multirun (one W&B group per sweep); resolved in the job: never hashed.
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return f"-sweep-{SWEEP_ID}"
    return ""


# conf/config.yaml's las_* resolvers, at import: also for configs composed outside run.py (tests, notebooks).
for _name, _resolver in (("las_run_dir", _resolve_run_dir), ("las_run_subdir", _resolve_run_subdir),
                         ("las_sweep_dir", _resolve_sweep_dir), ("las_hydra_subdir", _resolve_hydra_subdir),
                         ("las_sweep_suffix", _resolve_sweep_suffix)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _resolver)
