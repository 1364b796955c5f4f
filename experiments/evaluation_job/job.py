"""One evaluation job: load the target and the images (or export the weights), attack, check, report."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import datetime, timezone

import torch

from evaluation import Check, default_step, evaluate, format_table, sanity_checks
from experiments.evaluation_job.reports import merge_previous, report_stem, update_wandb
from experiments.evaluation_job.settings import Settings
from experiments.evaluation_job.target import Target, check_attack_needs, load_target
from experiments.runfolder.runfiles import AUTOATTACK_STATE, EVALUATION_FORMAT, EVALUATION_STEM
from las_env.checkpoint import export_state_dict, state_fingerprint
from las_env.datasets import load_dataset
from las_env.files import atomic_write_text, stale_temp_files, write_json
from las_env.datasets.registry import lookup

EXIT_SANITY = 3  # a sanity check failed (the reports are written all the same)


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
