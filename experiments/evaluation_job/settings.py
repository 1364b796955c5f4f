"""The evaluation command line's schema: each key's type and default once (``conf/evaluate.yaml`` only picks the
groups); Hydra checks the types while composing, ``__post_init__`` the values, before any work."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from evaluation import DEFAULT_ATTACKS, attack_spec
from las_env.validate import check_device, check_number, check_whole

WANDB_MODES = (None, "offline", "online", "disabled")


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
            raise ValueError(
                "Say what to evaluate: checkpoint=RUN_DIR_OR_CHECKPOINT_PT (a LAS-AT run), or "
                "state_dict=FILE model=ARCH data=DATASET (a plain state_dict), not both."
            )
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
        if self.wandb_mode not in WANDB_MODES:
            raise ValueError(f"wandb_mode must be null, offline, online or disabled, got {self.wandb_mode!r}.")
        for key in ("n", "threads"):
            check_whole(key, getattr(self, key), allow_none=True)
        for key in ("restarts", "batch_size", "sanity_n"):
            check_whole(key, getattr(self, key))
        self.eps = _epsilon(self.eps)
        self.device = check_device("device", self.device)
        check_number("sanity_max_gap", self.sanity_max_gap, 0, 1, meaning="(a fraction: 0.15 = 15 points)")


ConfigStore.instance().store(name="evaluate_schema", node=Settings)


def parse_settings(cfg: DictConfig) -> Settings:
    """The composed command line as checked :class:`Settings` (a bad value raises ValueError, one paragraph)."""
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]
