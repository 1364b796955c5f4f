"""One adversarial-training step of LAS-AT, without Gymnasium.

:class:`LASGame` owns the data stream (resident on the training device, augmented there),
the target network and its optimiser, and the reward. ``play(action)`` attacks the current
batch with the per-image strategy, trains the target one step on the result, measures the
reward when this step carries one, and moves to the next batch. :class:`las_env.env.LASEnv`
is a thin Gymnasium wrapper over it; training loops that want no wrapper can drive it
directly. ``score(action)`` measures the reward ``play(action)`` would pay on a look-ahead
copy, changing nothing (the authors' reward flow scores actions it does not train on).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

from las_env.attack import eval_mode, per_image_pgd, random_start
from las_env.checkpoint import restore_generator
from las_env.augment import augment_batch
from las_env.data import ImageData, load_dataset
from las_env.datasets.registry import lookup
from las_env.grids import StrategyGrid, threat_model_for
from las_env.lookahead import lookahead_step
from las_env.methods import MethodBatch, MethodConfig, build_method
from las_env.models import build_model
from las_env.reward import RewardConfig, RewardTerms, probe_updated_target, reward_terms
from las_env.sharding import Shard, process_shard, wrap_target
from las_env.target import OptimConfig, Precision, TargetTrainer, autocast
from las_env.validate import SettingError, check_interval, check_whole

SCORE_SEED_OFFSET = 0x5C0DE
"""``score``'s generator is seeded with the episode's seed plus this (a stream of its own)."""


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
        reward_interval: the full reward (with L2/L3) is computed on every k-th step only
            (the agent's update interval); other steps report ``reward_computed=False``.
        grid: the strategy grid; ``None`` takes the data set's default.
        augment: random crop (pad 4) + flip on the device; ``None``: the data set's (on for 32 px and larger).
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
    reward_interval: int = 1
    grid: StrategyGrid | None = None
    augment: bool | None = None
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
        check_interval("reward_interval", self.reward_interval)  # the agent's update interval k
        check_whole("max_steps_per_epoch", self.max_steps_per_epoch, 1, allow_none=True)
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise SettingError("precision", self.precision, "must be fp32, bf16 or fp16.")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            kind = torch.device(self.device).type
        except (RuntimeError, TypeError):
            kind = None
        if kind not in ("cpu", "cuda"):
            raise SettingError("device", self.device, "must be cpu, cuda, cuda:N or auto (cuda when available).")
        if kind == "cuda" and not torch.cuda.is_available():
            raise SettingError("device", self.device, "CUDA is not available here; use device=cpu (or auto).")
        try:
            record = lookup(self.dataset)
        except KeyError as exc:
            raise SettingError("dataset", self.dataset, f"is not a registered data set: {exc.args[0]} Add one with "
                               "las_env.register_dataset(name, loader).") from None
        self.model = self.model or record.model  # still None for user data: set from the image size
        self.grid = self.grid if self.grid is not None else record.grid
        self.optim = self.optim if self.optim is not None else replace(record.optim)  # a copy of the shared record's
        self._check_fidelity_switches()
        self._check_method_columns()

    def _check_method_columns(self) -> None:
        reads = build_method(self.method).reads
        unread = [name for name, _ in self.grid.extra if name not in reads]
        if unread:
            raise SettingError("grid.extra", [name for name, _ in self.grid.extra],
                               f"has the strategy column(s) {unread}, which method={self.method.name} does not read "
                               f"(trades_beta is TRADES' KL weight): use method=trades (or method=awp "
                               f"method.awp_base=trades), or drop the column from the grid.")

    def _check_fidelity_switches(self) -> None:
        if self.attack_start not in ("own_ball", "threat_ball", "gaussian"):
            raise ValueError(
                f"attack_start must be 'own_ball' (ours) or 'threat_ball' (the authors' LAS-AT), or 'gaussian' (the "
                f"authors' TRADES: x + 0.001*N(0,1)), got {self.attack_start!r}."
            )
        if self.last_batch not in ("drop", "wrap"):
            raise ValueError(f"last_batch must be 'drop' (ours) or 'wrap' (the authors' keep it), got {self.last_batch!r}.")


def steps_per_epoch(n_train: int, batch_size: int, max_steps_per_epoch: int | None, last_batch: str = "drop") -> int:
    """Training steps in one epoch: full batches only ("drop") or one more for the partial
    batch ("wrap"), capped at ``max_steps_per_epoch``."""
    per_epoch = n_train // batch_size if last_batch == "drop" else math.ceil(n_train / batch_size)
    if max_steps_per_epoch is not None:
        per_epoch = min(per_epoch, max_steps_per_epoch)
    return per_epoch


@dataclass
class StepOutcome:
    """What one step of the game produced. Tensors stay on the training device.

    Attributes:
        reward: the batch reward, mean of ``terms.total`` (0-d); 0 when not computed.
        reward_computed: whether this step paid for the full reward (L2/L3 included).
        terms: per-image L1, L2, L3 and total reward (B,). L2/L3 are zeros when not computed.
        adv_correct: target (before the update) right on each adversarial example (B,).
        clean_correct: updated target right on each clean image (B,), or None when not measured.
        probe_correct: updated target right under the probe attack (B,), or None.
        terms_before: ``alpha*L2 + beta*L3`` per image of the target BEFORE this step's update
            (B,), on reward steps with ``reward.pre_update_probe``; otherwise None.
        train_loss: the target's mean training loss on this batch (0-d).
        step_size, iterations, epsilon: the physical attack settings used, per image (B,).
        step: index of this step in the episode (0-based); epoch: its epoch; lr: its learning rate.
    """

    reward: Tensor
    reward_computed: bool
    terms: RewardTerms
    adv_correct: Tensor
    clean_correct: Tensor | None
    probe_correct: Tensor | None
    train_loss: Tensor
    step_size: Tensor
    iterations: Tensor
    epsilon: Tensor
    step: int
    epoch: int
    lr: float
    terms_before: Tensor | None = None


class LASGame:
    """The adversarial-training game of one target network over its whole budget."""

    def __init__(self, config: LASConfig, data: ImageData | None = None) -> None:
        self.config = config
        self.device = torch.device(config.device)
        data = data if data is not None else load_dataset(config.dataset, config.data_root)
        self.resident = config.data_on_device is not False
        if self.resident:
            self.data = data.to(self.device)
        else:
            self.data = data.to("cpu")
            if self.device.type == "cuda":
                self.data = replace(self.data, x_train=self.data.x_train.pin_memory(),
                                    y_train=self.data.y_train.pin_memory())
        self.grid: StrategyGrid = config.grid
        self.threat = threat_model_for(config.dataset)
        self._grid_tables = self.grid.tables(self.device)
        self._extra_tables = self.grid.extra_tables(self.device)
        self.method = build_method(config.method)
        smooth = config.reward.w_hat_true_class_prob  # the authors' LAS-AWP smooths the copy's step only
        self._lookahead_optim = config.optim if smooth is None else replace(
            config.optim, label_smoothing=0.0, true_class_prob=smooth)
        self._nvec = torch.tensor(self.grid.nvec, device=self.device)
        n_train = self.data.x_train.shape[0]
        if config.batch_size > n_train:
            raise ValueError(f"batch_size {config.batch_size} exceeds the {n_train} training images of {data.name}.")
        per_epoch = steps_per_epoch(n_train, config.batch_size, config.max_steps_per_epoch, config.last_batch)
        self.steps_per_epoch = per_epoch
        self.total_steps = per_epoch * config.epochs
        record = lookup(config.dataset)
        if config.model is None:
            config.model = record.model_for(self.data.height, self.data.width)
        self.augment = config.augment if config.augment is not None else record.augment_for(self.data.height, self.data.width)
        self.rng = torch.Generator(device=self.device)
        # The data order is drawn where the data lives, so indexing never crosses devices.
        self.order_rng = self.rng if self.resident else torch.Generator()
        self.score_rng = torch.Generator(device=self.device)  # score()'s own stream
        self.target: torch.nn.Module | None = None
        self.trainer: TargetTrainer | None = None
        self.step_index = 0
        # Several processes: this rank plays its rows of every global batch (las_env/sharding.py).
        self.shard: Shard = process_shard()
        self.shard.check_batch(config.batch_size)
        if self.shard.distributed and config.method.name != "pgd_at":
            # Not yet verified against one process (AWP's proxy step would see one rank's shard).
            raise ValueError(
                f"method={config.method.name} does not run under torchrun yet: only method=pgd_at is checked "
                f"to train as one process does. Run method={config.method.name} in one process (python "
                f"experiments/run.py ...), or use method=pgd_at with torchrun."
            )

    # ----------------------------------------------------------------- episode
    def reset(self, seed: int) -> None:
        """A fresh target network, optimiser and data order, all derived from ``seed``."""
        self.rng.manual_seed(seed)
        self.order_rng.manual_seed(seed)
        self.score_rng.manual_seed(seed + SCORE_SEED_OFFSET)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            model = build_model(self.config.model, self.data.channels, self.data.num_classes)
        model = model.to(self.device)
        if self.config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.target, trained = wrap_target(model, self.shard, self.config.sync_batchnorm)
        self.trainer = TargetTrainer(trained, self.config.optim, self.total_steps, self.config.precision,
                                     method=self.method)
        self.step_index = 0
        self._new_epoch_order()
        self._load_batch()

    @property
    def epoch(self) -> int:
        """Epoch (0-based) of the current batch."""
        return self.step_index // self.steps_per_epoch

    @property
    def done(self) -> bool:
        return self.step_index >= self.total_steps

    @property
    def batch(self) -> tuple[Tensor, Tensor]:
        """The clean images ``(B, C, H, W)`` and labels ``(B,)`` the next step trains on
        (under several processes: this rank's rows, ``B = batch_size / world``)."""
        return self._x, self._y

    @property
    def global_batch(self) -> tuple[Tensor, Tensor]:
        """The whole global batch of every rank (``batch`` itself in one process)."""
        return self._x_global, self._y_global

    @property
    def epoch_order(self) -> Tensor:
        """The current epoch's permutation of training-image indices: step ``i`` of the
        epoch trains on ``epoch_order[i * batch_size : (i + 1) * batch_size]``."""
        return self._order

    def _new_epoch_order(self) -> None:
        x_train = self.data.x_train
        self._order = torch.randperm(x_train.shape[0], generator=self.order_rng, device=x_train.device)

    def _load_batch(self) -> None:
        b = self.config.batch_size
        i = self.step_index % self.steps_per_epoch
        idx = self._order[i * b : (i + 1) * b]
        if idx.shape[0] < b:  # last_batch="wrap": fill up from the start of this epoch's order
            idx = torch.cat([idx, self._order[: b - idx.shape[0]]])
        x, y = self.data.x_train[idx], self.data.y_train[idx]
        if not self.resident:
            if self.device.type == "cuda":
                x, y = x.pin_memory(), y.pin_memory()
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
        if self.augment:
            x = augment_batch(x, self.rng)
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self._x_global, self._y_global = x, y
        self._x, self._y = self.shard.rows(x), self.shard.rows(y)

    # -------------------------------------------------------------------- step
    def action_values(self, action: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Physical (step size, iterations, epsilon) per image for an index action (B, 3)."""
        steps, iters, eps = self._grid_tables
        return steps[action[:, 0]], iters[action[:, 1]], eps[action[:, 2]]

    def extra_values(self, action: Tensor) -> dict[str, Tensor]:
        """Per-image values ``(B,)`` of the grid's extra columns (e.g. ``trades_beta``), by name."""
        return {name: table[action[:, 3 + j]] for j, (name, table) in enumerate(self._extra_tables.items())}

    def is_reward_step(self, step: int | None = None) -> bool:
        """Whether step ``step`` (default: the next one) computes the full reward."""
        step = self.step_index if step is None else step
        return (step + 1) % self.config.reward_interval == 0

    def play(self, action: Tensor) -> StepOutcome:
        """Attack the current batch with ``action``, train the target one step, score it.

        ``action`` is a long tensor (B, columns) on the game's device whose entries are valid
        grid indices (``LASEnv`` validates what users send).
        """
        with self.shard.draws():
            return self._play(action)

    def _check_playable(self, verb: str) -> None:
        if self.target is None:
            raise RuntimeError(f"Call reset(seed) before {verb}().")
        if self.done:
            raise RuntimeError("The episode is over (the whole training budget is spent); call reset().")

    def _play(self, action: Tensor) -> StepOutcome:
        self._check_playable("play")
        cfg = self.config
        x, y = self._x, self._y
        step_size, iterations, epsilon = self.action_values(action)
        extras = self.extra_values(action)
        reward_computed = self.is_reward_step() and cfg.step_reward
        # Before the attack, so it cannot depend on this batch's actions (not even via the RNG).
        terms_before = self._terms_before(x, y, self.rng) if reward_computed else None
        x_adv = self._attack(x, y, step_size, iterations, epsilon, self.rng)

        lr = self.trainer.lr
        probe = None
        eval_l1 = self._eval_l1(x, x_adv, y, extras) if reward_computed and cfg.reward.l1_forward == "eval" else None
        if reward_computed and cfg.reward.needs_updated_target and cfg.reward.w_hat == "deepcopy":
            look = lookahead_step(self.target, x_adv, y, self._lookahead_optim, lr, precision=cfg.precision,
                                  method=self.method, x=x, extras=extras, epoch=self.epoch)
            probe = self._probe(look.model, x, y, self.rng)
        result = self.trainer.train_step(x_adv, y, x=x, extras=extras, epoch=self.epoch)
        if reward_computed and cfg.reward.needs_updated_target and cfg.reward.w_hat == "this_step":
            probe = self._probe(self.target, x, y, self.rng)

        terms = reward_terms(cfg.reward, result.loss if eval_l1 is None else eval_l1, probe)
        reward = terms.total.mean() if reward_computed else torch.zeros((), device=self.device)
        outcome = StepOutcome(
            reward=reward,
            reward_computed=reward_computed,
            terms=terms,
            adv_correct=result.correct,
            clean_correct=probe.clean_correct if probe is not None else None,
            probe_correct=probe.probe_correct if probe is not None else None,
            train_loss=result.loss.mean(),
            step_size=step_size,
            iterations=iterations,
            epsilon=epsilon,
            step=self.step_index,
            epoch=self.epoch,
            lr=lr,
            terms_before=terms_before,
        )
        self.step_index += 1
        if not self.done:
            if self.step_index % self.steps_per_epoch == 0:
                self._new_epoch_order()
            self._load_batch()
        return outcome

    def score(self, action: Tensor) -> StepOutcome:
        """The full reward ``play(action)`` would pay on the current batch, measured on a
        look-ahead copy of the target; the game itself does not change.

        Attacks the current batch with ``action`` (the real target, in eval mode, is only
        read), trains a copy one SGD step on the examples (:mod:`las_env.lookahead`: with
        ``reward.w_hat="this_step"`` the copy continues the real optimiser's momentum, with
        ``"deepcopy"`` it is the authors' fresh-SGD copy) and probes the copy. The target,
        its optimiser and schedule, the step counter, the data position and the current
        batch are untouched. Random numbers (attack and probe starts) come from
        ``score_rng``, a generator of its own (seeded from the episode's seed, checkpointed),
        so scoring never shifts the training stream's numbers. The outcome's ``step``,
        ``epoch`` and ``lr`` are those of the step that will train on this batch;
        ``adv_correct`` and ``train_loss`` come from the copy's training forward.
        """
        with self.shard.draws():
            return self._score(action)

    def _score(self, action: Tensor) -> StepOutcome:
        self._check_playable("score")
        cfg = self.config
        x, y = self._x, self._y
        step_size, iterations, epsilon = self.action_values(action)
        extras = self.extra_values(action)
        terms_before = self._terms_before(x, y, self.score_rng)
        x_adv = self._attack(x, y, step_size, iterations, epsilon, self.score_rng)
        lr = self.trainer.lr
        momentum = self.trainer.optimizer.state_dict() if cfg.reward.w_hat == "this_step" else None
        look = lookahead_step(self.target, x_adv, y, self._lookahead_optim, lr, precision=cfg.precision,
                              optimizer_state=momentum, method=self.method, x=x, extras=extras, epoch=self.epoch)
        l1 = self._eval_l1(x, x_adv, y, extras) if cfg.reward.l1_forward == "eval" else look.loss
        probe = self._probe(look.model, x, y, self.score_rng) if cfg.reward.needs_updated_target else None
        terms = reward_terms(cfg.reward, l1, probe)
        return StepOutcome(
            reward=terms.total.mean(),
            reward_computed=True,
            terms=terms,
            adv_correct=look.correct,
            clean_correct=probe.clean_correct if probe is not None else None,
            probe_correct=probe.probe_correct if probe is not None else None,
            train_loss=look.train_loss,
            step_size=step_size,
            iterations=iterations,
            epsilon=epsilon,
            step=self.step_index,
            epoch=self.epoch,
            lr=lr,
            terms_before=terms_before,
        )

    def _terms_before(self, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor | None:
        """``alpha*L2 + beta*L3`` per image of the target before the update (``credit="unbiased"``'s
        control variate), or None when ``reward.pre_update_probe`` is off."""
        r = self.config.reward
        if not (r.pre_update_probe and r.needs_updated_target):
            return None
        before = self._probe(self.target, x, y, generator)
        return reward_terms(r, torch.zeros_like(y, dtype=torch.float32), before).total

    def _attack(self, x: Tensor, y: Tensor, step_size: Tensor, iterations: Tensor, epsilon: Tensor,
                generator: torch.Generator) -> Tensor:
        """The training attack of the method (PGD-AT: CE; TRADES: KL to the clean softmax), with
        the random start ``config.attack_start`` asks for."""
        start = None  # per_image_pgd's own: uniform in each image's ball
        if self.config.attack_start == "threat_ball":
            start = random_start(x, torch.full_like(epsilon, self.threat.epsilon), generator)
        elif self.config.attack_start == "gaussian":
            start = 0.001 * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        loss, reference = self.method.attack_objective(self.target, x, y, self.config.precision)
        with autocast(self.device, self.config.precision):
            return per_image_pgd(self.target, x, reference, epsilon, step_size, iterations, start=start,
                                 generator=generator, loss=loss)

    def _eval_l1(self, x: Tensor, x_adv: Tensor, y: Tensor, extras: dict[str, Tensor]) -> Tensor:
        """The method's per-image L1 of the target (not yet updated) in eval mode: the authors' L1
        forward (PGD-AT: CE on the adversarial examples)."""
        with torch.no_grad(), eval_mode(self.target):
            return self.method.loss(self.target, MethodBatch(x, x_adv, y, extras), self.config.optim,
                                    self.config.precision).per_image

    def _probe(self, model: torch.nn.Module, x: Tensor, y: Tensor, generator: torch.Generator):
        r = self.config.reward
        eps = r.probe_epsilon if r.probe_epsilon is not None else self.threat.epsilon
        step = r.probe_step_size if r.probe_step_size is not None else self.threat.step_size
        return probe_updated_target(model, x, y, r, eps, step, generator=generator, precision=self.config.precision)

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything needed to continue the episode exactly where it is."""
        return {
            "target": self.target.state_dict(),
            "trainer": self.trainer.state_dict(),
            "step_index": self.step_index,
            "rng": self.rng.get_state(),
            "order_rng": self.order_rng.get_state(),
            "score_rng": self.score_rng.get_state(),
            "order": self._order,
            "batch": (self._x_global, self._y_global),  # every rank's rows
        }

    def load_state_dict(self, state: dict) -> None:
        if self.target is None:
            self.reset(0)
        self.target.load_state_dict(state["target"])
        self.trainer.load_state_dict(state["trainer"])
        self.step_index = int(state["step_index"])
        restore_generator(self.rng, state["rng"])
        if "order_rng" in state:
            restore_generator(self.order_rng, state["order_rng"])
        if "score_rng" in state:
            restore_generator(self.score_rng, state["score_rng"])
        self._order = state["order"].to(self.data.x_train.device)
        self._x_global, self._y_global = (t.to(self.device) for t in state["batch"])
        self._x, self._y = self.shard.rows(self._x_global), self.shard.rows(self._y_global)
