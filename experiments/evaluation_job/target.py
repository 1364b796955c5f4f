"""The network to evaluate: built from a LAS-AT checkpoint or a plain ``state_dict``, checked against the attacks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from evaluation import import_autoattack
from experiments.evaluation_job.settings import Settings
from experiments.runfolder.runfiles import CHECKPOINT
from las_env.checkpoint import NotACheckpointError, load_checkpoint, load_plain_state_dict, require_keys
from las_env.data import ImageData
from las_env.datasets import load_dataset
from las_env.datasets.registry import ThreatModel
from las_env.models import build_model


META_KEYS = ("dataset", "model", "in_channels", "num_classes")  # what rebuilds the network from ``meta``


@dataclass
class Target:
    """The network to evaluate (on the evaluation device, in eval mode) and where it came from; ``meta`` is
    the checkpoint's (empty for a plain state_dict), ``threat`` the run's ``data.threat`` (``None``: the data set's)."""

    model: nn.Module
    name: str
    dataset: str
    data_root: str
    source: Path
    out_dir: Path
    meta: dict[str, Any] = field(default_factory=dict)
    data: ImageData | None = None
    threat: ThreatModel | None = None


def _recorded_threat(ckpt: dict[str, Any]) -> ThreatModel | None:
    recorded = ((ckpt.get("config") or {}).get("data") or {}).get("threat") or {}
    if recorded.get("epsilon") is None or recorded.get("step_size") is None:
        return None  # a run from before data.threat: the data set's
    return ThreatModel(float(recorded["epsilon"]), float(recorded["step_size"]), "the run's data.threat")


def load_target(s: Settings) -> Target:
    """Build the network from a LAS-AT checkpoint or a plain state_dict (loads data for the latter)."""
    if s.checkpoint is not None:
        source = Path(s.checkpoint) / CHECKPOINT if Path(s.checkpoint).is_dir() else Path(s.checkpoint)
        ckpt = load_checkpoint(source)  # safe: weights_only, refuses anything but tensors and plain values
        require_keys(ckpt, source, ("meta", "target"))
        meta = dict(ckpt["meta"] or {})
        require_keys({f"meta.{k}": v for k, v in meta.items()}, source, [f"meta.{k}" for k in META_KEYS])
        try:
            model = build_model(meta["model"], int(meta["in_channels"]), int(meta["num_classes"]))
            model.load_state_dict(ckpt["target"], strict=True)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise NotACheckpointError(source, f"its target weights do not fit the {meta['model']} its metadata "
                                      f"names ({type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]})") from None
        target = Target(model, meta["model"], meta["dataset"], s.data_root or meta.get("data_root") or "data",
                        source, Path(s.out_dir or source.parent), meta, threat=_recorded_threat(ckpt))
    else:
        source = Path(str(s.state_dict))
        if not source.is_file():
            raise FileNotFoundError(f"No state_dict file at {source}.")
        root = s.data_root or "data"
        data = load_dataset(s.data, root)
        model = load_plain_state_dict(build_model(s.model, data.channels, data.num_classes), source)
        target = Target(model, s.model, s.data, root, source, Path(s.out_dir or source.parent), data=data)
    target.model.to(s.device).eval()
    return target


def check_attack_needs(s: Settings, target: Target) -> None:
    """Fail before any work when a requested attack cannot run on this target."""
    if "autoattack" in s.attacks:
        import_autoattack()  # raises a clear ImportError without the official package
        classes = int(target.meta.get("num_classes") or (target.data.num_classes if target.data else 10))
        if classes < 10:
            raise ValueError(f"AutoAttack standard attacks 9 target classes; {target.dataset} has {classes} classes.")
