"""The game's settings (:class:`LASConfig`) and the episode's length arithmetic."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

from las_env.datasets.registry import ThreatModel, lookup
from las_env.methods import COLUMNS_METHODS_READ, MethodConfig, build_method
from las_env.reward import RewardConfig
from las_env.strategy_space import EARLY_STOP_COLUMN, StrategySpace
from las_env.optim import OptimConfig, Precision
from las_env.validate import SettingError, check_device, check_interval, check_number, check_whole

@dataclass
class LASConfig:
    """Everything that defines the game.

    Attributes:
        dataset: a registered data set (``las_env.datasets``): "digits" (offline default), "cifar10",
            "cifar100", "svhn", "gtsrb", "tiny-imagenet", "npz", "folder", or one of your own.
            Its registry record gives every default marked "the data set's" below.
        data_root: folder holding the data sets (for npz/folder: the file or folder itself).
        model: target architecture; ``None``: the data set's (for user data: resnet18 for images of
            32 px and more, small_cnn below, decided once the data is loaded).
        batch_size: images per step (the observation's first dimension); every observation
            has this shape, whatever ``last_batch``.
        epochs: training budget; an episode is ``epochs * steps_per_epoch`` steps.
        max_steps_per_epoch: cap on steps per epoch (benchmarks, smoke tests); ``None`` = all.
        optim: the target's optimiser and schedule; ``None``: the data set's.
        reward: the reward's terms and measure.
        reward_interval: k, the agent's update interval: the full reward (with L2/L3) is computed
            on every k-th step only; other steps report ``reward_computed=False``. ``None``: on no
            step (agents that never learn: fixed, random).
        threat: the evaluation threat model (L-inf epsilon and PGD step), also the L2 probe's and
            PGD-AT's default; ``None``: the data set's.
        grid: the strategy space (:class:`las_env.strategy_space.StrategySpace`); ``None``: the data set's.
        augment: random crop (pad 4) + flip on the device; ``None``: the data set's (on for 32 px and larger).
        augment_padding: how the crop pads: "zeros" (ours) or "reflect" (the authors' AWP and
            LAS-AWP scripts).
        model_init: the target's initialisation, "kaiming" (ours) or "pytorch" (PyTorch's layer
            defaults: the authors' ResNet-18 and PreAct ResNet-18); ``las_env.models``.
        attack_clip: when the training attack's start is clipped into each image's own ball:
            "start" (ours, before the first step) or "first_step" (the authors': kept in [0, 1]
            only, the first step's projection brings it in; matters with "threat_ball" starts).
        device: "cpu", "cuda", "cuda:1", ... ("auto" picks cuda when available).
        precision: "fp32", "bf16" (autocast) or "fp16" (autocast + grad scaler).
        channels_last: NHWC memory format for conv speed on GPUs.
        data_on_device: ``None``/True keeps the whole data set on the training device (no
            transfer per step); False keeps it in host memory (pinned on CUDA) and copies each
            batch with a non-blocking transfer, for data that does not fit on the GPU.
        attack_start: random start of the training attack. "own_ball" (ours): uniform in
            each image's own epsilon ball. "threat_ball" (the authors'): uniform in the threat
            model's ball (8/255 on CIFAR) whatever the image's epsilon, then projected to
            the image's own ball (a smaller epsilon starts on or near its ball's surface).
            "gaussian" (the authors' TRADES and LAS-TRADES start): ``x + 0.001 * N(0, 1)``.
        last_batch: the epoch's last partial batch (``N % batch_size`` images). "drop"
            (ours): dropped, each image at most once per epoch. "wrap" (our stand-in for the
            authors' keeping it as a smaller batch): filled up to ``batch_size`` with the
            first images of the same epoch's order, so every image trains every epoch, the
            epoch has the authors' ceil(N / B) steps (their per-iteration schedule and k
            cadence) and observations keep Gymnasium's fixed shape.
        step_reward: whether ``play`` pays the full reward on reward steps. False when the
            agent scores its actions itself with ``score`` before acting (the authors'
            reward flow): reward steps are still flagged, ``play`` reports L1 only.
        sync_batchnorm: under several processes (``las_env.sharding``), BatchNorm of the target
            uses the global batch's statistics (on by default: the single process's maths);
            False = each rank's shard's own (plain DDP). No effect in one process.
        method: the adversarial-training method (``las_env.methods``): PGD-AT, TRADES or AWP.
    """

    dataset: str = "digits"
    data_root: str = "data"
    model: str | None = None
    batch_size: int = 64
    epochs: int = 10
    max_steps_per_epoch: int | None = None
    optim: OptimConfig | None = None
    reward: RewardConfig = field(default_factory=RewardConfig)
    reward_interval: int | None = 1
    grid: StrategySpace | None = None
    threat: ThreatModel | None = None
    augment: bool | None = None
    augment_padding: Literal["zeros", "reflect"] = "zeros"
    model_init: Literal["kaiming", "pytorch"] = "kaiming"
    attack_clip: Literal["start", "first_step"] = "start"
    device: str = "cpu"
    precision: Precision = "fp32"
    channels_last: bool = False
    data_on_device: bool | None = None
    attack_start: Literal["own_ball", "threat_ball", "gaussian"] = "own_ball"
    last_batch: Literal["drop", "wrap"] = "drop"
    step_reward: bool = True
    sync_batchnorm: bool = True
    method: MethodConfig = field(default_factory=MethodConfig)

    def __post_init__(self) -> None:
        check_whole("batch_size", self.batch_size, 1)
        check_whole("epochs", self.epochs, 1)
        if self.reward_interval is not None:
            check_interval("reward_interval", self.reward_interval)
        check_whole("max_steps_per_epoch", self.max_steps_per_epoch, 1, allow_none=True)
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise SettingError("precision", self.precision, "must be fp32, bf16 or fp16.")
        self.device = check_device("device", self.device)  # "auto" decided here, once
        try:
            record = lookup(self.dataset)
        except KeyError as exc:
            raise SettingError("dataset", self.dataset, f"is not a registered data set: {exc.args[0]} Add one with "
                               "las_env.register_dataset(name, loader).") from None
        self.model = self.model or record.model  # still None for user data: set from the image size
        self.grid = self.grid if self.grid is not None else record.grid
        self.optim = self.optim if self.optim is not None else replace(record.optim)  # a copy of the shared record's
        self.threat = self.threat if self.threat is not None else record.threat
        check_number("threat.epsilon", self.threat.epsilon, 0, 1, low_open=True,
                     meaning="(the L-inf radius in pixel units for images in [0, 1]; CIFAR: 8/255)")
        check_number("threat.step_size", self.threat.step_size, 0, self.threat.epsilon, low_open=True,
                     meaning="(the evaluation PGD step: at most epsilon; CIFAR: 2/255 = epsilon / 4)")
        self._check_fidelity_switches()
        self._check_method_columns()
        self._check_early_stop_column()

    def _check_method_columns(self) -> None:
        # A column some method reads (trades_beta) but this one does not is a mistake; a column no
        # method knows is the user's own, carried along (info, choice counts, plots, report).
        reads = build_method(self.method).reads
        unread = [name for name in self.grid.extra_columns if name in COLUMNS_METHODS_READ and name not in reads]
        if unread:
            raise SettingError("grid.extra", list(self.grid.extra_columns),
                               f"has the strategy column(s) {unread}, which method={self.method.name} does not read "
                               f"(trades_beta is TRADES' KL weight): use method=trades (or method=awp "
                               f"method.awp_base=trades), or drop the column from the grid.")

    def _check_early_stop_column(self) -> None:
        taus = self.grid.values.get(EARLY_STOP_COLUMN)
        if taus is None:
            return
        if any(t != int(t) or t < 0 for t in taus):
            raise SettingError("grid.extra", {EARLY_STOP_COLUMN: list(taus)},
                               "must hold whole numbers tau >= 0 (the attack stops tau steps after an image is "
                               f"first misclassified), e.g. data.grid.extra.{EARLY_STOP_COLUMN}=[0,1,2,3].")
        if not build_method(self.method).attack_uses_labels:
            raise SettingError("grid.extra", {EARLY_STOP_COLUMN: list(taus)},
                               f"asks the training attack to stop early once an image is misclassified, but "
                               f"method={self.method.name}'s attack is TRADES' KL to the clean prediction, which "
                               f"has no label to be misclassified against: drop the column (and agent=fat, which "
                               f"needs it) or use method=pgd_at (or method=awp with method.awp_base=pgd_at).")

    def _check_fidelity_switches(self) -> None:
        if self.attack_start not in ("own_ball", "threat_ball", "gaussian"):
            raise ValueError(
                f"attack_start must be 'own_ball' (ours) or 'threat_ball' (the authors' LAS-AT), or 'gaussian' (the "
                f"authors' TRADES: x + 0.001*N(0,1)), got {self.attack_start!r}."
            )
        if self.attack_clip not in ("start", "first_step"):
            raise SettingError("attack_clip", self.attack_clip, "must be start (ours: the random start is clipped into "
                               "the image's ball) or first_step (the authors': clipped after the first step).")
        if self.augment_padding not in ("zeros", "reflect"):
            raise SettingError("augment_padding", self.augment_padding, "must be zeros (ours) or reflect (the authors' AWP).")
        if self.model_init not in ("kaiming", "pytorch"):
            raise SettingError("model_init", self.model_init, "must be kaiming (ours) or pytorch (the authors' ResNet-18).")
        if self.last_batch not in ("drop", "wrap"):
            raise ValueError(f"last_batch must be 'drop' (ours) or 'wrap' (the authors' keep it), got {self.last_batch!r}.")


def steps_per_epoch(n_train: int, batch_size: int, max_steps_per_epoch: int | None, last_batch: str = "drop") -> int:
    """Training steps in one epoch: full batches only ("drop") or one more for the partial
    batch ("wrap"), capped at ``max_steps_per_epoch``."""
    per_epoch = n_train // batch_size if last_batch == "drop" else math.ceil(n_train / batch_size)
    if max_steps_per_epoch is not None:
        per_epoch = min(per_epoch, max_steps_per_epoch)
    return per_epoch
