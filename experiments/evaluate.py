"""Evaluate a saved target network: clean, FGSM, PGD-10/20/50, C&W-inf, official AutoAttack.

    python experiments/evaluate.py checkpoint=runs/demo
    python experiments/evaluate.py checkpoint=runs/demo attacks=[clean,pgd20] n=1000
    python experiments/evaluate.py checkpoint=runs/demo n_per_attack.autoattack=500
    python experiments/evaluate.py state_dict=weights.pt model=resnet18 data=cifar10
    python experiments/evaluate.py checkpoint=runs/demo export=runs/demo/target_state_dict.pt

Every option is in ``experiments/conf/evaluate.yaml``. The table is printed and written to
``<out_dir>/evaluation[_n<N>][_eps<E>].md`` and ``.json`` (``out_dir``: the checkpoint's folder);
a later evaluation of the same weights, images and eps adds its attacks to those files. When
the checkpoint came from a W&B-logged run, that run's summary gets ``eval/<attack>`` accuracies.

Exit status: 0 done; 1 bad input (one-paragraph message, nothing evaluated); 3 a sanity check
failed (results are written all the same, ``fail_on_sanity=false`` turns this off).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from las_env.checkpoint import load_checkpoint
from las_env.data import ImageData, load_dataset
from las_env.evaluation import (
    DEFAULT_ATTACKS,
    AttackResult,
    Check,
    atomic_write_text,
    attack_spec,
    default_step,
    evaluate,
    export_state_dict,
    format_eps,
    format_table,
    import_autoattack,
    load_plain_state_dict,
    sanity_checks,
    state_fingerprint,
)
from las_env.files import stale_temp_files, write_json
from las_env.grids import threat_model_for
from las_env.models import build_model

REPORT_FORMAT = "las-at/evaluation/v1"
EXIT_SANITY = 3


@dataclass
class Settings:
    """The validated command line (see ``conf/evaluate.yaml`` for each key's meaning)."""

    checkpoint: Path | None
    state_dict: Path | None
    model: str | None
    data: str | None
    data_root: str | None
    attacks: list[str]
    n: int | None
    n_per_attack: dict[str, int]
    eps: float | None
    restarts: int
    batch_size: int
    device: torch.device
    threads: int | None
    seed: int
    sanity: bool
    sanity_n: int
    sanity_max_gap: float
    fail_on_sanity: bool
    export: Path | None
    out_dir: Path | None
    progress: bool
    wandb_mode: str | None


@dataclass
class Target:
    """The network to evaluate and where it came from.

    Attributes:
        model: The classifier, on the evaluation device, in eval mode.
        name: Architecture name (``small_cnn``...).
        dataset: Data set name it was trained on.
        data_root: Folder the data set is read from.
        source: The checkpoint or state_dict file.
        out_dir: Where reports go.
        meta: The checkpoint's metadata (empty for a plain state_dict).
        data: The loaded data (``None`` until needed).
    """

    model: nn.Module
    name: str
    dataset: str
    data_root: str
    source: Path
    out_dir: Path
    meta: dict[str, Any] = field(default_factory=dict)
    data: ImageData | None = None


# ----------------------------------------------------------------------------- parsing


def _positive_int(value: Any, key: str, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a whole number >= 1{' or null' if allow_none else ''}, got {value!r}.")
    return value


def _epsilon(value: Any) -> float | None:
    if value is None:
        return None
    try:  # accept "8/255" as well as 0.0314
        eps = float(value) if not (isinstance(value, str) and "/" in value) else (
            float(value.split("/")[0]) / float(value.split("/")[1]))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"eps must be a number such as 0.0314 or 8/255, got {value!r}.") from None
    if not eps >= 0 or eps == float("inf"):
        raise ValueError(f"eps must be a finite number >= 0, got {value!r}.")
    return eps


def _gap(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"sanity_max_gap must be a fraction in [0, 1] (0.15 = 15 points), got {value!r}.")
    return float(value)


def _device(value: str) -> torch.device:
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu or cuda[:i], got {value!r}.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={value} was asked for but no CUDA GPU is available; use device=cpu or auto.")
    return device


def parse_settings(cfg: DictConfig) -> Settings:
    """Validate every key before any work; raise ValueError with a one-paragraph message."""
    raw = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(raw, dict)
    # model= and data= select the training runner's config groups (conf/model, conf/data).
    model_name = (raw.get("model") or {}).get("name")
    data_cfg = raw.get("data") or {}
    if (raw.get("checkpoint") is None) == (raw.get("state_dict") is None):
        raise ValueError(
            "Say what to evaluate: checkpoint=RUN_DIR_OR_CHECKPOINT_PT (a LAS-AT run), or "
            "state_dict=FILE model=ARCH data=DATASET (a plain state_dict), not both."
        )
    if raw.get("checkpoint") is not None and (model_name or data_cfg):
        raise ValueError("model= and data= describe a plain state_dict; a checkpoint names its own architecture "
                         "and data set (use data_root= to read the data from another folder).")
    if raw.get("state_dict") is not None and (model_name is None or data_cfg.get("name") is None):
        raise ValueError("A plain state_dict needs its architecture and data set: state_dict=FILE model=ARCH "
                         "data=DATASET (e.g. model=resnet18 data=cifar10).")
    attacks = raw.get("attacks")
    if attacks == "all":
        attacks = list(DEFAULT_ATTACKS)
    elif isinstance(attacks, str):
        attacks = [attacks]
    if not isinstance(attacks, list):
        raise ValueError(f"attacks must be a list such as [clean,pgd20,autoattack] or 'all', got {attacks!r}.")
    attacks = [attack_spec(str(a)).name for a in attacks]
    if len(set(attacks)) != len(attacks):
        raise ValueError(f"attacks lists an attack twice: {attacks}.")
    if not attacks and raw.get("export") is None:
        raise ValueError("attacks is empty: name at least one attack (or use export=PATH).")
    n_per_attack: dict[str, int] = {}
    for key, value in (raw.get("n_per_attack") or {}).items():
        if value is not None:
            n_per_attack[attack_spec(str(key)).name] = _positive_int(value, f"n_per_attack.{key}")  # type: ignore[assignment]
    wandb_mode = raw.get("wandb_mode")
    if wandb_mode not in (None, "offline", "online", "disabled"):
        raise ValueError(f"wandb_mode must be null, offline, online or disabled, got {wandb_mode!r}.")
    return Settings(
        checkpoint=None if raw.get("checkpoint") is None else Path(str(raw["checkpoint"])),
        state_dict=None if raw.get("state_dict") is None else Path(str(raw["state_dict"])),
        model=model_name,
        data=data_cfg.get("name"),
        data_root=raw.get("data_root") or data_cfg.get("root"),
        attacks=attacks,
        n=_positive_int(raw.get("n"), "n", allow_none=True),
        n_per_attack=n_per_attack,
        eps=_epsilon(raw.get("eps")),
        restarts=_positive_int(raw.get("restarts"), "restarts"),  # type: ignore[arg-type]
        batch_size=_positive_int(raw.get("batch_size"), "batch_size"),  # type: ignore[arg-type]
        device=_device(str(raw.get("device", "auto"))),
        threads=_positive_int(raw.get("threads"), "threads", allow_none=True),
        seed=int(raw.get("seed", 0)),
        sanity=bool(raw.get("sanity", True)),
        sanity_n=_positive_int(raw.get("sanity_n", 200), "sanity_n"),  # type: ignore[arg-type]
        sanity_max_gap=_gap(raw.get("sanity_max_gap", 0.15)),
        fail_on_sanity=bool(raw.get("fail_on_sanity", True)),
        export=None if raw.get("export") is None else Path(str(raw["export"])),
        out_dir=None if raw.get("out_dir") is None else Path(str(raw["out_dir"])),
        progress=bool(raw.get("progress", True)),
        wandb_mode=wandb_mode,
    )


# ----------------------------------------------------------------------------- loading


def load_target(s: Settings) -> Target:
    """Build the network from a LAS-AT checkpoint or a plain state_dict (loads data for the latter)."""
    if s.checkpoint is not None:
        ckpt = load_checkpoint(s.checkpoint)
        meta = dict(ckpt.get("meta") or {})
        missing = [k for k in ("dataset", "model", "in_channels", "num_classes") if k not in meta]
        if missing:
            raise ValueError(f"Checkpoint {s.checkpoint} lacks metadata {missing}; evaluate it as state_dict= instead.")
        model = build_model(meta["model"], int(meta["in_channels"]), int(meta["num_classes"]))
        try:
            model.load_state_dict(ckpt["target"], strict=True)
        except (KeyError, RuntimeError) as exc:
            raise ValueError(f"Checkpoint {s.checkpoint}: target weights do not fit {meta['model']}: {exc}") from None
        source = s.checkpoint / "checkpoint.pt" if s.checkpoint.is_dir() else s.checkpoint
        target = Target(model, meta["model"], meta["dataset"], s.data_root or meta.get("data_root") or "data",
                        source, s.out_dir or source.parent, meta)
    else:
        assert s.state_dict is not None and s.model is not None and s.data is not None
        if not s.state_dict.is_file():
            raise FileNotFoundError(f"No state_dict file at {s.state_dict}.")
        root = s.data_root or "data"
        data = load_dataset(s.data, root)
        model = load_plain_state_dict(build_model(s.model, data.channels, data.num_classes), s.state_dict)
        target = Target(model, s.model, s.data, root, s.state_dict, s.out_dir or s.state_dict.parent, data=data)
    target.model.to(s.device).eval()
    return target


def check_attack_needs(s: Settings, target: Target) -> None:
    """Fail before any work when a requested attack cannot run on this target."""
    if "autoattack" in s.attacks:
        import_autoattack()  # raises a clear ImportError without the official package
        classes = int(target.meta.get("num_classes") or (target.data.num_classes if target.data else 10))
        if classes < 10:
            raise ValueError(f"AutoAttack standard attacks 9 target classes; {target.dataset} has {classes} classes.")


# ----------------------------------------------------------------------------- reports


def report_stem(n: int | None, n_total: int, eps: float, default_eps: float) -> str:
    """``evaluation`` plus ``_n<N>`` / ``_eps<E>`` when n or eps differ from the defaults."""
    stem = "evaluation"
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
        if old.get("format") == REPORT_FORMAT and old.get("fingerprint") == dict(fingerprint):
            for d in old.get("results", []):
                rows.setdefault(d["name"], AttackResult.from_dict(d))
        else:  # e.g. the checkpoint was overwritten by a later epoch: the old rows no longer apply
            print(f"note: {path} described other weights, images or eps; replacing it.")
    return sorted(rows.values(), key=lambda r: _order(r.name))


def write_reports(
    out_dir: Path, stem: str, table: str, payload: dict[str, Any]
) -> tuple[Path, Path]:
    md, js = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    atomic_write_text(md, table)
    write_json(js, payload, indent=2)
    return md, js


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
    # The environment wins (tests and offline machines set WANDB_MODE), then the command line,
    # then the mode the run was logged with; offline when nothing says otherwise.
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


# ----------------------------------------------------------------------------- main


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
    threat = threat_model_for(data.name)
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
        if stale.name.startswith(".evaluation"):
            stale.unlink(missing_ok=True)
    short = job.data_text.split(" (")[0]
    results = evaluate(
        target.model, job.x, job.y, s.attacks, job.eps, batch_size=s.batch_size, device=s.device,
        restarts=s.restarts, seed=s.seed, n_per_attack=s.n_per_attack,
        autoattack_state=out_dir / f"{stem}.autoattack_state.json", progress=s.progress,
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
        "format": REPORT_FORMAT,
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
    md, js = write_reports(out_dir, stem, table, payload)
    print()
    print(table)
    print(f"Wrote {md} and {js}")
    prefix = "eval" if stem == "evaluation" else "eval" + stem[len("evaluation"):]
    print(update_wandb(target, results, job.eps, prefix, s.wandb_mode))
    if failed:
        lines = [f"SANITY CHECK FAILED: {c.title}: {c.detail}" for c in failed]
        lines.append(f"The robust accuracies above may overstate the model's robustness; see {md}.")
        print("\n".join(lines), file=sys.stderr)
        if s.fail_on_sanity:
            return EXIT_SANITY
    return 0


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # Input errors (bad keys, missing files, unknown attacks) end here with one paragraph and
    # status 1 before any evaluation; errors during the evaluation itself keep their traceback.
    try:
        settings = parse_settings(cfg)
        job = prepare(settings)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        sys.exit(f"error: {exc}")
    if job is None:
        return
    try:
        status = execute(job)
    except KeyboardInterrupt:
        # Finished AutoAttack chunks are already in the state file; say so instead of a traceback.
        print("\ninterrupted: finished AutoAttack chunks are saved next to the checkpoint "
              "(*.autoattack_state.json); rerun the same command to resume.", file=sys.stderr)
        sys.exit(130)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    from experiments.cli import hydra_entry  # noqa: PLC0415 - Hydra's own failures as one paragraph

    hydra_entry(main, conf_dir=Path(__file__).resolve().parent / "conf")
