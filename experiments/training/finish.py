"""The end of a run: the final evaluation, results.json / metrics.json / results.md, plots, the tracker's summary."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evaluation import AttackResult, attack_spec, evaluate, format_eps, format_table
from experiments.tracking.loggers import Console, Tracker
from experiments.runfolder.runfiles import (
    ACCURACY_PNG, AUTOATTACK_STATE, AUTOATTACK_STATE_BEST, BEST, CHECKPOINT, CHOICES_PNG, LOG_FILE, METRICS_FILE,
    METRICS_FORMAT, RESULTS_FILE, RESULTS_FORMAT, RESULTS_MD, WEIGHTS_FILE)
from experiments.training.selection import BestWeights
from experiments.config.settings import RunSettings
from las_env.checkpoint import export_state_dict
from las_env.data import ImageData
from las_env.env import LASEnv
from las_env.files import atomic_write_text, write_json
from las_env.step_record import COST_KEYS


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
