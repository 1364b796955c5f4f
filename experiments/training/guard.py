"""What stops a run mid-way, each in one paragraph saying what is kept. Divergence: a non-finite loss, reward,
gradient norm or weight, read back with the loop's step-metric flushes (no extra sync), so it is caught before the
epoch's checkpoint, which stays the last finite state; ``on_nonfinite=skip`` drops a batch whose gradient is not
finite (gradient zeroed, BatchNorm statistics put back, counted), a non-finite reward, agent metric or weight still
stops. A full disk while writing, Ctrl-C and SIGTERM (the atomic writes leave the last good checkpoint)."""

from __future__ import annotations

import errno
import math
import os
import shlex
import shutil
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import Tensor

from experiments.config.errors import RunStopped
from experiments.config.settings import RunSettings
from experiments.runfolder.runfiles import CHECKPOINT, RESULTS_FILE, RESULTS_FORMAT
from las_env.files import write_json
from las_env.reward import REWARD_TERMS

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
FIRST_BAD = "guard/first_nonfinite_step"
SKIPPED = "guard/skipped_batches"
GRAD_NORM = "guard/grad_norm"
WEIGHT_NORM = "guard/weight_norm"
SKIPPABLE = ("train/loss", GRAD_NORM)  # what on_nonfinite=skip tolerates (the batch's update is dropped)
WATCHED = {
    "train/loss": "the target's training loss",
    GRAD_NORM: "the norm of the target's gradient",
    WEIGHT_NORM: "the target's weights",
    "reward/total": "the strategy's reward",
}  # also every reward term reward/<term> and every agent/* metric


def _watched(name: str) -> str | None:
    """What a non-finite ``name`` means in the message, or None when it does not stop the run."""
    term = name.removeprefix("reward/")
    return WATCHED.get(name) or (f"the reward term {term}" if term != name and term in REWARD_TERMS else None)


class TrainingDiverged(Exception):
    """A watched quantity was not finite; ``steps``: the window's (first, last) global steps; ``bad``: name -> value."""

    def __init__(self, message: str, *, epoch: int, steps: tuple[int, int], first_step: int | None,
                 bad: dict[str, float]) -> None:
        super().__init__(message)
        self.epoch, self.steps, self.first_step, self.bad = epoch, steps, first_step, bad


class DivergenceGuard:
    """Watches one :class:`las_env.game.LASGame`'s target and the loop's step metrics; with ``run_dir`` its
    message says which checkpoint is kept (``started_from``: the ``init_from`` this run started from)."""

    def __init__(self, game: Any, mode: str = "stop", run_dir: Path | None = None,
                 started_from: Path | None = None) -> None:
        self.game, self.mode, self.run_dir, self.started_from = game, mode, run_dir, started_from
        self._first_bad = torch.full((), -1, dtype=torch.long, device=game.device)
        self._grad_norm: Tensor | None = None
        self._skipped: Tensor | None = None
        self._window_start = game.step_index + 1
        self._hooks = [game.trainer.optimizer.register_step_pre_hook(self._pre_step)]
        self._buffers: list[Tensor] = []
        self._saved: list[Tensor] = []
        if mode == "skip" and getattr(game, "target", None) is not None:
            # A skipped batch must not touch the BatchNorm statistics either: saved before each training forward.
            self._buffers = list(game.target.buffers())
            self._saved = [b.detach().clone() for b in self._buffers]
            target = game.target

            def save_buffers(module: torch.nn.Module, args: Any) -> None:
                # A closure: deepcopy(target) (the authors' w_hat) copies hooks; a bound method would copy the guard.
                if module is target and module.training:
                    torch._foreach_copy_(self._saved, self._buffers)

            self._hooks.append(target.register_forward_pre_hook(save_buffers))

    def close(self) -> None:
        """Remove the guard's hooks from the target and its optimiser."""
        for hook in self._hooks:
            hook.remove()

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
        if self.mode == "skip":
            bad = ~torch.isfinite(norm)
            for g in grads:
                g.masked_fill_(bad, 0.0)  # a 0-d mask: the whole gradient or nothing, no sync
            for b, saved in zip(self._buffers, self._saved):
                b.copy_(torch.where(bad, saved, b))
            self._skipped = bad.float()
        self._grad_norm = norm

    def record(self, meter: Any, train_loss: Tensor) -> None:
        """After each step: add this step's gradient norm (and skip flag) to the loop's meter."""
        step = self.game.step_index  # 1-based number of the step just played
        bad = ~torch.isfinite(train_loss.detach().float())
        if self._grad_norm is not None:
            meter.add(GRAD_NORM, self._grad_norm)
            bad = bad | ~torch.isfinite(self._grad_norm)
        if self._skipped is not None:
            meter.add(SKIPPED, self._skipped)
        self._first_bad.copy_(torch.where((self._first_bad < 0) & bad, step, self._first_bad))
        self._grad_norm = self._skipped = None

    def flush(self, meter: Any) -> dict[str, tuple[float, int]]:
        """``meter.flush()`` with the weights' norm in the same read; raises :class:`TrainingDiverged`."""
        tensors = [t.detach().float() for t in (*self.game.target.parameters(), *self.game.target.buffers())
                   if t.is_floating_point()]
        if tensors:
            meter.add(WEIGHT_NORM, torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors))))
        meter.add(FIRST_BAD, self._first_bad.float())
        window = meter.flush()
        first = int(window.pop(FIRST_BAD)[0])
        steps = (self._window_start, self.game.step_index)
        self._window_start = self.game.step_index + 1
        bad = {name: s for name, (s, _) in window.items()
               if not math.isfinite(s) and (_watched(name) or name.startswith("agent/"))}
        if self.mode == "skip":
            bad = {n: v for n, v in bad.items() if n not in SKIPPABLE}
        if bad:
            raise self._diverged(bad, steps, first if first >= 0 else None)
        return window

    def flush_after_error(self, meter: Any, error: BaseException) -> None:
        """An error mid-window (an agent sampling from NaN probabilities): a non-finite value behind it wins."""
        try:
            self.flush(meter)
        except TrainingDiverged as diverged:
            raise diverged from error
        except Exception:  # noqa: BLE001 - the original error is the one to show
            pass

    @staticmethod
    def epoch_totals(sums: Mapping[str, tuple[float, int]]) -> dict[str, float]:
        """The epoch's means of the step metrics, except the skipped batches: their count."""
        out = {n: s / c for n, (s, c) in sums.items() if c}
        if SKIPPED in sums:
            out[SKIPPED] = sums[SKIPPED][0]
        return out

    def _diverged(self, bad: dict[str, float], steps: tuple[int, int], first: int | None) -> TrainingDiverged:
        game = self.game
        epoch = (steps[1] - 1) // game.steps_per_epoch + 1
        named = [f"{_watched(n)} ({n}) was {v}" for n, v in bad.items() if _watched(n)]
        agent = [n.split("/", 1)[1] for n in bad if not _watched(n)]
        if agent:
            shown = ", ".join(agent[:3]) + (f" and {len(agent) - 3} more" if len(agent) > 3 else "")
            named.append(f"the agent's metrics {shown} (agent/*) were not finite")
        where = f"step {first}" if first is not None else f"a step between {steps[0]} and {steps[1]}"
        text = (f"Training diverged: in epoch {epoch}, by {where} of {game.total_steps}, "
                f"{'; '.join(named)}. Training stopped at the first check after it (the step metrics are read "
                f"every log_every_steps steps).")
        if self.run_dir is not None:
            checkpoint, cfg = self.run_dir / CHECKPOINT, game.config
            causes = [f"a learning rate too high for this model (data.optim.lr={cfg.optim.lr:g}: try 10x lower)"]
            if cfg.precision == "fp16":
                causes.append("fp16 overflow (precision=bf16 or fp32)")
            causes.append("attacks too strong or reward weights too large for the agent (data.grid, reward.alpha/"
                          "beta), or non-finite input data")
            text += f" Likely causes: {', '.join(causes)}."
            done = epoch - 1  # every earlier epoch was checkpointed
            if checkpoint.is_file():
                text += (f" Nothing of epoch {epoch} was saved: the last finite checkpoint, {checkpoint} "
                         f"(epoch {done} of {cfg.epochs}), is intact.")
            elif self.started_from is not None:
                text += (f" This run had saved no checkpoint of its own yet; the one it started from "
                         f"({self.started_from}, epoch {done}) is untouched.")
            else:
                text += " No epoch had finished, so there is no checkpoint to go back to."
            # resume keeps the recorded settings (it would diverge again); a fixed setting is a new run.
            source = self.run_dir if checkpoint.is_file() else self.started_from
            text += (" results.json marks the run failed. Fix the setting and run the command again: a changed "
                     "setting gets a folder of its own (resume=true and resume=<dir> continue a run with its "
                     "recorded settings, and would diverge again).")
            if source is not None:
                text += (f" To keep the epochs already trained, add init_from={source} to the fixed command: it "
                         f"starts from that last finite checkpoint with the new settings.")
        return TrainingDiverged(text, epoch=epoch, steps=steps, first_step=first, bad=bad)


def record_failure(error: TrainingDiverged, settings: RunSettings, history: list[dict[str, Any]], tracker: Any,
                   console: Any) -> None:
    """Mark the run failed in ``results.json``, the tracker and ``log.txt``."""
    doc = {"format": RESULTS_FORMAT, "run_dir": str(settings.run_dir), "agent": settings.agent_name,
           "history": history, "config": settings.config, "status": "failed", "final": [],
           "failure": {"kind": "diverged", "message": str(error), "epoch": error.epoch,
                       "steps": list(error.steps), "first_nonfinite_step": error.first_step,
                       "quantities": {k: str(v) for k, v in error.bad.items()}}}
    write_json(settings.run_dir / RESULTS_FILE, doc, default=str)
    console.log(f"las-at: error: {error}")
    tracker.summary({"status": "failed", "failure": str(error)})
    tracker.finish(exit_code=1)


def resume_command() -> str:
    """The command that continues this run: this command line plus ``resume=true``."""
    argv = sys.argv
    if argv and Path(argv[0]).name == "run.py":
        args = [a for a in argv[1:] if not a.startswith("resume=")]
        return shlex.join(["python", os.path.relpath(argv[0]), *args, "resume=true"])
    return "the same command plus resume=true"


@contextmanager
def full_disk_stops(run_dir: Path, writing: str, needed: int) -> Iterator[None]:
    """A full disk inside the block ends in one paragraph naming the folder, free and ``needed`` bytes."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        try:
            free = shutil.disk_usage(run_dir).free
        except OSError:
            free = 0
        ckpt = run_dir / CHECKPOINT
        kept = (f"The last good checkpoint, {ckpt}, is kept unchanged" if ckpt.is_file()
                else "No epoch had been saved yet, so nothing is kept")
        raise RunStopped(
            f"The disk holding {run_dir} is full ({os.strerror(exc.errno or errno.ENOSPC)}) while writing {writing}: "
            f"{free / 2**20:.1f} MiB free, about {needed / 2**20:.1f} MiB needed. {kept} (writes are atomic: no "
            f"file was left half written). Free that much space on this disk, or move the run folder to a larger "
            f"one, then resume with `{resume_command()}`.") from None


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, like Ctrl-C's ``KeyboardInterrupt``."""


@contextmanager
def stop_on_interrupt(run_dir: Path) -> Iterator[None]:
    """Ctrl-C and SIGTERM (main thread only: where Python delivers signals) end in one paragraph naming the kept
    checkpoint and the command that resumes."""
    def terminate(signum: int, frame: FrameType | None) -> None:
        raise _Terminated()

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminate) if main else None
    try:
        yield
    except KeyboardInterrupt as exc:
        how = "SIGTERM" if isinstance(exc, _Terminated) else "Ctrl-C"
        ckpt = run_dir / CHECKPOINT
        kept = (f"the checkpoint of the last finished epoch, {ckpt}, is kept" if ckpt.is_file()
                else "no epoch had finished, so there is no checkpoint yet (resume=true then starts the run)")
        raise RunStopped(f"Interrupted ({how}): {kept}. Resume with `{resume_command()}`.") from None
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
