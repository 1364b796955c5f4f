"""Where a run reports: the console (plus ``log.txt``) and W&B, called with host floats (never a device sync)."""

from __future__ import annotations

import dataclasses
import os
import secrets
import string
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from experiments.config.errors import ConfigError
from experiments.config.settings import LoggerSettings


class Console:
    """Prints above the progress bars and appends to ``log.txt``; ``quiet``: neither (torchrun ranks but 0)."""

    def __init__(self, log_path: Path | None = None, *, quiet: bool = False) -> None:
        self.log_path, self.quiet = log_path, quiet

    def print(self, text: str = "") -> None:
        if not self.quiet:
            tqdm.write(text, file=sys.stdout)
            sys.stdout.flush()
        self.log(text)

    def log(self, text: str) -> None:
        """``text`` to ``log.txt`` only; never through a symlink, never re-creating a vanished folder."""
        if self.log_path is None:
            return
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(text + "\n")


class Tracker:
    """An experiment tracker; this base tracks nothing (``logger=none``: the run directory still has every
    result). ``info``: the checkpoint's ``meta["wandb"]``; ``offline_dir``: the offline run to ``wandb sync``."""

    info: dict[str, Any] | None = None
    offline_dir: Path | None = None

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Scalars at global step ``step`` (number of training steps done)."""

    def log_choices(self, choices: Mapping[str, tuple[Sequence[float], Sequence[int]]], step: int) -> None:
        """Histograms of the chosen attack settings: name -> (grid values, counts)."""

    def summary(self, values: Mapping[str, Any]) -> None:
        """Final numbers of the run."""

    def log_checkpoint(self, path: Path, metadata: Mapping[str, Any]) -> None:
        """The checkpoint file, as an artifact."""

    def finish(self, exit_code: int = 0) -> None:
        """End the run; a non-zero ``exit_code`` marks it failed."""


def _bin_edges(values: Sequence[float]) -> list[float]:
    """Histogram edges that put each grid value in its own bin (midpoints between values)."""
    v = [float(x) for x in values]
    if len(v) == 1:
        return [v[0] - 0.5, v[0] + 0.5]
    mids = [(a + b) / 2 for a, b in zip(v, v[1:])]
    return [v[0] - (mids[0] - v[0]), *mids, v[-1] + (v[-1] - mids[-1])]


class WandbTracker(Tracker):
    """Weights & Biases, offline by default, against a ``global_step`` metric: a resume re-logging epochs continues
    the same W&B run without "steps must increase"."""

    def __init__(self, settings: LoggerSettings, run_dir: Path, config: Mapping[str, Any],
                 run_id: str | None = None, job_type: str = "train") -> None:
        # W&B mistakes our `agents` package for an LLM-agents library and advertises its Weave tracer.
        os.environ.setdefault("WANDB_DISABLE_WEAVE", "true")
        import wandb  # noqa: PLC0415 - only when W&B is asked for

        self._wandb = wandb
        # Chosen here (8 lowercase letters/digits) so it is saved in the checkpoint before the first epoch ends.
        run_id = run_id or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        if settings.mode == "online":
            # Without a network W&B retries for about 90 s before failing: say what is happening now.
            sys.stderr.write(f"las-at: connecting to W&B online (project {settings.project}); without a network this "
                             f"waits about 90 s before failing. To work without one: logger.mode=offline (or "
                             f"WANDB_MODE=offline; upload later with wandb sync) or logger=none.\n")
            sys.stderr.flush()
        try:
            self.run = wandb.init(
                project=settings.project, entity=settings.entity, group=settings.group, name=settings.run_name,
                tags=list(settings.tags), config=dict(config), dir=str(run_dir), mode=settings.mode, id=run_id,
                resume="allow", job_type=job_type,
                # console="off": W&B would otherwise wrap stdout, which fights the progress bars.
                settings=wandb.Settings(silent=True, console="off"))
        except Exception as exc:  # noqa: BLE001 - report any W&B start failure as bad input
            raise ConfigError(
                f"W&B could not start in mode {settings.mode!r} ({type(exc).__name__}: {exc}). "
                f"Use logger.mode=offline (no account or network needed) or logger=none."
            ) from None
        self.mode, self.log_checkpoints = settings.mode, settings.log_checkpoint
        self.info = {"id": run_id, "project": settings.project, "group": settings.group,
                     "mode": settings.mode, "dir": str(run_dir)}
        if self.mode == "offline":
            self.offline_dir = Path(self.run.dir).parent  # <run_dir>/wandb/offline-run-<time>-<id>
        if self.mode != "disabled":
            self.run.define_metric("global_step")
            self.run.define_metric("*", step_metric="global_step")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log({**metrics, "global_step": step})

    def log_choices(self, choices: Mapping[str, tuple[Sequence[float], Sequence[int]]], step: int) -> None:
        hist = {
            f"choices/{name}": self._wandb.Histogram(np_histogram=(list(counts), _bin_edges(values)))
            for name, (values, counts) in choices.items()
        }
        self.run.log({**hist, "global_step": step})

    def summary(self, values: Mapping[str, Any]) -> None:
        self.run.summary.update(dict(values))

    def log_checkpoint(self, path: Path, metadata: Mapping[str, Any]) -> None:
        if not self.log_checkpoints or self.mode == "disabled":
            return
        artifact = self._wandb.Artifact(f"checkpoint-{self.info['id']}", type="model", metadata=dict(metadata))
        artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def make_tracker(settings: LoggerSettings, run_dir: Path, config: Mapping[str, Any],
                 previous: Mapping[str, Any] | None = None) -> Tracker:
    """The tracker ``settings`` asks for; ``previous`` is the checkpoint's ``meta["wandb"]``."""
    if settings.name == "none" or settings.mode == "disabled":
        return Tracker()
    if previous and previous.get("group"):  # a resumed run stays in the group it started in
        settings = dataclasses.replace(settings, group=previous["group"])
    return WandbTracker(settings, run_dir, config, run_id=(previous or {}).get("id"))
