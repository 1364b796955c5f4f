"""The training loop: LAS-AT from the first step to the results table, resumable at any epoch.

:func:`train` is what ``experiments/run.py`` calls (tests and benchmarks call it directly).
It drives any :class:`agents.base.Agent` exactly as ``agents/base.py`` describes::

    obs, info = env.reset(seed=seed)                  # LASEnv(tensor_api=True)
    while not done:
        action = agent.act(obs, info)
        obs, reward, done, _, info = env.step(action)
        metrics = agent.learn(reward, info)

and around it: per-epoch evaluation (clean and PGD accuracy on a test subset and a fixed train
subset), per-epoch counts of the chosen attack settings, an atomic checkpoint after every epoch,
the final evaluation, results as JSON and Markdown, PNG plots, and the tracker (W&B).

The hot loop never waits for the device: step metrics are summed into device tensors and read
back once per ``log_every_steps`` steps and at the end of each epoch; the histograms of chosen
settings are one ``index_add_`` per step, on the device.

Resume: the checkpoint holds the env (target, optimiser, schedule position, data order, RNG),
the agent's state, and the loop's (history, epoch, global RNG states; the W&B run id is in ``meta``). On CPU
a run stopped after any epoch and resumed ends with exactly the metrics of an uninterrupted run
(``metrics.json`` is byte-identical; ``tests/test_run.py`` checks it).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from agents.base import Agent, AgentSpec, scores_own_actions
from evaluation import AttackResult, attack_spec, evaluate, format_eps, format_table
from experiments import distributed, plots
from experiments.errors import ConfigError
from experiments.guard import SKIPPED, Context, DivergenceGuard, TrainingDiverged, record_failure
from experiments.loggers import Console, Tracker, WandbTracker, make_tracker
from experiments.recovery import checkpoint_to_resume, remove_stale_temporaries, start_from, started_from
from experiments.runfiles import (
    ACCURACY_PNG, AUTOATTACK_STATE, AUTOATTACK_STATE_BEST, BEST, CHECKPOINT, CHOICES_PNG, LOG_FILE, METRICS_FILE,
    METRICS_FORMAT, RESULTS_FILE, RESULTS_FORMAT, RESULTS_MD, WEIGHTS_FILE)
from experiments.runlock import RunLock
from experiments.selection import TEST_SELECTION_WARNING, BestWeights, split_validation, with_validation
from experiments.settings import RunSettings
from las_env.checkpoint import FORMAT, atomic_save, export_state_dict
from las_env.data import DataError, DatasetNotFoundError, ImageData, load_dataset
from las_env.env import LASEnv
from las_env.game import steps_per_epoch
from las_env.files import atomic_write_text, write_json
from las_env.grids import ThreatModel, threat_model_for

TRAIN_SUBSET_SEED = 20220601
"""Seed of the fixed train-subset choice: the same images for every run, whatever its seed."""


@dataclass
class RunResult:
    """What :func:`train` returns (everything is also written to ``run_dir``).

    Attributes:
        completed: False when the run stopped early (``stop_after_epochs``); resumable.
        final: the final evaluation, one result per attack (empty when not completed).
        table: the printed Markdown results table.
        files: name -> path of what the run wrote.
    """

    run_dir: Path
    completed: bool
    epochs_done: int
    history: list[dict[str, Any]]
    final: list[AttackResult] = field(default_factory=list)
    table: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    wandb_offline_dir: Path | None = None


# ----------------------------------------------------------------------------- game setup


def episode_shape(n_train: int, batch_size: int, epochs: int, max_steps_per_epoch: int | None,
                  last_batch: str = "drop") -> tuple[int, int]:
    """``(steps_per_epoch, total_steps)`` of an episode, as :class:`las_env.game.LASGame` counts
    them (``last_batch``: see ``LASConfig``). The agent needs them before the env
    exists, since the env's reward interval is the agent's ``k``."""
    per_epoch = steps_per_epoch(n_train, batch_size, max_steps_per_epoch, last_batch)
    return per_epoch, per_epoch * epochs


def build_game(settings: RunSettings, data: ImageData) -> tuple[LASEnv, Agent, AgentSpec]:
    """The agent (from its factory) and the env paying the full reward every ``agent.reward_interval`` steps.

    Raises:
        ConfigError: the agent rejects its settings, or is not an :class:`Agent`.
    """
    cfg = settings.env
    n_train = data.x_train.shape[0]
    if cfg.batch_size > n_train:
        raise ConfigError(f"data.batch_size={cfg.batch_size} exceeds the {n_train} training images of {data.name}.")
    distributed.check_batch(cfg.batch_size)
    per_epoch, total = episode_shape(n_train, cfg.batch_size, cfg.epochs, cfg.max_steps_per_epoch, cfg.last_batch)
    spec = AgentSpec(
        grid=cfg.grid,
        observation_shape=(cfg.batch_size, data.channels, data.height, data.width),
        num_classes=data.num_classes,
        dataset=cfg.dataset,
        device=torch.device(cfg.device),
        total_steps=total,
        steps_per_epoch=per_epoch,
        seed=settings.seed,
    )
    try:
        agent = settings.agent(spec)
    except (ValueError, TypeError) as exc:
        target = getattr(settings.agent, "target", settings.agent_name)
        raise ConfigError(f"The agent {target} rejected its settings: {exc}") from None
    if not isinstance(agent, Agent):
        raise ConfigError(
            f"{type(agent).__name__} is not an agent: it needs reward_interval, act, learn, state_dict "
            f"and load_state_dict (agents/base.py)."
        )
    k = agent.reward_interval
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"{type(agent).__name__}.reward_interval={k!r}: it must be a whole number >= 1.")
    scorer = scores_own_actions(agent)  # the authors' reward flow: the agent calls env.score itself
    reward = cfg.reward
    if getattr(agent, "needs_pre_update_probe", False):  # e.g. credit=unbiased (agents/credit.py)
        reward = replace(reward, pre_update_probe=True)
    try:
        env = LASEnv(config=replace(cfg, reward_interval=k, reward=reward, step_reward=not scorer), data=data,
                     tensor_api=True)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    distributed.check_agent(agent, env.game.shard)
    env = distributed.global_view(env)  # under torchrun: the global batch (experiments/distributed.py)
    if scorer:
        agent.bind_scorer(env.score)
    if (env.game.steps_per_epoch, env.game.total_steps) != (per_epoch, total):  # guards episode_shape
        raise RuntimeError("episode_shape() disagrees with LASGame about the episode's length.")
    return env, agent, spec


def current_observation(env: LASEnv) -> tuple[Tensor, dict[str, Any]]:
    """The observation and info of the env's current batch (after ``load_state_dict``)."""
    return env.observe()


# ----------------------------------------------------------------------------- metrics


class StepMeter:
    """Running sums of per-step scalars, kept on the device so adding never synchronises.

    ``flush`` reads every sum back in one transfer and resets; the loop calls it every
    ``log_every_steps`` steps and at the end of each epoch.
    """

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._host: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def add(self, name: str, value: Any) -> None:
        if isinstance(value, Tensor):
            v = value.detach().float()
            v = v if v.dim() == 0 else v.mean()
            self._sums[name] = self._sums[name] + v if name in self._sums else v.clone()
        else:
            self._host[name] = self._host.get(name, 0.0) + float(value)
        self._counts[name] = self._counts.get(name, 0) + 1

    def flush(self) -> dict[str, tuple[float, int]]:
        """``name -> (sum, count)`` since the last flush (one device read for all of them)."""
        names = list(self._sums)
        values = torch.stack([self._sums[n] for n in names]).tolist() if names else []
        out = {n: (v, self._counts[n]) for n, v in zip(names, values)}
        out.update({n: (v, self._counts[n]) for n, v in self._host.items()})
        self._sums, self._host, self._counts = {}, {}, {}
        return out


def _means(sums: Mapping[str, tuple[float, int]]) -> dict[str, float]:
    return {n: s / c for n, (s, c) in sums.items() if c}


def _record_step(meter: StepMeter, env: LASEnv, reward: Tensor, info: Mapping[str, Any],
                 metrics: Mapping[str, Any]) -> None:
    """Everything one step reports, summed on the device."""
    meter.add("train/loss", info["train_loss"])
    meter.add("train/adv_accuracy", info["adv_accuracy"])
    meter.add("attack/epsilon", info["epsilon"])
    meter.add("attack/iterations", info["iterations"].float())
    meter.add("attack/step_size", info["step_size"])
    meter.add("train/lr", info["lr"])
    if info["reward_computed"]:
        r = env.config.reward
        meter.add("reward/total", reward)
        meter.add("reward/l1", info["l1"])
        if r.use_l2:
            meter.add("reward/l2", info["l2"])
            meter.add("reward/probe_accuracy", info["probe_accuracy"])
        if r.use_l3:
            meter.add("reward/l3", info["l3"])
            meter.add("reward/clean_accuracy", info["clean_accuracy"])
    for key, value in metrics.items():
        if isinstance(value, (Tensor, int, float)) and not isinstance(value, bool):
            meter.add(f"agent/{key}", value)


class EpochTotals:
    """Host-side totals of one epoch, fed by the meter's flushes (so no extra device reads)."""

    def __init__(self) -> None:
        self.sums: dict[str, tuple[float, int]] = {}

    def absorb(self, window: Mapping[str, tuple[float, int]]) -> None:
        for n, (s, c) in window.items():
            s0, c0 = self.sums.get(n, (0.0, 0))
            self.sums[n] = (s0 + s, c0 + c)

    def means(self) -> dict[str, float]:
        return _means(self.sums)


# ----------------------------------------------------------------------------- evaluation


def eval_subsets(data: ImageData, test_n: int | None, train_n: int | None) -> dict[str, tuple[Tensor, Tensor]]:
    """The per-epoch evaluation images: the first ``test_n`` test images (RobustBench order)
    and ``train_n`` training images drawn once with a fixed seed (some data sets store their
    training images sorted by class, so "the first n" would be a few classes only)."""
    n_test = min(test_n or data.x_test.shape[0], data.x_test.shape[0])
    n_train_total = data.x_train.shape[0]
    n_train = min(train_n or n_train_total, n_train_total)
    g = torch.Generator().manual_seed(TRAIN_SUBSET_SEED)
    idx = torch.randperm(n_train_total, generator=g)[:n_train].sort().values.to(data.x_train.device)
    return {
        "test": (data.x_test[:n_test], data.y_test[:n_test]),
        "train": (data.x_train[idx], data.y_train[idx]),
    }


def evaluate_epoch(model: torch.nn.Module, subsets: Mapping[str, tuple[Tensor, Tensor]], threat: ThreatModel,
                   settings: RunSettings) -> dict[str, float | int]:
    """Clean and PGD-k accuracy of ``model`` on each subset (fractions, plus image counts)."""
    ev = settings.eval
    out: dict[str, float | int] = {}
    for split, (x, y) in subsets.items():
        r = distributed.robust_accuracy(model, x, y, threat.epsilon, threat.step_size, ev.pgd_iterations,
                                        batch_size=ev.batch_size, seed=ev.seed)  # torchrun: split over ranks
        out[f"{split}_clean"] = r.clean
        out[f"{split}_robust"] = r.robust
        out[f"{split}_images"] = int(x.shape[0])
    return out


def _pgd_name(settings: RunSettings, threat: ThreatModel) -> str:
    return (f"PGD-{settings.eval.pgd_iterations} (L-inf eps={format_eps(threat.epsilon)}, "
            f"step {format_eps(threat.step_size)})")


# ----------------------------------------------------------------------------- checkpoints


def _rng_states(device: torch.device) -> dict[str, Any]:
    states: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _restore_rng(states: Mapping[str, Any], device: torch.device) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"].cpu())
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"].cpu(), device)


def save_checkpoint(path: Path, *, settings: RunSettings, data: ImageData, env: LASEnv, agent: Agent,
                    loop: dict[str, Any], wandb_info: dict[str, Any] | None) -> Path:
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


# ----------------------------------------------------------------------------- the loop


def _epoch_line(rec: Mapping[str, Any], epochs: int, pgd: str) -> str:
    t = rec["train"]
    parts = [f"epoch {rec['epoch']}/{epochs}",
             f"train loss {t.get('train/loss', math.nan):.3f}, accuracy on its {rec['images']} training images "
             f"under the agent's attacks {t.get('train/adv_accuracy', math.nan):.1%} (mean chosen eps "
             f"{format_eps(t.get('attack/epsilon', math.nan))})"]
    if "reward/total" in t:
        parts.append(f"reward {t['reward/total']:.3f}")
    skipped = int(t.get(SKIPPED, 0))
    if skipped:
        parts.append(f"{skipped} batches with a non-finite gradient skipped (on_nonfinite=skip)")
    ev = rec.get("eval")
    if ev and "val_images" in ev:
        parts.append(f"validation {ev['val_images']}: clean {ev['val_clean']:.1%}, {pgd} {ev['val_robust']:.1%}")
    if ev:
        parts.append(f"test first {ev['test_images']} / train subset {ev['train_images']}: clean "
                     f"{ev['test_clean']:.1%} / {ev['train_clean']:.1%}, {pgd} {ev['test_robust']:.1%} / "
                     f"{ev['train_robust']:.1%}")
    parts.append(f"{rec['seconds']['train'] + rec['seconds']['eval']:.1f}s")
    return " | ".join(parts)


def _epoch_scalars(rec: Mapping[str, Any]) -> dict[str, float]:
    out = {f"epoch/{k}": v for k, v in rec["train"].items()}
    out.update({f"eval/{k}": v for k, v in (rec.get("eval") or {}).items()})
    out["epoch"] = rec["epoch"]
    out["time/epoch_seconds"] = rec["seconds"]["train"] + rec["seconds"]["eval"]
    out["time/train_images_per_second"] = rec["images"] / max(rec["seconds"]["train"], 1e-9)
    return out


@dataclass
class _Epoch:
    """What one epoch of training produced (host values; device work is finished)."""

    totals: dict[str, float]
    choices: dict[str, list[int]]
    seconds: float
    fixed_images: dict[str, list]


class FixedImageChoices:
    """The attack chosen for a few fixed training images each epoch (the paper's Fig. 5).

    The images are the first ``count`` of the training set. At the start of an epoch their
    (step, slot) positions are read from the epoch's order once; during the epoch the step that
    trains an image copies its chosen settings on the device (no synchronisation per step).
    An image in the epoch's dropped partial batch gets ``None`` for that epoch.
    """

    def __init__(self, game, count: int = 8) -> None:
        self.game = game
        self.index = torch.arange(min(count, game.data.x_train.shape[0]), device=game.device)
        self._where: dict[int, tuple[Tensor, Tensor]] = {}

    def start_epoch(self) -> None:
        b, steps = self.game.config.batch_size, self.game.steps_per_epoch
        position = torch.argsort(self.game.epoch_order)[self.index].tolist()  # once per epoch
        by_step: dict[int, tuple[list[int], list[int]]] = {}
        for k, pos in enumerate(position):
            if pos // b < steps:
                ks, slots = by_step.setdefault(pos // b, ([], []))
                ks.append(k)
                slots.append(pos % b)
        device = self.game.device
        self._where = {i: (torch.tensor(ks, device=device), torch.tensor(sl, device=device))
                       for i, (ks, sl) in by_step.items()}
        self._chosen = {n: torch.full((len(self.index),), math.nan, device=device)
                        for n in ("epsilon", "step_size", "iterations")}

    def record(self, step_in_epoch: int, info: Mapping[str, Any]) -> None:
        where = self._where.get(step_in_epoch)
        if where is not None:
            ks, slots = where
            for name, values in self._chosen.items():
                values[ks] = info[name][slots].float()

    def result(self) -> dict[str, list]:
        out: dict[str, list] = {"index": self.index.tolist()}
        for name, values in self._chosen.items():
            out[name] = [None if math.isnan(v) else round(v, 6) for v in values.tolist()]
        return out


class _Trainer:
    """Runs epochs of the agent/env loop; keeps what must survive from one epoch to the next
    (the current observation and info, the step meter) and the per-step constants."""

    def __init__(self, settings: RunSettings, env: LASEnv, agent: Agent, tracker: Tracker,
                 obs: Tensor, info: dict[str, Any]) -> None:
        self.settings, self.env, self.agent, self.tracker = settings, env, agent, tracker
        self.obs, self.info = obs, info
        self.meter = StepMeter()
        cfg = settings.env
        self.device = torch.device(cfg.device)
        self.nvec = list(cfg.grid.nvec)
        self.columns = cfg.grid.columns
        # Chosen settings are counted in one flat vector: [step sizes | iterations | epsilons | extras].
        self.offsets = torch.tensor([sum(self.nvec[:j]) for j in range(len(self.nvec))], device=self.device)
        self.ones = torch.ones(cfg.batch_size * len(self.nvec), dtype=torch.long, device=self.device)
        self.fixed_images = FixedImageChoices(env.game)
        self.guard = DivergenceGuard(env.game, settings.on_nonfinite)

    def epoch(self, index: int) -> _Epoch:
        env, agent, meter, every = self.env, self.agent, self.meter, self.settings.log_every_steps
        batch = self.settings.env.batch_size
        counts = torch.zeros(sum(self.nvec), dtype=torch.long, device=self.device)
        totals = EpochTotals()
        t0 = time.perf_counter()
        self.fixed_images.start_epoch()
        with tqdm(total=env.game.steps_per_epoch * batch, desc=f"epoch {index + 1}", unit="img", unit_scale=True,
                  leave=False, disable=not self.settings.progress, dynamic_ncols=True) as bar:
            for i in range(env.game.steps_per_epoch):
                try:
                    action = agent.act(self.obs, self.info)
                    self.obs, reward, _, _, self.info = env.step(action)
                    metrics = agent.learn(reward, self.info)
                except Exception as exc:
                    self.guard.flush_after_error(meter, exc)  # a NaN behind it: the divergence paragraph
                    raise
                self.guard.record(meter, self.info["train_loss"])
                self.fixed_images.record(i, self.info)
                # index_add_, not bincount: bincount on CUDA reads the max back to size its output.
                a = torch.as_tensor(action, device=self.device).long()
                counts.index_add_(0, (a + self.offsets).flatten(), self.ones)
                _record_step(meter, env, reward, self.info, metrics)
                bar.update(batch)
                step = env.game.step_index
                if every and step % every == 0:
                    window = self.guard.flush(meter)  # raises TrainingDiverged on a non-finite value
                    totals.absorb(window)
                    means = _means(window)
                    self.tracker.log({f"step/{k}": v for k, v in means.items()}, step)
                    bar.set_postfix(loss=f"{means.get('train/loss', math.nan):.3f}",
                                    adv_acc=f"{means.get('train/adv_accuracy', math.nan):.2f}",
                                    eps=format_eps(means.get("attack/epsilon", math.nan)), refresh=False)
        totals.absorb(self.guard.flush(meter))  # also waits for the device: the timing below is honest
        seconds = time.perf_counter() - t0
        flat, ends = counts.tolist(), [sum(self.nvec[:j + 1]) for j in range(len(self.nvec))]
        choices = {name: flat[end - n:end] for name, n, end in zip(self.columns, self.nvec, ends)}
        return _Epoch(self.guard.epoch_totals(totals.sums), choices, seconds, self.fixed_images.result())


def train(settings: RunSettings, *, data: ImageData | None = None, console: Console | None = None) -> RunResult:
    """Train, evaluate, checkpoint, log; resume from ``settings.run_dir`` when asked.

    The run holds its folder's lock (``experiments/runlock.py``) from before any work to the end.

    Raises:
        ConfigError: bad input found during setup (missing data, an agent rejecting its
            settings, an existing checkpoint without ``resume``, a folder in use by another
            live run, a damaged checkpoint...), always before training.
        TrainingDiverged: a non-finite loss, reward, gradient norm or weight
            (``experiments/guard.py``); the checkpoint on disk is the last finite one and
            ``results.json`` marks the run failed.
    """
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    settings = distributed.localized(settings)
    with distributed.process_group(settings.env.device, distributed.timeout_s(settings.config)):
        if not distributed.is_main():  # rank 0 alone holds the lock and writes (experiments/distributed.py)
            return _train(*distributed.for_this_rank(settings, console), data, None)
        with RunLock.acquire(settings.run_dir) as lock:
            return _train(settings, console, data, lock)


def _train(settings: RunSettings, console: Console | None, data: ImageData | None, lock: RunLock | None) -> RunResult:
    run_dir = settings.run_dir
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)  # process-wide, as a run owns its process
    console = console or Console(run_dir / LOG_FILE)
    if lock is not None and lock.took_over:
        console.print(f"Took over the lock of an earlier run in this folder that is no longer running "
                      f"(pid {lock.took_over.get('pid')}, started {lock.took_over.get('started')}).")
    if lock is not None:
        remove_stale_temporaries(run_dir, console.print)
    ckpt = checkpoint_to_resume(run_dir, resume=settings.resume, settings_hash=settings.settings_hash,
                                say=console.print)
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
    sel = settings.selection
    data, val = split_validation(data, sel.val_fraction, sel.split_seed)  # the target never trains on val
    if sel.select_on == "test":
        console.print(TEST_SELECTION_WARNING)
    env, agent, _ = build_game(settings, data)
    threat = threat_model_for(cfg.dataset)
    pgd = _pgd_name(settings, threat)

    obs, info = env.reset(seed=settings.seed)
    loop: dict[str, Any] = {"epochs_done": 0, "history": [], "rng": None, "seconds": {"train": 0.0, "eval": 0.0}}
    if ckpt is not None:
        env.load_state_dict(ckpt["env"])
        agent.load_state_dict(ckpt["agent"])
        loop = ckpt["loop"]
        _restore_rng(loop["rng"], device)
        obs, info = current_observation(env)
        if started:
            console.print(started_from(env, ckpt, settings))
        else:
            console.print(f"Resuming {run_dir} after epoch {loop['epochs_done']} of {cfg.epochs}.")
    else:
        if settings.resume:
            console.print(f"resume=true but {run_dir} holds no checkpoint yet: starting the run.")
        k = env.config.reward_interval
        reward = (f"full strategy reward every {k} steps" if k <= env.game.total_steps
                  else f"no step pays the full strategy reward (interval {k} > {env.game.total_steps} steps)")
        console.print(
            f"LAS-AT training: {settings.agent_name} agent, {cfg.model} on {data.description}; {cfg.epochs} epochs "
            f"x {env.game.steps_per_epoch} steps of {cfg.batch_size} images, {reward}; threat model "
            f"{threat.description}. Run directory: {run_dir}"
        )

    previous_wandb = None if started else (ckpt or {}).get("meta", {}).get("wandb")
    tracker = make_tracker(settings.logger, run_dir, settings.config, previous_wandb)
    subsets = with_validation(eval_subsets(env.game.data, settings.eval.test_subset, settings.eval.train_subset), val)
    best = BestWeights.from_dict(sel.select_on, loop.get("best"))
    history: list[dict[str, Any]] = loop["history"]
    ckpt_path = run_dir / CHECKPOINT
    trainer = _Trainer(settings, env, agent, tracker, obs, info)
    trainer.guard.context = Context(lr=cfg.optim.lr, precision=cfg.precision, checkpoint=ckpt_path, epochs=cfg.epochs,
                                    run_dir=run_dir, loop=loop, started_from=settings.init_from if started else None)
    start = loop["epochs_done"]
    stop_at = cfg.epochs if settings.stop_after_epochs is None else min(cfg.epochs, start + settings.stop_after_epochs)
    epoch_bar = tqdm(total=cfg.epochs, initial=start, desc="epochs", unit="epoch",
                     disable=not settings.progress, dynamic_ncols=True)
    try:
        for epoch in range(start, stop_at):
            done = trainer.epoch(epoch)
            t1 = time.perf_counter()
            evaluated = epoch + 1 == cfg.epochs or (epoch + 1) % settings.eval.every == 0
            ev = evaluate_epoch(env.game.target, subsets, threat, settings) if evaluated else None
            rec = {
                "epoch": epoch + 1,
                "steps": env.game.step_index,
                "images": env.game.steps_per_epoch * cfg.batch_size,
                "train": done.totals,
                "eval": ev,
                "choices": done.choices,
                "fixed_images": done.fixed_images,
                "seconds": {"train": done.seconds, "eval": time.perf_counter() - t1},
            }
            history.append(rec)
            if lock is not None:  # rank 0 writes
                best.update(epoch + 1, ev, env.game.target, run_dir)  # best.pt before the checkpoint
            loop["best"] = best.as_dict()
            loop["epochs_done"] = epoch + 1
            for key in ("train", "eval"):
                loop["seconds"][key] += rec["seconds"][key]
            loop["rng"] = _rng_states(device)
            if lock is not None:
                save_checkpoint(ckpt_path, settings=settings, data=data, env=env, agent=agent, loop=loop,
                                wandb_info=tracker.info)
            tracker.log(_epoch_scalars(rec), env.game.step_index)
            tracker.log_choices({n: (_grid_values(cfg.grid)[n], c) for n, c in rec["choices"].items()},
                                env.game.step_index)
            console.print(_epoch_line(rec, cfg.epochs, pgd))
            epoch_bar.update(1)
            if ev:
                epoch_bar.set_postfix(test_clean=f"{ev['test_clean']:.3f}", test_pgd=f"{ev['test_robust']:.3f}",
                                      refresh=False)
    except TrainingDiverged as exc:  # results.json and W&B say "failed"; the last checkpoint stays
        record_failure(exc, {"format": RESULTS_FORMAT, "run_dir": str(run_dir), "agent": settings.agent_name,
                             "history": history, "config": settings.config}, tracker, console)
        raise
    except BaseException:
        tracker.finish()  # flush what W&B has; the checkpoint of the last finished epoch is on disk
        raise
    finally:
        epoch_bar.close()

    if loop["epochs_done"] < cfg.epochs:
        console.print(
            f"Stopped after epoch {loop['epochs_done']} of {cfg.epochs} (stop_after_epochs={settings.stop_after_epochs}); "
            f"the checkpoint is {ckpt_path}. Continue with the same command plus resume=true."
        )
        tracker.finish()
        return RunResult(run_dir, False, loop["epochs_done"], history, seconds=dict(loop["seconds"]),
                         files={"checkpoint": str(ckpt_path)}, wandb_offline_dir=_offline_dir(tracker))

    if lock is None:  # the final evaluation is rank 0's alone; the other ranks leave now
        return RunResult(run_dir, True, loop["epochs_done"], history, seconds=dict(loop["seconds"]))
    try:
        return _finish(settings, data, env, threat, loop, tracker, console, pgd, best)
    except BaseException:
        tracker.finish()
        raise


def _grid_values(grid) -> dict[str, tuple]:
    """Action column name -> its grid values."""
    return grid.values


def _offline_dir(tracker: Tracker) -> Path | None:
    return tracker.offline_dir if isinstance(tracker, WandbTracker) else None


def final_attacks(settings: RunSettings) -> list[str]:
    names = [attack_spec(a).name for a in settings.eval.final_attacks]
    if settings.eval.autoattack and "autoattack" not in names:
        names.append("autoattack")
    return names


def _finish(settings: RunSettings, data: ImageData, env: LASEnv, threat: ThreatModel,
            loop: dict[str, Any], tracker: Tracker, console: Console, pgd: str, best: BestWeights) -> RunResult:
    """Final evaluation on the test set (final weights, and the best-epoch weights when kept),
    results files, plots, tracker summary."""
    run_dir, cfg, ev = settings.run_dir, settings.env, settings.eval
    model = env.game.target
    game_data = env.game.data
    n_total = game_data.x_test.shape[0]
    n = min(ev.final_n or n_total, n_total)
    t0 = time.perf_counter()

    def final_evaluation(weights: torch.nn.Module, state_file: str) -> list[AttackResult]:
        return evaluate(
            weights, game_data.x_test[:n], game_data.y_test[:n], final_attacks(settings), threat.epsilon,
            step=threat.step_size, batch_size=ev.batch_size, seed=ev.seed,
            n_per_attack={"autoattack": ev.autoattack_n}, autoattack_state=run_dir / state_file,
            progress=settings.progress, data_description=f"{data.name} test", log=lambda _line: None,
        )

    results = final_evaluation(model, AUTOATTACK_STATE)
    best_model = best.load_into(model, run_dir)
    best_results = final_evaluation(best_model, AUTOATTACK_STATE_BEST) if best_model is not None else []
    final_s = time.perf_counter() - t0
    seconds = {**loop["seconds"], "final_eval": final_s}
    seconds["total"] = sum(seconds.values())
    history = loop["history"]

    description = (f"{cfg.model} after {cfg.epochs} epochs of adversarial training with the {settings.agent_name} agent, "
                   f"seed {settings.seed}")
    table = format_table(results, dataset_description=f"{data.description}; test split",
                         model_description=f"{description}; final weights (epoch {cfg.epochs})", n_total=n_total)
    if best_results:
        table += "\n\n" + format_table(best_results, dataset_description=f"{data.description}; test split",
                                       model_description=f"{description}; {best.describe(pgd)}", n_total=n_total)

    files = {
        "checkpoint": run_dir / CHECKPOINT,
        "weights": run_dir / WEIGHTS_FILE,
        "results_json": run_dir / RESULTS_FILE,
        "results_md": run_dir / RESULTS_MD,
        "metrics_json": run_dir / METRICS_FILE,
        "accuracy_png": run_dir / ACCURACY_PNG,
        "choices_png": run_dir / CHOICES_PNG,
        "log": run_dir / LOG_FILE,
    }
    if best_results:
        files["best"] = run_dir / BEST
    export_state_dict(model, files["weights"])
    title = f"{settings.agent_name} agent, {cfg.model} on {cfg.dataset}, seed {settings.seed}"
    made = {
        "accuracy_png": plots.plot_accuracy(history, files["accuracy_png"], title=f"Accuracy per epoch: {title}",
                                            attack=f"PGD-{ev.pgd_iterations} eps={format_eps(threat.epsilon)}"),
        "choices_png": plots.plot_choices(history, _grid_values(cfg.grid), files["choices_png"],
                                          title=f"Chosen attack settings per epoch: {title}"),
    }
    for key, path in made.items():
        if path is None:
            files.pop(key)

    final_rows = [{k: v for k, v in r.to_dict().items() if k not in ("seconds", "robust_flags")} for r in results]
    metrics = {
        "format": METRICS_FORMAT,
        # Only what the settings determine: no wall-clock times, so a resumed run's file is
        # byte-identical to an uninterrupted one's (on CPU).
        "history": [{k: v for k, v in h.items() if k != "seconds"} for h in history],
        "final": final_rows,
        "best": [{k: v for k, v in r.to_dict().items() if k not in ("seconds", "robust_flags")} for r in best_results],
        "selection": best.as_dict(),
    }
    write_json(files["metrics_json"], metrics, sort_keys=True)
    summary_rows = {r.name: r.accuracy for r in results}
    results_doc = {
        "format": RESULTS_FORMAT,
        "status": "completed",
        "run_dir": str(run_dir),
        "agent": settings.agent_name,
        "model": cfg.model,
        "data": data.description,
        "threat_model": threat.description,
        "per_epoch_attack": pgd,
        "final": [r.to_dict() for r in results],  # the final (last-epoch) weights
        "best": [r.to_dict() for r in best_results],  # best.pt's weights (see "selection"); [] when none
        "selection": {**best.as_dict(), "val_fraction": settings.selection.val_fraction,
                      "split_seed": settings.selection.split_seed},
        "history": history,
        "seconds": seconds,
        "files": {k: str(v) for k, v in files.items()},
        "config": settings.config,
    }
    write_json(files["results_json"], results_doc, default=str)

    footer = _footer(settings, history, seconds, files, tracker, pgd)
    atomic_write_text(files["results_md"], table + "\n" + _history_table(history, pgd) + "\n" + footer + "\n")

    tracker.summary({**{f"final/{k}": v for k, v in summary_rows.items()},
                     "final/images": n, "final/eps": threat.epsilon, **{f"time/{k}": v for k, v in seconds.items()}})
    tracker.log_checkpoint(files["checkpoint"], {"dataset": cfg.dataset, "model": cfg.model,
                                                 "agent": settings.agent_name, **summary_rows})
    offline = _offline_dir(tracker)
    tracker.finish()
    console.print("")
    console.print(table)
    console.print(footer)
    return RunResult(run_dir, True, loop["epochs_done"], history, results, table, seconds,
                     {k: str(v) for k, v in files.items()}, offline)


def _history_table(history: list[dict[str, Any]], pgd: str) -> str:
    lines = ["## Per epoch", "",
             f"Per-epoch attack: {pgd}. Test = the first images of the test split; train = a fixed "
             f"subset of the training split (same images every epoch and every run); val = the held-out "
             f"validation images (never trained on; the only curve best.pt is selected on, unless "
             f"selection.select_on=test).", "",
             "| Epoch | Train loss | Mean chosen eps | Val clean | Val PGD | Test clean | Test PGD | Train clean "
             "| Train PGD | Time (s) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for h in history:
        t, ev = h["train"], h.get("eval") or {}

        def pct(key: str) -> str:
            return f"{ev[key]:.2%}" if key in ev else "-"

        lines.append(f"| {h['epoch']} | {t.get('train/loss', math.nan):.4f} | "
                     f"{format_eps(t.get('attack/epsilon', math.nan))} | {pct('val_clean')} | {pct('val_robust')} | "
                     f"{pct('test_clean')} | {pct('test_robust')} | "
                     f"{pct('train_clean')} | {pct('train_robust')} | "
                     f"{h['seconds']['train'] + h['seconds']['eval']:.1f} |")
    return "\n".join(lines) + "\n"


def _footer(settings: RunSettings, history: list[dict[str, Any]], seconds: Mapping[str, float],
            files: Mapping[str, Path], tracker: Tracker, pgd: str) -> str:
    steps = history[-1]["steps"] if history else 0
    lines = [
        f"Time: {seconds['total']:.1f}s = training {seconds['train']:.1f}s ({len(history)} epochs, {steps} steps) "
        f"+ per-epoch evaluation {seconds['eval']:.1f}s + final evaluation {seconds['final_eval']:.1f}s.",
        f"Run directory: {settings.run_dir}",
        "  " + ", ".join(Path(p).name for p in files.values()),
    ]
    offline = _offline_dir(tracker)
    if offline is not None:
        # A resumed run adds one offline folder per invocation (same run id): sync them all.
        lines.append(f"W&B (offline) run {tracker.info['id']}: upload it with "
                     f"`wandb sync {offline.parent}/offline-run-*`")
    elif tracker.info:
        lines.append(f"W&B run {tracker.info['id']} ({tracker.info['mode']}), project {tracker.info['project']}.")
    return "\n".join(lines)
