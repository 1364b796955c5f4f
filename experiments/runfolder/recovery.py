"""What a run finds in its folder at start (under its lock): the checkpoint to resume (``checkpoint.prev.pt``
when the latest is damaged), leftover temporary files, ``init_from``'s checkpoint."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from experiments.config.errors import ConfigError
from experiments.runfolder.runfiles import CHECKPOINT, RUN_FILES
from las_env.checkpoint import (TRAINING_KEYS, CorruptCheckpointError, NotACheckpointError, load_checkpoint,
                                 previous_path, require_keys)
from las_env.files import stale_temp_files


def remove_stale_temporaries(run_dir: Path, say: Callable[[str], None]) -> None:
    """Delete the temporary files of the run's killed atomic writes (under the run lock: no live writer's)."""
    stale = stale_temp_files(run_dir, RUN_FILES, any_writer=True)
    size = 0
    for p in stale:
        try:
            size += p.stat().st_size
            p.unlink()
        except FileNotFoundError:
            pass
    if stale:
        say(f"Removed {len(stale)} temporary file(s) left by an interrupted write in {run_dir} "
            f"({size / 2**20:.1f} MiB): {', '.join(p.name for p in stale)}.")


def checkpoint_to_resume(settings: Any, say: Callable[[str], None]) -> dict[str, Any] | None:
    """The checkpoint to resume from, or None; refused without ``resume``, of other settings, or unreadable."""
    run_dir, resume, settings_hash = settings.run_dir, settings.resume, settings.settings_hash
    path = run_dir / CHECKPOINT
    prev = previous_path(path)
    if not path.is_file() and not prev.is_file():
        return None
    try:
        source = path if path.is_file() else prev
        ckpt = load_checkpoint(source)
        require_keys(ckpt, source, TRAINING_KEYS)
    except CorruptCheckpointError as exc:
        if exc.previous is None:
            raise ConfigError(str(exc)) from None
        try:
            ckpt = load_checkpoint(exc.previous)
            require_keys(ckpt, exc.previous, TRAINING_KEYS)
        except (CorruptCheckpointError, ValueError) as again:
            raise ConfigError(f"{exc.path} and {exc.previous} are both unusable ({again}). To start the run over, "
                              f"move the folder aside (mv {run_dir} {run_dir}.old) and run the command "
                              f"again.") from None
        if not resume:
            raise ConfigError(
                f"The checkpoint {exc.path} is damaged ({exc.reason}), but the previous one, {exc.previous} (epoch "
                f"{ckpt.get('meta', {}).get('epochs_done', '?')}), is readable. Add resume=true to the same command "
                f"to continue from it (the damaged file is kept as checkpoint.damaged.pt), or move the folder aside "
                f"(mv {run_dir} {run_dir}.old) to start over.") from None
        damaged = path.with_name(f"{path.stem}.damaged{path.suffix}")
        os.replace(path, damaged)
        say(f"{exc.path} is damaged ({exc.reason}); moved it to {damaged.name} and resuming from {prev.name} "
            f"(epoch {ckpt.get('meta', {}).get('epochs_done', '?')}).")
        source = prev
    except NotACheckpointError as exc:  # readable, but not ours: never advise deleting it
        raise ConfigError(f"{exc} It is in the run directory {run_dir}, where this run keeps its own checkpoint "
                          f"under that name: move it out of the folder, then run the command again.") from None
    meta = ckpt.get("meta", {})
    where = f"epoch {meta.get('epochs_done', '?')} of {meta.get('epochs', '?')}"
    saved = meta.get("settings_hash")
    if saved and settings_hash and saved != settings_hash:
        # Not resume=<dir>: it would read this folder's recorded settings (this command's) and meet the same mismatch.
        raise ConfigError(
            f"The checkpoint {source} was written by a run with other settings (hash {saved}, first written in "
            f"{meta.get('run_dir', 'another folder')}; this command's settings hash to {settings_hash}), so "
            f"continuing it here would mix two configurations. Move {path.name} and {prev.name} back to their own "
            f"run folder (runs are named <model>-seed<seed>-<hash>), or out of {run_dir}, to start this command's "
            f"run over."
        )
    if not resume:
        raise ConfigError(
            f"The run directory {run_dir} already holds a checkpoint of this exact configuration "
            f"({where}). Add resume=true to the same command to continue it (a finished run re-prints its "
            f"results), move the folder aside (mv {run_dir} {run_dir}.old) to start over, or change a setting "
            f"(e.g. seed=1): any change of setting gets a folder of its own."
        )
    return ckpt


# What init_from must share with its source (they fix the saved state's shape); the rest may change.
MUST_MATCH = (("data", "name"), ("model", "name"), ("data", "batch_size"), ("data", "epochs"),
              ("data", "max_steps_per_epoch"), ("data", "grid"), ("agent",))


def _get(config: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        config = config.get(key) if isinstance(config, dict) else None
    return config


def start_from(settings: Any) -> dict[str, Any]:
    """``init_from=<run_dir or checkpoint>``: that run's checkpoint, checked to fit this run (:data:`MUST_MATCH`)."""
    source = Path(settings.init_from)
    try:
        ckpt = load_checkpoint(source)
        require_keys(ckpt, source, TRAINING_KEYS)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"init_from={source}: {exc}") from None
    theirs, mine = ckpt.get("config") or {}, settings.config
    differ = [".".join(key) for key in MUST_MATCH if _get(theirs, key) != _get(mine, key)]
    if differ:
        raise ConfigError(
            f"init_from={source}: that run differs from this command in {', '.join(differ)}, which fix the shape "
            f"of the saved state. A run can start from another's checkpoint only with the same data, model, "
            f"batch size, epochs, steps per epoch, strategy grid and agent settings; change the optimiser "
            f"(data.optim.*), the reward or the evaluation instead, or drop init_from to start afresh."
        )
    return ckpt


def check_same_data(ckpt: dict[str, Any], fingerprint: str, settings: Any, *, started: bool) -> None:
    """Refuse to continue a checkpoint on other data than its ``data_fingerprint`` (unless init_from_other_data)."""
    saved = (ckpt.get("meta") or {}).get("data_fingerprint")
    if saved is None or saved == fingerprint:
        return
    data = f"data={settings.env.dataset} (data.root/path {settings.env.data_root})"
    if started:
        if settings.init_from_other_data:
            return
        raise ConfigError(
            f"init_from={settings.init_from}: that run trained on other data (content fingerprint {saved}) than "
            f"this command loads, {data} (fingerprint {fingerprint}): the files changed, or name another data set "
            f"of the same shape. If you mean to continue those weights on this data, add init_from_other_data=true; "
            f"otherwise point data.root/data.path at the data that run used.")
    raise ConfigError(
        f"The checkpoint in {settings.run_dir} was trained on other data (content fingerprint {saved}) than this "
        f"command now loads, {data} (fingerprint {fingerprint}): the files under the same path changed since the "
        f"run started, and resuming would mix two data sets in one run. Restore the original files to resume, or "
        f"train on the new data in a run folder of its own: move this one aside (mv {settings.run_dir} "
        f"{settings.run_dir}.old) and run the command again, or start from these weights in a new folder with "
        f"init_from={settings.run_dir} init_from_other_data=true (init_from gives the run a folder of its own).")


def started_from(env: Any, ckpt: dict[str, Any], settings: Any) -> str:
    """After :func:`start_from`'s checkpoint is loaded: this run's momentum and weight decay (the schedule sets
    the lr), the start recorded in the loop state; the line to print."""
    optim = settings.env.optim
    for group in env.game.trainer.optimizer.param_groups:
        group["momentum"] = optim.momentum
        group["weight_decay"] = optim.weight_decay
    loop = ckpt["loop"]
    loop["init_from"] = {"run_dir": ckpt["meta"].get("run_dir"), "epochs_done": loop["epochs_done"]}
    return (f"Starting {settings.run_dir} from {settings.init_from} after epoch {loop['epochs_done']} of "
            f"{settings.env.epochs}, with this command's settings (init_from).")
