"""The training command line's schema: each key's default and type, once (``conf/`` only chooses and
overrides; ``--cfg job`` prints every key). Hydra checks types, ``__post_init__`` ranges; ``null`` in
``data`` means the data set's (``las_env/datasets/builtin.py``)."""

from __future__ import annotations

import importlib.util
import typing
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from evaluation import attack_spec
from las_env.game_config import LASConfig
from las_env.methods import MethodConfig
from las_env.reward import RewardConfig
from las_env.optim import OptimConfig
from las_env.validate import SettingError, check_number, check_whole

LOGGERS = ("none", "wandb")
WANDB_MODES = ("offline", "online", "disabled")
SELECT_ON = ("val", "test", "last")
NONFINITE_MODES = ("stop", "skip")  # on_nonfinite (experiments/training/guard.py)

_OPTIM_TYPES = typing.get_type_hints(OptimConfig)
OptimOverrides = make_dataclass(
    "OptimOverrides", [(f.name, Optional[_OPTIM_TYPES[f.name]], None) for f in fields(OptimConfig)])
"""``data.optim``: :class:`las_env.optim.OptimConfig`'s fields, each ``null`` = the data set's."""
OptimOverrides.__module__ = __name__  # pickled by reference, so a sweep's worker processes share the class


@dataclass
class GridOverrides:
    """``data.grid``: the strategy space; each entry a list (8/255 allowed) or ``{start, stop, scale}``;
    ``extra``: further columns, e.g. ``+data.grid.extra.trades_beta=[5,6,7,8,9]`` (LAS-TRADES)."""

    step_sizes: Any = None
    iterations: Any = None
    epsilons: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ThreatOverrides:
    """``data.threat``: the L-inf threat model of the evaluation, the L2 reward probe and PGD-AT's default
    attack, in pixels of [0, 1] images; ``null``: the data set's (CIFAR 8/255 step 2/255, digits 0.2 step 0.05)."""

    epsilon: Optional[float] = None
    step_size: Optional[float] = None  # PGD step, at most epsilon (usually epsilon / 4)


@dataclass
class FixedAttack:
    """``data.fixed_attack``: PGD-AT's attack; ``null``: the threat model's with the data set's iterations."""

    step_size: Optional[float] = None
    iterations: Optional[int] = None
    epsilon: Optional[float] = None


@dataclass
class DataSettings:
    """``data``: the data set (``data=digits|cifar10|...|npz|folder``) and the training budget."""

    name: str = MISSING  # a registered data set (las_env.datasets); data=<group> sets it
    path: Optional[str] = None  # data=npz / data=folder: the file or folder (relative: to where you run)
    root: str = "data"  # folder holding the built-in data sets (relative: to where you run)
    plugin: Optional[str] = None  # a module imported before the registry is read: registers your data set
    threads: Optional[int] = None  # torch CPU threads; null = torch's default (one per core)
    batch_size: int = 128
    epochs: int = 110
    max_steps_per_epoch: Optional[int] = None  # cap on steps per epoch (smoke tests); null = every full batch
    augment: Optional[bool] = None  # random crop (pad 4) + flip; null: on for images of 32 px and more
    augment_padding: str = "zeros"  # the crop pads with zeros (ours) | reflect (the authors' AWP and LAS-AWP)
    optim: OptimOverrides = field(default_factory=OptimOverrides)  # type: ignore[valid-type]
    grid: GridOverrides = field(default_factory=GridOverrides)
    threat: ThreatOverrides = field(default_factory=ThreatOverrides)
    fixed_attack: FixedAttack = field(default_factory=FixedAttack)


@dataclass
class ModelSettings:
    """``model``: the target architecture (``model=default`` is the data set's usual one)."""

    name: str = MISSING  # small_cnn | resnet18 | preact_resnet18 | preact_resnet18_pool2 | wrn-34-10 | wrn-D-W ...
    init: str = "kaiming"  # kaiming (ours: He fan-out) | pytorch (PyTorch's layer defaults: the authors' ResNet-18)


@dataclass
class EvalSettings:
    """``eval``: evaluation during training (the paper's Fig. 1 curves) and at the end."""

    every: int = 3  # per-epoch evaluation every this many epochs (the last one always); the paper presets: 1
    test_subset: Optional[int] = 500  # first n test images for the per-epoch curves; null = all
    train_subset: Optional[int] = 500  # fixed train images (seeded random choice) for the curves
    pgd_iterations: int = 10  # per-epoch attack: PGD-k at the threat model's eps and step size
    batch_size: int = 512
    final_attacks: list[str] = field(default_factory=lambda: ["clean", "pgd10", "pgd20"])  # evaluation.attacks names
    final_n: Optional[int] = None  # first n test images for the final evaluation; null = all
    autoattack: bool = False  # add official AutoAttack (pyautoattack) to the final evaluation
    autoattack_n: int = 1000  # its images (it is slow on a CPU)
    seed: int = 0  # random starts of the evaluation attacks
    early_stop: bool = False  # PGD/C&W stop on an image once it is misclassified: false (ours) | true (the authors')

    def __post_init__(self) -> None:
        for key in ("every", "pgd_iterations", "batch_size", "autoattack_n"):
            check_whole(key, getattr(self, key), 1)
        for key in ("test_subset", "train_subset", "final_n"):
            check_whole(key, getattr(self, key), 1, allow_none=True)
        check_whole("seed", self.seed, 0)
        if not self.final_attacks:
            raise SettingError("final_attacks", [], "is empty: name at least one attack, e.g. [clean, pgd20].")
        for name in self.final_attacks:
            try:
                attack_spec(name)
            except ValueError as exc:
                raise SettingError("final_attacks", list(self.final_attacks), str(exc)) from None
        wanted = self.autoattack or "autoattack" in self.final_attacks
        if wanted and not any(importlib.util.find_spec(m) for m in ("pyautoattack", "autoattack")):
            raise SettingError("autoattack", True, "AutoAttack was asked for but the official implementation is not "
                               "installed: `pip install pyautoattack` (torch and numpy only), or set {key}=false.")


@dataclass
class LoggerSettings:
    """``logger``: the experiment tracker (``logger=wandb``: offline W&B; ``logger=none``)."""

    name: str = "none"
    mode: str = "offline"  # offline | online | disabled (the WANDB_MODE environment variable wins)
    project: str = "las-at"
    entity: Optional[str] = None  # your W&B user or team (online only); null = your default
    group: Optional[str] = None  # null: <data>-<model>
    run_name: Optional[str] = None  # null: <agent>-seed<seed>
    tags: list[str] = field(default_factory=list)  # extra tags; agent, data set and model are always added
    log_checkpoint: bool = True  # upload the final checkpoint as a W&B artifact (type "model")

    def __post_init__(self) -> None:
        if self.name not in LOGGERS:
            raise SettingError("name", self.name, f"must be one of {', '.join(LOGGERS)} (logger=wandb|none).")
        self.mode = str(self.mode).lower()
        if self.name == "wandb" and self.mode not in WANDB_MODES:
            raise SettingError("mode", self.mode, f"(or WANDB_MODE) must be one of {', '.join(WANDB_MODES)}.")
        if self.name == "wandb" and importlib.util.find_spec("wandb") is None:
            raise SettingError("name", "wandb", "but the wandb package is not installed: `pip install wandb`, "
                               "or logger=none.")


@dataclass
class SelectionSettings:
    """``selection``: how the reported best weights are chosen (``experiments/training/finish.py``)."""

    val_fraction: float = 0.1  # training images held out for validation (stratified); 0 = none
    split_seed: int = 0  # which images (the same for every run, whatever its seed)
    select_on: str = "val"  # val (ours) | test (the authors': leaks the test set, warned) | last (final only)

    def __post_init__(self) -> None:
        self.val_fraction = check_number("val_fraction", self.val_fraction, 0, 0.5, meaning="(0.1 holds out 10% "
                                         "of the training images for validation; 0 holds out none)")
        self.split_seed = check_whole("split_seed", self.split_seed, 0)
        if self.select_on not in SELECT_ON:
            raise SettingError("select_on", self.select_on, "valid choices are val (best epoch on the held-out "
                               "validation images), test (the authors': leaks the test set) and last (final "
                               "weights only).")
        if self.select_on == "val" and self.val_fraction == 0:
            raise SettingError("select_on", "val", "needs validation images, but selection.val_fraction=0: set "
                               "selection.val_fraction=0.1, or {key}=last to keep the final weights only.")


@dataclass
class DdpSettings:
    """``ddp``: several processes (``torchrun --nproc_per_node=N experiments/run.py ...``)."""

    sync_batchnorm: bool = LASConfig.sync_batchnorm  # BatchNorm over the global batch; false = per rank


@dataclass
class RunConfig:
    """The whole training command line; the game's switches default to :class:`las_env.game.LASConfig`'s."""

    agent: Any = MISSING  # conf/agent/*.yaml: _target_ (the class) and its arguments; k read by the game
    data: DataSettings = field(default_factory=DataSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    method: MethodConfig = field(default_factory=MethodConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    logger: LoggerSettings = field(default_factory=LoggerSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    selection: SelectionSettings = field(default_factory=SelectionSettings)
    ddp: DdpSettings = field(default_factory=DdpSettings)
    seed: int = 0  # target init, data order, augmentation, attack starts, agent init
    device: str = LASConfig.device  # cpu | cuda | cuda:N | auto (cuda when available)
    precision: str = LASConfig.precision  # fp32 | bf16 | fp16 (autocast; fp16 adds a grad scaler)
    channels_last: bool = LASConfig.channels_last  # NHWC memory format (faster convolutions on GPUs)
    threads: Optional[int] = "${data.threads}"  # type: ignore[assignment]  # torch CPU threads
    attack_start: str = LASConfig.attack_start  # own_ball (ours) | threat_ball (the authors') | gaussian (TRADES')
    attack_clip: str = LASConfig.attack_clip  # clip the start into each image's ball before the first step
    # (start, ours) | only after it (first_step, the authors'; matters with attack_start=threat_ball)
    last_batch: str = LASConfig.last_batch  # epoch's partial last batch: drop (ours) | wrap (the authors keep it)
    ddp_timeout_s: float = 900  # a collective waiting longer for a silent rank fails the job (not hashed)
    log_every_steps: int = 20  # step-level aggregates (progress bar, W&B) every this many steps; 0: per epoch
    progress: bool = True  # tqdm progress bars (stderr)
    run_root: str = "runs"  # runs go to <run_root>/<data>/<agent>/<model>-seed<seed>-<hash of every setting>
    resume: Any = False  # true: continue this exact command's run; or a run directory to continue
    stop_after_epochs: Optional[int] = None  # end this invocation after n epochs, resumable
    init_from: Optional[str] = None  # a run folder: start from its last checkpoint with these settings
    init_from_other_data: bool = False  # true: init_from may continue weights trained on other data (refused by default)
    on_nonfinite: str = "stop"  # stop: a non-finite loss/reward/gradient/weight ends the run | skip: drop such batches


ConfigStore.instance().store(name="run_schema", node=RunConfig)
