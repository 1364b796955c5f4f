"""The training loop: any :class:`agents.base.Agent` through ``act`` / ``env.step`` / ``learn``, evaluated and
checkpointed each epoch; on CPU a run resumed at any epoch writes the same ``metrics.json`` as an uninterrupted one."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from agents.base import Agent, AgentSpec
from experiments.training import distributed
from experiments.config.errors import ConfigError
from experiments.training.guard import TrainingDiverged, full_disk_stops, record_failure, stop_on_interrupt
from experiments.tracking.loggers import Console, make_tracker
from experiments.runfolder.recovery import (check_same_data, checkpoint_to_resume, remove_stale_temporaries, start_from,
                                            started_from)
from experiments.runfolder.runfiles import CHECKPOINT, LOG_FILE
from experiments.runfolder.runlock import RunLock
from experiments.training.finish import (TEST_SELECTION_WARNING, BestWeights, RunResult, eval_subsets, evaluate_epoch,
                                         finish_run, pgd_name, split_validation)
from experiments.config.settings import RunSettings
from experiments.training.trainer import EpochTrainer, epoch_line, epoch_scalars
from las_env.checkpoint import FORMAT, atomic_save, data_fingerprint
from las_env.data import DataError, DatasetNotFoundError, ImageData
from las_env.datasets import load_dataset
from las_env.datasets.checks import check_image_size, classes_missing_from_train
from las_env.datasets.registry import is_registered, lookup
from las_env.env import LASEnv
from las_env.global_view import global_view
from las_env.sharding import process_shard
from las_env.validate import SettingError


def _rng_states(device: torch.device) -> dict[str, Any]:
    # Tensors and plain values only (weights_only=True loads them): numpy's uint32 keys as an int64 tensor.
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state(),
                              "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _restore_rng(states: Mapping[str, Any], device: torch.device) -> None:
    random.setstate(states["python"])
    name, keys, *rest = states["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys  # an ndarray in older checkpoints
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(states["torch"].cpu())
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"].cpu(), device)


def build_game(settings: RunSettings, data: ImageData) -> tuple[LASEnv, Agent, AgentSpec]:
    """The env from the final ``settings.env``, then the agent from its spec; a refusal is a :class:`ConfigError`."""
    cfg = settings.env
    n_train = data.x_train.shape[0]
    if cfg.batch_size > n_train:
        raise ConfigError(f"data.batch_size={cfg.batch_size} exceeds the {n_train} training images of {data.name}.")
    try:
        process_shard().check_batch(cfg.batch_size)  # the global batch splits into equal shards
    except ValueError as exc:
        raise ConfigError(f"data.batch_size={cfg.batch_size} is the global batch of all ranks, but {exc}") from None
    try:
        env = LASEnv(config=cfg, data=data, tensor_api=True)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    env = global_view(env)  # under torchrun: the global batch (las_env/global_view.py)
    spec = AgentSpec.from_game(env, seed=settings.seed)
    try:
        agent = settings.agent(spec)
    except SettingError as exc:
        raise ConfigError(exc.describe("agent.")) from None
    except (ValueError, TypeError) as exc:
        target = getattr(settings.agent, "target", settings.agent_name)
        raise ConfigError(f"The agent {target} rejected its settings: {exc}") from None
    if not isinstance(agent, Agent):
        raise ConfigError(
            f"{type(agent).__name__} is not an agent: it needs act, learn, state_dict and load_state_dict "
            f"(agents/base.py)."
        )
    distributed.check_agent(agent, env.game.shard)
    if not cfg.step_reward:  # the authors' reward flow: the agent scores its actions itself
        agent.bind_scorer(env.score)
    return env, agent, spec


def save_checkpoint(path: Path, *, settings: RunSettings, data: ImageData, fingerprint: str, env: LASEnv,
                    agent: Agent, loop: dict[str, Any], wandb_info: dict[str, Any] | None) -> Path:
    """Write the whole training state atomically (a crash mid-save leaves the previous file)."""
    cfg = env.config
    state = {
        "format": FORMAT,
        "meta": {
            "dataset": cfg.dataset,
            "data_root": cfg.data_root,
            "model": cfg.model,
            "in_channels": data.channels,
            "num_classes": data.num_classes,
            "data_fingerprint": fingerprint,
            "run_dir": str(settings.run_dir),
            "wandb": wandb_info,
            "agent": settings.agent_name,
            "seed": settings.seed,
            "settings_hash": settings.settings_hash,
            "epochs_done": loop["epochs_done"],
            "epochs": cfg.epochs,
        },
        # The same tensors as env["game"]["target"]: torch.save stores shared storage once.
        "target": env.game.target.state_dict(),
        "env": env.state_dict(),
        "agent": agent.state_dict(),
        "loop": loop,
        "config": settings.config,
    }
    return atomic_save(state, path, keep_previous=True)  # the one before stays as checkpoint.prev.pt


def train(settings: RunSettings, *, data: ImageData | None = None) -> RunResult:
    """Train, evaluate, checkpoint, log (holding the run lock); resume when asked. Raises :class:`ConfigError`
    (bad input, before training) or :class:`TrainingDiverged` (``results.json`` marks the run failed)."""
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    if settings.env.device == "cuda" and distributed.launched_world() > 1:  # this process's GPU: cuda:LOCAL_RANK
        settings = replace(settings, env=replace(settings.env, device=f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"))
    with distributed.process_group(settings.env.device, distributed.timeout_s(settings.config)):
        if process_shard().rank != 0:  # rank 0 alone holds the lock, writes and tracks; the others are quiet
            quiet = replace(settings, progress=False, logger=replace(settings.logger, name="none"))
            return _train(quiet, Console(quiet=True), data, None)
        with RunLock.acquire(settings.run_dir) as lock, stop_on_interrupt(settings.run_dir):
            return _train(settings, Console(settings.run_dir / LOG_FILE), data, lock)


def _train(settings: RunSettings, console: Console, data: ImageData | None, lock: RunLock | None) -> RunResult:
    run_dir = settings.run_dir
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)  # process-wide, as a run owns its process
    if lock is not None:
        if lock.took_over:
            console.print(f"Took over the lock of an earlier run in this folder that is no longer running "
                          f"(pid {lock.took_over.get('pid')}, started {lock.took_over.get('started')}).")
        remove_stale_temporaries(run_dir, console.print)
    ckpt = checkpoint_to_resume(settings, console.print)
    started = ckpt is None and settings.init_from is not None
    if started:
        ckpt = start_from(settings)  # another run's checkpoint, this command's settings
    cfg = settings.env
    device = torch.device(cfg.device)

    if data is None:
        try:
            data = load_dataset(cfg.dataset, cfg.data_root, download=True)
        except DatasetNotFoundError as exc:
            raise ConfigError(f"{exc} (data.root={cfg.data_root})") from None
        except DataError as exc:  # names the file or folder itself
            raise ConfigError(str(exc)) from None
    _check_data_fits(settings, data, console)
    fingerprint = data_fingerprint(data.x_train, data.y_train, data.x_test, data.y_test)
    if ckpt is not None:
        check_same_data(ckpt, fingerprint, settings, started=started)
    sel = settings.selection
    data, val = split_validation(data, sel.val_fraction, sel.split_seed)  # the target never trains on val
    if sel.select_on == "test":
        console.print(TEST_SELECTION_WARNING)
    env, agent, _ = build_game(settings, data)
    pgd = pgd_name(settings)

    obs, info = env.reset(seed=settings.seed)
    loop: dict[str, Any] = {"epochs_done": 0, "history": [], "rng": None, "seconds": {"train": 0.0, "eval": 0.0}}
    if ckpt is not None:
        try:
            env.load_state_dict(ckpt["env"])
            agent.load_state_dict(ckpt["agent"])
            loop = ckpt["loop"]
            _restore_rng(loop["rng"], device)
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as exc:
            where, fix = ((settings.init_from, "drop init_from to start afresh") if started else
                          (run_dir, f"move the folder aside (mv {run_dir} {run_dir}.old) and run the command again "
                                    f"to start over"))
            raise ConfigError(
                f"The checkpoint of {where} does not fit this run ({type(exc).__name__}: {exc}): a key is missing "
                f"or a tensor has another shape (a checkpoint edited by hand, or written by another version of "
                f"the code). Restore the checkpoint that run wrote, or {fix}.") from None
        obs, info = env.observe()
        if started:
            console.print(started_from(env, ckpt, settings))
        else:
            console.print(f"Resuming {run_dir} after epoch {loop['epochs_done']} of {cfg.epochs}.")
    else:
        if settings.resume:
            console.print(f"resume=true but {run_dir} holds no checkpoint yet: starting the run.")
        k = env.config.reward_interval
        reward = f"full strategy reward every {k} steps" if k else "no step pays the full strategy reward"
        console.print(
            f"LAS-AT training: {settings.agent_name} agent, {cfg.model} on {data.description}; {cfg.epochs} epochs "
            f"x {env.game.steps_per_epoch} steps of {cfg.batch_size} images, {reward}; threat model "
            f"{cfg.threat.description}. Run directory: {run_dir}"
        )

    previous_wandb = None if started else (ckpt or {}).get("meta", {}).get("wandb")
    tracker = make_tracker(settings.logger, run_dir, settings.config, previous_wandb)
    subsets = ({"val": val} if val is not None else {}) | eval_subsets(env.game.data, settings.eval.test_subset,
                                                                        settings.eval.train_subset)
    best = BestWeights.from_dict(sel.select_on, loop.get("best"))
    history: list[dict[str, Any]] = loop["history"]
    ckpt_path = run_dir / CHECKPOINT
    trainer = EpochTrainer(settings, env, agent, tracker, obs, info, settings.init_from if started else None)
    start = loop["epochs_done"]
    stop_at = cfg.epochs if settings.stop_after_epochs is None else min(cfg.epochs, start + settings.stop_after_epochs)
    epoch_bar = tqdm(total=cfg.epochs, initial=start, desc="epochs", unit="epoch",
                     disable=not settings.progress, dynamic_ncols=True)
    try:
        for epoch in range(start, stop_at):
            rec = trainer.epoch(epoch)
            t1 = time.perf_counter()
            evaluated = epoch + 1 == cfg.epochs or (epoch + 1) % settings.eval.every == 0
            rec["eval"] = ev = evaluate_epoch(env.game.target, subsets, settings) if evaluated else None
            rec["seconds"]["eval"] = time.perf_counter() - t1
            history.append(rec)
            with full_disk_stops(run_dir, f"the checkpoint of epoch {epoch + 1}", _checkpoint_bytes(ckpt_path, env)):
                if lock is not None:  # rank 0 writes
                    lock.verify()  # the folder is still this run's
                    best.update(epoch + 1, ev, env.game.target, run_dir)  # best.pt before the checkpoint
                loop["best"] = best.as_dict()
                loop["epochs_done"] = epoch + 1
                for key in ("train", "eval"):
                    loop["seconds"][key] += rec["seconds"][key]
                loop["rng"] = _rng_states(device)
                if lock is not None:
                    save_checkpoint(ckpt_path, settings=settings, data=data, fingerprint=fingerprint, env=env,
                                    agent=agent, loop=loop, wandb_info=tracker.info)
            tracker.log(epoch_scalars(rec), env.game.step_index)
            tracker.log_choices({n: (env.space.values[n], c) for n, c in rec["choices"].items()},
                                env.game.step_index)
            console.print(epoch_line(rec, cfg.epochs, pgd))
            epoch_bar.update(1)
            if ev:
                epoch_bar.set_postfix(test_clean=f"{ev['test_clean']:.3f}", test_pgd=f"{ev['test_robust']:.3f}",
                                      refresh=False)
        epoch_bar.close()
        if loop["epochs_done"] < cfg.epochs:
            console.print(
                f"Stopped after epoch {loop['epochs_done']} of {cfg.epochs} (stop_after_epochs="
                f"{settings.stop_after_epochs}); the checkpoint is {ckpt_path}. Continue with the same command plus "
                f"resume=true."
            )
            tracker.finish()
            return RunResult(run_dir, False, loop["epochs_done"], history, seconds=dict(loop["seconds"]),
                             files={"checkpoint": str(ckpt_path)}, wandb_offline_dir=tracker.offline_dir)
        if lock is None:  # the final evaluation is rank 0's alone; the other ranks leave now
            return RunResult(run_dir, True, loop["epochs_done"], history, seconds=dict(loop["seconds"]))
        lock.verify()
        with full_disk_stops(run_dir, "the final results (weights, results.json, metrics.json, plots)",
                             _checkpoint_bytes(ckpt_path, env) // 2):
            return finish_run(settings, data, env, loop, tracker, console, pgd, best, before_writing=lock.verify)
    except TrainingDiverged as exc:  # results.json and W&B say "failed"; the last checkpoint stays
        record_failure(exc, settings, history, tracker, console)
        raise
    except BaseException:
        tracker.finish()  # flush what W&B has; the checkpoint of the last finished epoch is on disk
        raise
    finally:
        epoch_bar.close()


def _check_data_fits(settings: RunSettings, data: ImageData, console: Console) -> None:
    """Images large enough for the target and the strategy backbone; a warning for classes the train split lacks."""
    record = lookup(data.name) if is_registered(data.name) else None
    models = {"model.name": settings.env.model or (record.model_for(data.height, data.width) if record else "")}
    agent = settings.config.get("agent") or {}
    if "backbone" in agent:  # the strategy network's (agent=reinforce); null: the data set's default
        models["agent.backbone"] = agent["backbone"] or (record.backbone_for(data.height, data.width) if record else "")
    try:
        check_image_size(data, models)
    except DataError as exc:
        raise ConfigError(str(exc)) from None
    warning = classes_missing_from_train(data)
    if warning:
        console.print(warning)


def _checkpoint_bytes(path: Path, env: LASEnv) -> int:
    """About what one more checkpoint needs: the last one's size, else weights + optimiser state + 1 MiB."""
    if path.is_file():
        return path.stat().st_size
    weights = sum(t.numel() * t.element_size() for t in env.game.target.state_dict().values())
    return 2 * weights + 2**20
