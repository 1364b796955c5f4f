"""The end of each epoch and of the run: the per-epoch evaluation (clean and PGD accuracy on fixed subsets);
checkpoint selection without test leakage (the authors pick the epoch by its TEST accuracy, optimistic; here the
best epoch on held-out TRAINING images, ``select_on=val``, goes to ``best.pt``; ``test``: theirs, warned); the
final evaluation, results.json / metrics.json / results.md, plots, the tracker's summary."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from evaluation import AttackResult, attack_spec, evaluate, format_eps, format_table
from experiments.config.errors import ConfigError
from experiments.tracking.loggers import Console, Tracker
from experiments.runfolder.runfiles import (
    ACCURACY_PNG, AUTOATTACK_STATE, AUTOATTACK_STATE_BEST, BEST, CHECKPOINT, CHOICES_PNG, LOG_FILE, METRICS_FILE,
    METRICS_FORMAT, RESULTS_FILE, RESULTS_FORMAT, RESULTS_MD, WEIGHTS_FILE)
from experiments.config.settings import RunSettings
from experiments.training import distributed
from las_env.checkpoint import atomic_save, export_state_dict, read_torch_file
from las_env.data import ImageData
from las_env.env import LASEnv
from las_env.files import atomic_write_text, write_json
from las_env.step_record import COST_KEYS


TEST_SELECTION_WARNING = (
    "WARNING: selection.select_on=test picks the best epoch by its TEST accuracy (the authors' choice) "
    "and the final report evaluates it on the same test images: its numbers are optimistically biased. "
    "Use select_on=val (the default) for an honest selection."
)
TRAIN_SUBSET_SEED = 20220601  # the same train-subset images for every run, whatever its seed


def eval_subsets(data: ImageData, test_n: int | None, train_n: int | None) -> dict[str, tuple[Tensor, Tensor]]:
    """The first ``test_n`` test images and ``train_n`` seeded training images (some sets are sorted by class)."""
    n_test = min(test_n or data.x_test.shape[0], data.x_test.shape[0])
    n_train_total = data.x_train.shape[0]
    n_train = min(train_n or n_train_total, n_train_total)
    g = torch.Generator().manual_seed(TRAIN_SUBSET_SEED)
    idx = torch.randperm(n_train_total, generator=g)[:n_train].sort().values.to(data.x_train.device)
    return {
        "test": (data.x_test[:n_test], data.y_test[:n_test]),
        "train": (data.x_train[idx], data.y_train[idx]),
    }


def evaluate_epoch(model: torch.nn.Module, subsets: Mapping[str, tuple[Tensor, Tensor]],
                   settings: RunSettings) -> dict[str, float | int]:
    """Clean and PGD-k accuracy of ``model`` on each subset (fractions, plus image counts)."""
    ev, threat = settings.eval, settings.env.threat
    out: dict[str, float | int] = {}
    for split, (x, y) in subsets.items():
        r = distributed.robust_accuracy(model, x, y, threat.epsilon, threat.step_size, ev.pgd_iterations,
                                        batch_size=ev.batch_size, seed=ev.seed,
                                        early_stop=ev.early_stop)  # torchrun: split over ranks
        out[f"{split}_clean"] = r.clean
        out[f"{split}_robust"] = r.robust
        out[f"{split}_images"] = int(x.shape[0])
    return out


def pgd_name(settings: RunSettings) -> str:
    """The per-epoch attack, as reports name it."""
    stop, threat = ", early stop" if settings.eval.early_stop else "", settings.env.threat
    return (f"PGD-{settings.eval.pgd_iterations} (L-inf eps={format_eps(threat.epsilon)}, "
            f"step {format_eps(threat.step_size)}{stop})")


def split_validation(data: ImageData, fraction: float, seed: int) -> tuple[ImageData, tuple[Tensor, Tensor] | None]:
    """``(data without the held-out images, (x_val, y_val))``, or ``(data, None)``; each class gives
    ``round(fraction * n_class)`` (at least one of two or more), seeded; the training images keep their order."""
    if fraction == 0:
        return data, None
    g = torch.Generator().manual_seed(seed)
    y = data.y_train.cpu()
    held: list[Tensor] = []
    for c in range(data.num_classes):
        idx = torch.nonzero(y == c).flatten()
        n = idx.numel()
        if n == 0:
            continue
        take = min(max(round(fraction * n), 1 if n >= 2 else 0), n - 1)
        held.append(idx[torch.randperm(n, generator=g)[:take]])
    val_idx = torch.cat(held).sort().values if held else torch.zeros(0, dtype=torch.long)
    if val_idx.numel() == 0:
        raise ConfigError(f"selection.val_fraction={fraction} holds out no image of {data.name}'s "
                          f"{y.numel()} training images: raise it, or set selection.val_fraction=0 with select_on=last.")
    keep = torch.ones(y.numel(), dtype=torch.bool)
    keep[val_idx] = False
    device = data.x_train.device
    keep, val_idx = keep.to(device), val_idx.to(device)
    x_val, y_val = data.x_train[val_idx], data.y_train[val_idx]
    description = (f"{data.description}; {int(keep.sum())} of its training images trained on, {val_idx.numel()} "
                   f"held out for validation (stratified, split seed {seed})")
    return replace(data, x_train=data.x_train[keep], y_train=data.y_train[keep], description=description), (x_val, y_val)


@dataclass
class BestWeights:
    """The epoch with the best per-epoch PGD accuracy on ``select_on``, its weights in ``best.pt`` (written before
    the epoch's checkpoint, whose loop state holds ``as_dict()``: a resumed run continues the selection)."""

    select_on: str
    epoch: int | None = None
    score: float = -math.inf

    def update(self, epoch: int, evaluation: Mapping[str, Any] | None, model: torch.nn.Module, run_dir: Path) -> bool:
        """Record ``epoch`` if it beats the best so far (ties keep the earlier); whether ``best.pt`` was written."""
        metric = f"{self.select_on}_robust"  # the per-epoch PGD accuracy on the selection images
        if self.select_on == "last" or not evaluation or metric not in evaluation:
            return False
        score = float(evaluation[metric])
        if score <= self.score:
            return False
        weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        atomic_save({"state_dict": weights, "epoch": epoch, "score": score, "metric": metric}, run_dir / BEST)
        self.epoch, self.score = epoch, score
        return True

    def as_dict(self) -> dict[str, Any]:
        return {"select_on": self.select_on, "epoch": self.epoch, "score": self.score}

    @classmethod
    def from_dict(cls, select_on: str, state: Mapping[str, Any] | None) -> BestWeights:
        if not state or state.get("select_on") != select_on:
            return cls(select_on)
        return cls(select_on, state.get("epoch"), float(state.get("score", -math.inf)))

    def load_into(self, model: torch.nn.Module, run_dir: Path) -> torch.nn.Module | None:
        """A copy of ``model`` holding the best weights, or None when none were kept."""
        if self.epoch is None or not (run_dir / BEST).is_file():
            return None
        best = copy.deepcopy(model)
        try:
            best.load_state_dict(read_torch_file(run_dir / BEST)["state_dict"])
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:  # not ours, damaged, or other weights
            raise ConfigError(f"{run_dir / BEST} cannot be read back as this run's best-epoch weights ({exc}). Its "
                              f"checkpoint.pt is intact: move {BEST} out of {run_dir} and resume with the same "
                              f"command plus resume=true (the final report then covers the final weights only).") from None
        return best

    def describe(self, pgd: str) -> str:
        """What the best weights are, for report headers."""
        where = {"val": "the held-out validation images", "test": "the TEST images (authors' selection; optimistic)"}
        return (f"best-epoch weights (epoch {self.epoch}, selected by per-epoch {pgd} accuracy "
                f"{self.score:.2%} on {where.get(self.select_on, self.select_on)})")


@dataclass
class RunResult:
    """What :func:`train` returns; ``completed`` is False (and ``final`` empty) after ``stop_after_epochs``."""

    run_dir: Path
    completed: bool
    epochs_done: int
    history: list[dict[str, Any]]
    final: list[AttackResult] = field(default_factory=list)
    table: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    wandb_offline_dir: Path | None = None


def finish_run(settings: RunSettings, data: ImageData, env: LASEnv, loop: dict[str, Any], tracker: Tracker,
               console: Console, pgd: str, best: BestWeights, before_writing: Callable[[], None]) -> RunResult:
    """Final evaluation (final and best weights), result files, plots, summary; ``before_writing`` goes first."""
    run_dir, cfg, ev, threat = settings.run_dir, settings.env, settings.eval, settings.env.threat
    model = env.game.target
    game_data = env.game.data
    n_total = game_data.x_test.shape[0]
    n = min(ev.final_n or n_total, n_total)
    attacks = [attack_spec(a).name for a in ev.final_attacks]
    if ev.autoattack and "autoattack" not in attacks:
        attacks.append("autoattack")
    t0 = time.perf_counter()

    def final_evaluation(weights: torch.nn.Module, state_file: str) -> list[AttackResult]:
        return evaluate(
            weights, game_data.x_test[:n], game_data.y_test[:n], attacks, threat.epsilon,
            step=threat.step_size, batch_size=ev.batch_size, seed=ev.seed,
            n_per_attack={"autoattack": ev.autoattack_n}, autoattack_state=run_dir / state_file,
            progress=settings.progress, data_description=f"{data.name} test", log=lambda _line: None,
            early_stop=ev.early_stop,
        )

    results = final_evaluation(model, AUTOATTACK_STATE)
    best_model = best.load_into(model, run_dir)
    best_results = final_evaluation(best_model, AUTOATTACK_STATE_BEST) if best_model is not None else []
    seconds = {**loop["seconds"], "final_eval": time.perf_counter() - t0}
    seconds["total"] = sum(seconds.values())
    history = loop["history"]

    description = (f"{cfg.model} after {cfg.epochs} epochs of adversarial training with the {settings.agent_name} agent, "
                   f"seed {settings.seed}")
    table = format_table(results, dataset_description=f"{data.description}; test split",
                         model_description=f"{description}; final weights (epoch {cfg.epochs})", n_total=n_total)
    if best_results:
        table += "\n\n" + format_table(best_results, dataset_description=f"{data.description}; test split",
                                       model_description=f"{description}; {best.describe(pgd)}", n_total=n_total)

    names = {"checkpoint": CHECKPOINT, "weights": WEIGHTS_FILE, "results_json": RESULTS_FILE, "results_md": RESULTS_MD,
             "metrics_json": METRICS_FILE, "accuracy_png": ACCURACY_PNG, "choices_png": CHOICES_PNG, "log": LOG_FILE}
    files = {key: run_dir / name for key, name in names.items()}
    if best_results:
        files["best"] = run_dir / BEST
    before_writing()
    export_state_dict(model, files["weights"])
    title = f"{settings.agent_name} agent, {cfg.model} on {cfg.dataset}, seed {settings.seed}"
    from experiments.tracking import plots  # noqa: PLC0415 - matplotlib costs every start-up a second; only a finished run draws

    made = {
        "accuracy_png": plots.plot_accuracy(history, files["accuracy_png"], title=f"Accuracy per epoch: {title}",
                                            attack=f"PGD-{ev.pgd_iterations} eps={format_eps(threat.epsilon)}"),
        "choices_png": plots.plot_choices(history, env.space.values, files["choices_png"],
                                          title=f"Chosen attack settings per epoch: {title}"),
    }
    for key, path in made.items():
        if path is None:
            files.pop(key)

    def rows(attack_results: list[AttackResult]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.to_dict().items() if k not in ("seconds", "robust_flags")} for r in attack_results]

    metrics = {
        "format": METRICS_FORMAT,
        # No wall-clock times: a resumed run's file is byte-identical to an uninterrupted one's (on CPU).
        "history": [{k: v for k, v in h.items() if k != "seconds"} for h in history],
        "final": rows(results),
        "best": rows(best_results),
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
        "cost": attack_cost(history),
        "history": history,
        "seconds": seconds,
        "files": {k: str(v) for k, v in files.items()},
        "config": settings.config,
    }
    write_json(files["results_json"], results_doc, default=str)

    footer = _footer(settings, history, seconds, files, tracker)
    atomic_write_text(files["results_md"], table + "\n" + _history_table(history, pgd) + "\n" + footer + "\n")

    tracker.summary({**{f"final/{k}": v for k, v in summary_rows.items()},
                     "final/images": n, "final/eps": threat.epsilon, **{f"time/{k}": v for k, v in seconds.items()}})
    tracker.log_checkpoint(files["checkpoint"], {"dataset": cfg.dataset, "model": cfg.model,
                                                 "agent": settings.agent_name, **summary_rows})
    offline = tracker.offline_dir
    tracker.finish()
    console.print("")
    console.print(table)
    console.print(footer)
    return RunResult(run_dir, True, loop["epochs_done"], history, results, table, seconds,
                     {k: str(v) for k, v in files.items()}, offline)


def attack_cost(history: list[dict[str, Any]]) -> dict[str, float | int]:
    """Gradient computations per training image, over every image seen (epochs weighted by their images)."""
    images = sum(h["images"] for h in history)
    attack, probe = (sum(h["train"].get(f"cost/{k}", 0.0) * h["images"] for h in history) / max(images, 1) for k in COST_KEYS)
    return {COST_KEYS[0]: attack, COST_KEYS[1]: probe, "gradients_per_image": attack + probe, "images": images}


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
                     f"{pct('test_clean')} | {pct('test_robust')} | {pct('train_clean')} | {pct('train_robust')} | "
                     f"{h['seconds']['train'] + h['seconds']['eval']:.1f} |")
    return "\n".join(lines) + "\n"


def _footer(settings: RunSettings, history: list[dict[str, Any]], seconds: Mapping[str, float],
            files: Mapping[str, Path], tracker: Tracker) -> str:
    steps = history[-1]["steps"] if history else 0
    lines = [
        f"Time: {seconds['total']:.1f}s = training {seconds['train']:.1f}s ({len(history)} epochs, {steps} steps) "
        f"+ per-epoch evaluation {seconds['eval']:.1f}s + final evaluation {seconds['final_eval']:.1f}s.",
        f"Run directory: {settings.run_dir}",
        "  " + ", ".join(Path(p).name for p in files.values()),
    ]
    offline = tracker.offline_dir
    if offline is not None:
        # A resumed run adds one offline folder per invocation (same run id): sync them all.
        lines.append(f"W&B (offline) run {tracker.info['id']}: upload it with "
                     f"`wandb sync {offline.parent}/offline-run-*`")
    elif tracker.info:
        lines.append(f"W&B run {tracker.info['id']} ({tracker.info['mode']}), project {tracker.info['project']}.")
    return "\n".join(lines)
