"""The evaluation command line, validated: every key of ``conf/evaluate.yaml`` checked before any work."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from evaluation import DEFAULT_ATTACKS, attack_spec
from las_env.validate import check_device, check_number, check_whole


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
            n_per_attack[attack_spec(str(key)).name] = check_whole(f"n_per_attack.{key}", value)  # type: ignore[assignment]
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
        n=check_whole("n", raw.get("n"), allow_none=True),
        n_per_attack=n_per_attack,
        eps=_epsilon(raw.get("eps")),
        restarts=check_whole("restarts", raw.get("restarts")),  # type: ignore[arg-type]
        batch_size=check_whole("batch_size", raw.get("batch_size")),  # type: ignore[arg-type]
        device=torch.device(check_device("device", raw.get("device", "auto"))),
        threads=check_whole("threads", raw.get("threads"), allow_none=True),
        seed=int(raw.get("seed", 0)),
        sanity=bool(raw.get("sanity", True)),
        sanity_n=check_whole("sanity_n", raw.get("sanity_n", 200)),  # type: ignore[arg-type]
        sanity_max_gap=check_number("sanity_max_gap", raw.get("sanity_max_gap", 0.15), 0, 1,
                                    meaning="(a fraction: 0.15 = 15 points)"),
        fail_on_sanity=bool(raw.get("fail_on_sanity", True)),
        export=None if raw.get("export") is None else Path(str(raw["export"])),
        out_dir=None if raw.get("out_dir") is None else Path(str(raw["out_dir"])),
        progress=bool(raw.get("progress", True)),
        wandb_mode=wandb_mode,
    )
