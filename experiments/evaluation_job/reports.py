"""The evaluation's files: report names, rows merged with an earlier report of the same weights, the W&B summary."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from evaluation import AttackResult, attack_spec, format_eps
from experiments.evaluation_job.target import Target
from experiments.runfolder.runfiles import EVALUATION_FORMAT, EVALUATION_STEM


def report_stem(n: int | None, n_total: int, eps: float, default_eps: float) -> str:
    """``evaluation`` plus ``_n<N>`` / ``_eps<E>`` when n or eps differ from the defaults."""
    stem = EVALUATION_STEM
    if n is not None and n < n_total:
        stem += f"_n{n}"
    if abs(eps - default_eps) > 1e-12:
        stem += "_eps" + format_eps(eps).replace("/", "-")
    return stem


def _order(name: str) -> tuple[int, int]:
    # clean, fgsm, pgd by steps, cw by steps, autoattack: weakest to strongest as a reader expects.
    spec = attack_spec(name)
    rank = {"clean": 0, "fgsm": 1, "pgd": 2 if spec.loss == "ce" else 3, "autoattack": 4}[spec.kind]
    return rank, spec.iterations


def merge_previous(path: Path, fingerprint: Mapping[str, Any], results: Sequence[AttackResult]) -> list[AttackResult]:
    """This run's rows plus the rows of an earlier report on the same weights, images and eps."""
    rows = {r.name: r for r in results}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        if old.get("format") == EVALUATION_FORMAT and old.get("fingerprint") == dict(fingerprint):
            for d in old.get("results", []):
                rows.setdefault(d["name"], AttackResult.from_dict(d))
        else:  # e.g. the checkpoint was overwritten by a later epoch: the old rows no longer apply
            print(f"note: {path} described other weights, images or eps; replacing it.")
    return sorted(rows.values(), key=lambda r: _order(r.name))


def update_wandb(
    target: Target, results: Sequence[AttackResult], eps: float, prefix: str, mode_override: str | None
) -> str:
    """Add ``<prefix>/<attack>`` accuracies to the summary of the W&B run that trained the target."""
    info = target.meta.get("wandb")
    if not info or not info.get("id"):
        return "no W&B run recorded with this model: no W&B update"
    try:
        import wandb  # noqa: PLC0415
    except ImportError:
        return "wandb is not installed: W&B summary not updated"
    # WANDB_MODE wins (tests, offline machines), then the command line, then the run's own mode; else offline.
    mode = os.environ.get("WANDB_MODE") or mode_override or info.get("mode") or "offline"
    if mode == "disabled":
        return "W&B disabled (mode=disabled): summary not updated"
    folder = info.get("dir")
    folder = folder if folder and Path(folder).is_dir() else str(target.out_dir)
    try:
        run = wandb.init(id=info["id"], project=info.get("project"), group=info.get("group"), dir=folder,
                         mode=mode, resume="allow")
        summary: dict[str, Any] = {}
        for r in results:
            summary[f"{prefix}/{r.name}"] = r.accuracy
            summary[f"{prefix}/{r.name}_images"] = r.n_images
        summary[f"{prefix}/eps"] = eps
        run.summary.update(summary)
        run.finish()
    except Exception as exc:  # noqa: BLE001 - the reports are written; W&B trouble must not lose them
        return f"W&B summary update failed ({type(exc).__name__}: {exc}); the reports on disk are complete"
    return f"W&B run {info['id']} ({mode}) summary updated with {prefix}/<attack>"
