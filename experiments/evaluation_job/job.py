"""``experiments/evaluate.py``'s work. Its schema (:class:`Settings`): each key's type and default once
(``conf/evaluate.yaml`` only picks the groups); Hydra checks the types while composing, ``__post_init__`` the values,
before any work. The job: load the target (from a LAS-AT checkpoint or a plain ``state_dict``) and the images (or
export the weights), attack, check, write the reports (rows merged with an earlier report of the same weights,
images and eps) and the W&B summary."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch
from hydra.core.config_store import ConfigStore
from torch import nn

from evaluation import (DEFAULT_ATTACKS, AttackResult, attack_order, attack_spec, default_step, evaluate, format_eps,
                        format_table, import_autoattack, sanity_checks)
from experiments.config.schema import WANDB_MODES
from experiments.runfolder.runfiles import AUTOATTACK_STATE, CHECKPOINT, EVALUATION_FORMAT, EVALUATION_STEM
from las_env.checkpoint import (NotACheckpointError, export_state_dict, load_checkpoint, load_plain_state_dict,
                                require_keys, state_fingerprint)
from las_env.data import ImageData
from las_env.datasets import load_dataset
from las_env.datasets.registry import lookup
from las_env.files import atomic_write_text, stale_temp_files, write_json
from las_env.models import build_model
from las_env.validate import check_device, check_number, check_whole

EXIT_SANITY = 3  # a sanity check failed (the reports are written all the same)
META_KEYS = ("dataset", "model", "in_channels", "num_classes")  # what rebuilds the network from ``meta``


def _epsilon(value: Any) -> float | None:
    if value is None:
        return None
    try:  # accept "8/255" as well as 0.0314
        numerator, _, denominator = value.partition("/") if isinstance(value, str) else (value, "", 1)
        eps = float(numerator) / float(denominator or 1)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"eps must be a number such as 0.0314 or 8/255, got {value!r}.") from None
    return check_number("eps", eps, 0, shown=value, meaning="(the L-inf radius in pixels, e.g. 8/255)")


@dataclass
class Settings:
    """``experiments/evaluate.py``'s settings; after ``__post_init__``, ``model`` and ``data`` are names and
    ``attacks`` canonical names."""

    checkpoint: Optional[str] = None  # a run directory or its checkpoint.pt (LAS-AT format)
    state_dict: Optional[str] = None  # or: a plain state_dict file, with model= and data= naming what it is
    model: Any = None  # the training runner's groups (model=resnet18, data=cifar10...), with state_dict= only
    data: Any = None
    data_root: Optional[str] = None  # null: the checkpoint's data_root (state_dict=: the data group's root)
    attacks: Any = field(default_factory=lambda: list(DEFAULT_ATTACKS))  # or "all"; pgd<k>/cw<k> for other k
    n: Optional[int] = None  # first n test images (RobustBench order); null = all
    n_per_attack: dict[str, Optional[int]] = field(default_factory=lambda: {"autoattack": None})  # overrides of n
    eps: Any = None  # L-inf radius in pixels (0.0314 or 8/255); null = the data set's threat model
    restarts: int = 1  # PGD/C&W random restarts (per-image worst case)
    batch_size: int = 256  # images per pass (and per resumable AutoAttack chunk)
    device: str = "auto"  # auto (cuda when available), cpu, cuda, cuda:1...
    threads: Optional[int] = None  # torch CPU threads; null = torch's default (1 was ~3x faster for small_cnn on 2 cores)
    seed: int = 0  # seeds PGD random starts and AutoAttack
    sanity: bool = True  # run the gradient-masking sanity checks
    sanity_n: int = 200  # images the eps=0 / huge-eps probes use
    sanity_max_gap: float = 0.15  # PGD/C&W more than this above AutoAttack is reported as gradient masking
    fail_on_sanity: bool = True  # exit with status 3 when a sanity check fails (results are still written)
    export: Optional[str] = None  # write the target as a plain state_dict (RobustBench convention) and exit
    out_dir: Optional[str] = None  # where reports go; null = the checkpoint's (or state_dict's) folder
    progress: bool = True  # tqdm bars per attack
    wandb_mode: Optional[str] = None  # null: the mode the run was logged with (default offline); WANDB_MODE wins

    def __post_init__(self) -> None:
        model, data = self.model or {}, self.data or {}
        if (self.checkpoint is None) == (self.state_dict is None):
            raise ValueError("Say what to evaluate: checkpoint=RUN_DIR_OR_CHECKPOINT_PT (a LAS-AT run), or "
                             "state_dict=FILE model=ARCH data=DATASET (a plain state_dict), not both.")
        if self.checkpoint is not None and (model.get("name") or data):
            raise ValueError("model= and data= describe a plain state_dict; a checkpoint names its own architecture "
                             "and data set (use data_root= to read the data from another folder).")
        if self.state_dict is not None and (model.get("name") is None or data.get("name") is None):
            raise ValueError("A plain state_dict needs its architecture and data set: state_dict=FILE model=ARCH "
                             "data=DATASET (e.g. model=resnet18 data=cifar10).")
        # model= and data= select the training runner's groups: their names (and root) are what counts here.
        self.model, self.data = model.get("name"), data.get("name")
        self.data_root = self.data_root or data.get("root")
        attacks = list(DEFAULT_ATTACKS) if self.attacks == "all" else self.attacks
        attacks = [attacks] if isinstance(attacks, str) else attacks
        if not isinstance(attacks, list):
            raise ValueError(f"attacks must be a list such as [clean,pgd20,autoattack] or 'all', got {attacks!r}.")
        self.attacks = [attack_spec(str(a)).name for a in attacks]
        if len(set(self.attacks)) != len(self.attacks):
            raise ValueError(f"attacks lists an attack twice: {self.attacks}.")
        if not self.attacks and self.export is None:
            raise ValueError("attacks is empty: name at least one attack (or use export=PATH).")
        self.n_per_attack = {attack_spec(str(key)).name: check_whole(f"n_per_attack.{key}", value)
                             for key, value in self.n_per_attack.items() if value is not None}
        if self.wandb_mode not in (None, *WANDB_MODES):
            raise ValueError(f"wandb_mode must be null, offline, online or disabled, got {self.wandb_mode!r}.")
        for key in ("n", "threads"):
            check_whole(key, getattr(self, key), allow_none=True)
        for key in ("restarts", "batch_size", "sanity_n"):
            check_whole(key, getattr(self, key))
        self.eps = _epsilon(self.eps)
        self.device = check_device("device", self.device)
        check_number("sanity_max_gap", self.sanity_max_gap, 0, 1, meaning="(a fraction: 0.15 = 15 points)")


ConfigStore.instance().store(name="evaluate_schema", node=Settings)


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
    return sorted(rows.values(), key=lambda r: attack_order(r.name))


def update_wandb(job: Job, results: Sequence[AttackResult], prefix: str) -> str:
    """Add ``<prefix>/<attack>`` accuracies to the summary of the W&B run that trained the target."""
    info = job.wandb
    if not info or not info.get("id"):
        return "no W&B run recorded with this model: no W&B update"
    try:
        import wandb  # noqa: PLC0415
    except ImportError:
        return "wandb is not installed: W&B summary not updated"
    # WANDB_MODE wins (tests, offline machines), then the command line, then the run's own mode; else offline.
    mode = os.environ.get("WANDB_MODE") or job.settings.wandb_mode or info.get("mode") or "offline"
    if mode == "disabled":
        return "W&B disabled (mode=disabled): summary not updated"
    folder = info.get("dir")
    folder = folder if folder and Path(folder).is_dir() else str(job.out_dir)
    try:
        run = wandb.init(id=info["id"], project=info.get("project"), group=info.get("group"), dir=folder,
                         mode=mode, resume="allow")
        run.summary.update({**{f"{prefix}/{r.name}": r.accuracy for r in results}, f"{prefix}/eps": job.eps,
                            **{f"{prefix}/{r.name}_images": r.n_images for r in results}})
        run.finish()
    except Exception as exc:  # noqa: BLE001 - the reports are written; W&B trouble must not lose them
        return f"W&B summary update failed ({type(exc).__name__}: {exc}); the reports on disk are complete"
    return f"W&B run {info['id']} ({mode}) summary updated with {prefix}/<attack>"


@dataclass
class Job:
    """Everything validated and loaded: what :func:`execute` needs. ``model`` (on the evaluation device, in eval
    mode) is the architecture ``name`` from ``source``; ``wandb``: the checkpoint's ``meta["wandb"]``."""

    settings: Settings
    model: nn.Module
    name: str
    dataset: str
    source: Path
    out_dir: Path
    wandb: dict[str, Any] | None
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
    data: ImageData | None = None
    if s.checkpoint is not None:
        source = Path(s.checkpoint) / CHECKPOINT if Path(s.checkpoint).is_dir() else Path(s.checkpoint)
        ckpt = load_checkpoint(source)  # safe: weights_only, refuses anything but tensors and plain values
        require_keys(ckpt, source, ("meta", "target"))
        meta = dict(ckpt["meta"] or {})
        require_keys({f"meta.{k}": v for k, v in meta.items()}, source, [f"meta.{k}" for k in META_KEYS])
        name, dataset, root = meta["model"], meta["dataset"], s.data_root or meta.get("data_root") or "data"
        try:
            classes = int(meta["num_classes"])
            model = build_model(name, int(meta["in_channels"]), classes)
            model.load_state_dict(ckpt["target"], strict=True)
        except (RuntimeError, ValueError, TypeError) as exc:
            first_line = (str(exc).strip().splitlines() or [""])[0][:200]
            raise NotACheckpointError(source, f"its target weights do not fit the {name} its metadata names "
                                      f"({type(exc).__name__}: {first_line})") from None
        # The run's data.threat; a run from before data.threat (or with its nulls) used the data set's.
        threat = ((ckpt.get("config") or {}).get("data") or {}).get("threat") or {}
        recorded = threat.get("step_size") is not None and threat.get("epsilon") is not None
        threat_eps = float(threat["epsilon"]) if recorded else None
    else:
        source = Path(str(s.state_dict))
        if not source.is_file():
            raise FileNotFoundError(f"No state_dict file at {source}.")
        meta, name, dataset, root, threat_eps = {}, s.model, s.data, s.data_root or "data", None
        data = load_dataset(dataset, root)
        model = load_plain_state_dict(build_model(name, data.channels, data.num_classes), source)
        classes = data.num_classes
    model.to(s.device).eval()
    if s.export is not None:
        path = export_state_dict(model, s.export)
        print(f"Wrote the {name} target of {source} as a plain state_dict: {path}\n"
              f"Load it with model.load_state_dict(torch.load('{path}')) or RobustBench's "
              f"load_model(..., custom_checkpoint='{path}').")
        return None
    if "autoattack" in s.attacks:  # fail before any work when it cannot run on this target
        import_autoattack()  # raises a clear ImportError without the official package
        if classes < 10:
            raise ValueError(f"AutoAttack standard attacks 9 target classes; {dataset} has {classes} classes.")
    data = data or load_dataset(dataset, root)
    default_eps = lookup(data.name).threat.epsilon if threat_eps is None else threat_eps
    n_total = data.x_test.shape[0]
    n = n_total if s.n is None else min(s.n, n_total)
    if s.n is not None and s.n > n_total:
        print(f"note: n={s.n} but the {data.name} test set has {n_total} images; using all {n_total}.")
    return Job(s, model, name, dataset, source, Path(s.out_dir or source.parent), meta.get("wandb"), data.x_test[:n],
               data.y_test[:n], default_eps if s.eps is None else s.eps, default_eps, n_total,
               f"{data.description}, test split")


def execute(job: Job) -> int:
    """Run the attacks and checks, write and print the reports; return the exit status."""
    s = job.settings
    stem = EVALUATION_STEM + (f"_n{s.n}" if s.n is not None and s.n < job.n_total else "")  # n or eps not the default
    if abs(job.eps - job.default_eps) > 1e-12:
        stem += "_eps" + format_eps(job.eps).replace("/", "-")
    out_dir = job.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in stale_temp_files(out_dir):  # of killed evaluations (their pid is gone); never a live writer's
        if stale.name.startswith("." + EVALUATION_STEM):
            stale.unlink(missing_ok=True)
    results = evaluate(job.model, job.x, job.y, s.attacks, job.eps, batch_size=s.batch_size, device=s.device,
                       restarts=s.restarts, seed=s.seed, n_per_attack=s.n_per_attack,
                       autoattack_state=out_dir / f"{stem}.{AUTOATTACK_STATE}", progress=s.progress,
                       data_description=job.data_text.split(" (")[0], log=print)
    fingerprint = {"model_sha256": state_fingerprint(job.model), "images_sha256": state_fingerprint([job.x, job.y]),
                   "dataset": job.dataset, "n_images": int(job.x.shape[0]), "eps": job.eps}
    json_path = out_dir / f"{stem}.json"
    results = merge_previous(json_path, fingerprint, results)
    checks = sanity_checks(results, job.model, job.x, job.y, job.eps, batch_size=s.batch_size, device=s.device,
                           subset=s.sanity_n, max_gap=s.sanity_max_gap, seed=s.seed) if s.sanity else []
    model_text = f"{job.name} from {job.source} (weights sha256 {fingerprint['model_sha256']})"
    table = format_table(results, checks, job.data_text, model_description=model_text, n_total=job.n_total)
    if not s.sanity:
        table += "\nSanity checks not run (sanity=false).\n"
    failed = [c for c in checks if c.passed is False]
    payload = {
        "format": EVALUATION_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": {"name": job.dataset, "description": job.data_text, "n_images": int(job.x.shape[0]),
                 "n_total": job.n_total, "order": "first n of the test split"},
        "model": {"name": job.name, "source": str(job.source)},
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
    print(f"\n{table}\nWrote {md} and {json_path}")
    print(update_wandb(job, results, prefix="eval" + stem.removeprefix(EVALUATION_STEM)))
    if failed:
        print(*[f"SANITY CHECK FAILED: {c.title}: {c.detail}" for c in failed],
              f"The robust accuracies above may overstate the model's robustness; see {md}.", sep="\n", file=sys.stderr)
        if s.fail_on_sanity:
            return EXIT_SANITY
    return 0
