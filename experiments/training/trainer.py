"""One epoch of the agent/env loop, its device-side step metrics, the fixed images' attacks (Fig. 5) and its
console/tracker lines."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from agents.base import Agent
from experiments.training.guard import SKIPPED, DivergenceGuard
from experiments.tracking.loggers import Tracker
from experiments.config.settings import RunSettings
from las_env.env import LASEnv
from las_env.reward import REWARD_TERMS
from las_env.step_record import COST_KEYS
from evaluation import format_eps
from las_env.strategy_space import ATTACK_COLUMNS


class StepMeter:
    """Running sums of per-step scalars on the device (adding never syncs); ``flush`` reads them in one transfer."""

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


def _absorb(totals: dict[str, tuple[float, int]], window: Mapping[str, tuple[float, int]]) -> None:
    """Add a flushed window to the epoch's host-side totals (so no extra device reads)."""
    for n, (s, c) in window.items():
        s0, c0 = totals.get(n, (0.0, 0))
        totals[n] = (s0 + s, c0 + c)


def _record_step(meter: StepMeter, env: LASEnv, reward: Tensor, info: Mapping[str, Any],
                 metrics: Mapping[str, Any]) -> None:
    """Everything one step reports, summed on the device."""
    meter.add("train/loss", info["train_loss"])
    meter.add("train/adv_accuracy", info["adv_accuracy"])
    for name in ATTACK_COLUMNS:  # the mean attack; every column's choices are counted in EpochTrainer
        meter.add(f"attack/{name}", info[name])
    meter.add("train/lr", info["lr"])
    for key in COST_KEYS:  # host floats: no device read
        meter.add(f"cost/{key}", info[key])
    if info["reward_computed"]:
        r = env.config.reward
        meter.add("reward/total", reward)
        for name, term in REWARD_TERMS.items():
            if term.enabled(r):
                meter.add(f"reward/{name}", info[name])
        if r.use_l2:
            meter.add("reward/probe_accuracy", info["probe_accuracy"])
        if r.use_l3:
            meter.add("reward/clean_accuracy", info["clean_accuracy"])
    for key, value in metrics.items():
        if isinstance(value, (Tensor, int, float)) and not isinstance(value, bool):
            meter.add(f"agent/{key}", value)


def epoch_line(rec: Mapping[str, Any], epochs: int, pgd: str) -> str:
    """The console line of one epoch's record."""
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


def epoch_scalars(rec: Mapping[str, Any]) -> dict[str, float]:
    """The tracker's scalars of one epoch's record."""
    out = {f"epoch/{k}": v for k, v in rec["train"].items()}
    out.update({f"eval/{k}": v for k, v in (rec.get("eval") or {}).items()})
    out["epoch"] = rec["epoch"]
    out["time/epoch_seconds"] = rec["seconds"]["train"] + rec["seconds"]["eval"]
    out["time/train_images_per_second"] = rec["images"] / max(rec["seconds"]["train"], 1e-9)
    return out


class FixedImageChoices:
    """The attack chosen for the first ``count`` training images each epoch, copied on the device by the step
    that trains each (positions read once per epoch); an image in the dropped partial batch gets ``None``."""

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
                        for n in ATTACK_COLUMNS}

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


class EpochTrainer:
    """Runs epochs of the agent/env loop; keeps the current observation and info between epochs."""

    def __init__(self, settings: RunSettings, env: LASEnv, agent: Agent, tracker: Tracker,
                 obs: Tensor, info: dict[str, Any], started_from: Path | None) -> None:
        self.settings, self.env, self.agent, self.tracker = settings, env, agent, tracker
        self.obs, self.info = obs, info
        self.meter = StepMeter()
        self.device = torch.device(settings.env.device)
        self.nvec = list(env.space.nvec)
        # Chosen settings are counted in one flat vector: [column 0's values | column 1's | ...].
        self.offsets = torch.tensor([sum(self.nvec[:j]) for j in range(len(self.nvec))], device=self.device)
        self.ones = torch.ones(settings.env.batch_size * len(self.nvec), dtype=torch.long, device=self.device)
        self.fixed_images = FixedImageChoices(env.game)
        self.guard = DivergenceGuard(env.game, settings.on_nonfinite, settings.run_dir, started_from)

    def epoch(self, index: int) -> dict[str, Any]:
        """Play epoch ``index`` (0-based): its record (``eval`` is the loop's to fill in); raises
        :class:`TrainingDiverged` on a non-finite value."""
        env, agent, meter, every = self.env, self.agent, self.meter, self.settings.log_every_steps
        batch = self.settings.env.batch_size
        counts = torch.zeros(sum(self.nvec), dtype=torch.long, device=self.device)
        totals: dict[str, tuple[float, int]] = {}
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
                    _absorb(totals, window)
                    means = {n: s / c for n, (s, c) in window.items() if c}
                    self.tracker.log({f"step/{k}": v for k, v in means.items()}, step)
                    bar.set_postfix(loss=f"{means.get('train/loss', math.nan):.3f}",
                                    adv_acc=f"{means.get('train/adv_accuracy', math.nan):.2f}",
                                    eps=format_eps(means.get("attack/epsilon", math.nan)), refresh=False)
        _absorb(totals, self.guard.flush(meter))  # also waits for the device: the timing below is honest
        seconds = time.perf_counter() - t0
        flat, ends = counts.tolist(), [sum(self.nvec[:j + 1]) for j in range(len(self.nvec))]
        choices = {name: flat[end - n:end] for name, n, end in zip(self.env.space.columns, self.nvec, ends)}
        return {"epoch": index + 1, "steps": env.game.step_index, "images": env.game.steps_per_epoch * batch,
                "train": self.guard.epoch_totals(totals), "eval": None, "choices": choices,
                "fixed_images": self.fixed_images.result(), "seconds": {"train": seconds, "eval": 0.0}}
