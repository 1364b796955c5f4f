"""One evaluation job: load the target and the images (or export the weights), attack, check, write the reports
(rows merged with an earlier report of the same weights, images and eps) and the W&B summary."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from evaluation import AttackResult, Check, attack_spec, default_step, evaluate, format_eps, format_table, sanity_checks
from experiments.evaluation_job.settings import Settings
from experiments.evaluation_job.target import Target, check_attack_needs, load_target
from experiments.runfolder.runfiles import AUTOATTACK_STATE, EVALUATION_FORMAT, EVALUATION_STEM
from las_env.checkpoint import export_state_dict, state_fingerprint
from las_env.datasets import load_dataset
from las_env.files import atomic_write_text, stale_temp_files, write_json
from las_env.datasets.registry import lookup

EXIT_SANITY = 3  # a sanity check failed (the reports are written all the same)


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


@dataclass
class Job:
    """Everything validated and loaded: what :func:`execute` needs."""

    settings: Settings
    target: Target
    x: torch.Tensor
    y: torch.Tensor
    eps: float
    default_eps: float
    n_total: int
    data_text: str


def prepare(s: Settings) -> Job | None:
    """Load the target (and data); perform ``export``. ``None`` when there is nothing to evaluate."""
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    target = load_target(s)
    if s.export is not None:
        path = export_state_dict(target.model, s.export)
        print(f"Wrote the {target.name} target of {target.source} as a plain state_dict: {path}\n"
              f"Load it with model.load_state_dict(torch.load('{path}')) or RobustBench's "
              f"load_model(..., custom_checkpoint='{path}').")
        return None
    check_attack_needs(s, target)
    data = target.data or load_dataset(target.dataset, target.data_root)
    threat = target.threat or lookup(data.name).threat
    eps = threat.epsilon if s.eps is None else s.eps
    n_total = data.x_test.shape[0]
    n = n_total if s.n is None else min(s.n, n_total)
    if s.n is not None and s.n > n_total:
        print(f"note: n={s.n} but the {data.name} test set has {n_total} images; using all {n_total}.")
    data_text = f"{data.description}, test split"
    return Job(s, target, data.x_test[:n], data.y_test[:n], eps, threat.epsilon, n_total, data_text)


def execute(job: Job) -> int:
    """Run the attacks and checks, write and print the reports; return the exit status."""
    s, target = job.settings, job.target
    stem = report_stem(s.n, job.n_total, job.eps, job.default_eps)
    out_dir = target.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in stale_temp_files(out_dir):  # of killed evaluations (their pid is gone); never a live writer's
        if stale.name.startswith("." + EVALUATION_STEM):
            stale.unlink(missing_ok=True)
    short = job.data_text.split(" (")[0]
    results = evaluate(
        target.model, job.x, job.y, s.attacks, job.eps, batch_size=s.batch_size, device=s.device,
        restarts=s.restarts, seed=s.seed, n_per_attack=s.n_per_attack,
        autoattack_state=out_dir / f"{stem}.{AUTOATTACK_STATE}", progress=s.progress,
        data_description=short, log=print,
    )
    fingerprint = {
        "model_sha256": state_fingerprint(target.model),
        "images_sha256": state_fingerprint([job.x, job.y]),
        "dataset": target.dataset,
        "n_images": int(job.x.shape[0]),
        "eps": job.eps,
    }
    json_path = out_dir / f"{stem}.json"
    results = merge_previous(json_path, fingerprint, results)
    checks: list[Check] = []
    if s.sanity:
        checks = sanity_checks(results, target.model, job.x, job.y, job.eps, batch_size=s.batch_size,
                               device=s.device, subset=s.sanity_n, max_gap=s.sanity_max_gap, seed=s.seed)
    model_text = f"{target.name} from {target.source} (weights sha256 {fingerprint['model_sha256']})"
    table = format_table(results, checks, job.data_text, model_description=model_text, n_total=job.n_total)
    if not s.sanity:
        table += "\nSanity checks not run (sanity=false).\n"
    failed = [c for c in checks if c.passed is False]
    payload = {
        "format": EVALUATION_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": {"name": target.dataset, "description": job.data_text, "n_images": int(job.x.shape[0]),
                 "n_total": job.n_total, "order": "first n of the test split"},
        "model": {"name": target.name, "source": str(target.source)},
        "threat_model": {"norm": "Linf", "eps": job.eps, "eps_default": job.default_eps,
                         "pgd_step": default_step(job.eps)},
        "settings": {"restarts": s.restarts, "seed": s.seed, "batch_size": s.batch_size, "device": str(s.device)},
        "fingerprint": fingerprint,
        "results": [r.to_dict() for r in results],
        "checks": [vars(c) for c in checks],
        "sanity_passed": None if not checks else not failed,
    }
    md = out_dir / f"{stem}.md"
    atomic_write_text(md, table)
    write_json(json_path, payload, indent=2)
    print()
    print(table)
    print(f"Wrote {md} and {json_path}")
    prefix = "eval" + stem.removeprefix(EVALUATION_STEM)
    print(update_wandb(target, results, job.eps, prefix, s.wandb_mode))
    if failed:
        lines = [f"SANITY CHECK FAILED: {c.title}: {c.detail}" for c in failed]
        lines.append(f"The robust accuracies above may overstate the model's robustness; see {md}.")
        print("\n".join(lines), file=sys.stderr)
        if s.fail_on_sanity:
            return EXIT_SANITY
    return 0
