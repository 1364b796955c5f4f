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

from dataclasses import replace

import torch
from torch import Tensor

from las_env.attack import GradientCount, eval_mode, per_image_pgd, random_start
from las_env.augment import augment_batch
from las_env.checkpoint import restore_generator
from las_env.data import ImageData
from las_env.datasets.registry import load_dataset, lookup
from las_env.game_config import LASConfig, steps_per_epoch
from las_env.lookahead import lookahead_step
from las_env.methods import MethodBatch, MethodLoss, build_method
from las_env.models import build_model
from las_env.optim import autocast
from las_env.reward import UpdatedTargetProbe, probe_updated_target, reward_terms, updated_target_total
from las_env.sharding import Shard, process_shard, wrap_target
from las_env.step_record import StepRecord
from las_env.strategy_space import EARLY_STOP_COLUMN, StrategySpace
from las_env.target import TargetTrainer

SCORE_SEED_OFFSET = 0x5C0DE
"""``score``'s generator is seeded with the episode's seed plus this (a stream of its own)."""


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
        self.space: StrategySpace = config.grid
        self.threat = config.threat
        self._lookup = self.space.lookup(self.device)
        self.method = build_method(config.method)
        smooth = config.reward.w_hat_true_class_prob  # the authors' LAS-AWP smooths the copy's step only
        self._lookahead_optim = config.optim if smooth is None else replace(
            config.optim, label_smoothing=0.0, true_class_prob=smooth)
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
        self._scored_gradients = 0  # score()'s gradient computations, reported by the next play's record
        # Several processes: this rank plays its rows of every global batch (las_env/sharding.py).
        self.shard: Shard = process_shard()
        self.shard.check_batch(config.batch_size)
        if self.shard.distributed and config.reward.probe_fraction < 1:
            raise ValueError(
                f"reward.probe_fraction={config.reward.probe_fraction} does not run under torchrun yet: the probe's "
                f"subset is drawn per process. Use reward.probe_fraction=1 with torchrun, or run in one process."
            )
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
            model = build_model(self.config.model, self.data.channels, self.data.num_classes,
                                init=self.config.model_init)
        model = model.to(self.device)
        if self.config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.target, trained = wrap_target(model, self.shard, self.config.sync_batchnorm)
        self.trainer = TargetTrainer(trained, self.config.optim, self.total_steps, self.config.precision,
                                     method=self.method)
        self.step_index = 0
        self._scored_gradients = 0
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
    def indices(self) -> Tensor:
        """The training-set index of each image of ``batch`` ``(B,)``, on the training device."""
        return self._indices

    @property
    def global_indices(self) -> Tensor:
        """The training-set index of each image of ``global_batch`` (``indices`` in one process)."""
        return self._indices_global

    @property
    def epoch_order(self) -> Tensor:
        """The current epoch's permutation of training-image indices: step ``i`` of the
        epoch trains on ``epoch_order[i * batch_size : (i + 1) * batch_size]``."""
        return self._order

    def _new_epoch_order(self) -> None:
        x_train = self.data.x_train
        self._order = torch.randperm(x_train.shape[0], generator=self.order_rng, device=x_train.device)

    def _batch_indices(self) -> Tensor:
        """The training-set indices of the current step's global batch (where the data lives)."""
        b = self.config.batch_size
        i = self.step_index % self.steps_per_epoch
        idx = self._order[i * b : (i + 1) * b]
        if idx.shape[0] < b:  # last_batch="wrap": fill up from the start of this epoch's order
            idx = torch.cat([idx, self._order[: b - idx.shape[0]]])
        return idx

    def _load_batch(self) -> None:
        idx = self._batch_indices()
        x, y = self.data.x_train[idx], self.data.y_train[idx]
        if not self.resident:
            if self.device.type == "cuda":
                x, y = x.pin_memory(), y.pin_memory()
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
        if self.augment:
            x = augment_batch(x, self.rng, pad_mode=self.config.augment_padding)
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self._x_global, self._y_global = x, y
        self._x, self._y = self.shard.rows(x), self.shard.rows(y)
        self._indices_global = idx.to(self.device)
        self._indices = self.shard.rows(self._indices_global)

    # -------------------------------------------------------------------- step
    def strategy(self, action: Tensor) -> dict[str, Tensor]:
        """Column name -> the values ``(B,)`` an index action ``(B, columns)`` plays (one gather)."""
        return self._lookup(action)

    def is_reward_step(self, step: int | None = None) -> bool:
        """Whether step ``step`` (default: the next one) computes the full reward."""
        step = self.step_index if step is None else step
        k = self.config.reward_interval  # None: no step is (fixed and random agents never learn)
        return k is not None and (step + 1) % k == 0

    def play(self, action: Tensor) -> StepRecord:
        """Attack the current batch with ``action``, train the target one step, score it.

        ``action`` is a long tensor (B, columns) on the game's device whose entries are valid
        grid indices (``LASEnv`` validates what users send).
        """
        return self._step(action, train=True)

    def score(self, action: Tensor) -> StepRecord:
        """The full reward ``play(action)`` would pay on the current batch, measured on a
        look-ahead copy of the target; the game itself does not change.

        Attacks the current batch with ``action`` (the real target, in eval mode, is only
        read), trains a copy one SGD step on the examples (:mod:`las_env.lookahead`: with
        ``reward.w_hat="this_step"`` the copy continues the real optimiser's momentum, with
        ``"deepcopy"`` it is the authors' fresh-SGD copy) and probes the copy. The target,
        its optimiser and schedule, the step counter, the data position and the current
        batch are untouched. Random numbers (attack and probe starts) come from
        ``score_rng``, a generator of its own (seeded from the episode's seed, checkpointed),
        so scoring never shifts the training stream's numbers. The record's ``step``,
        ``epoch`` and ``lr`` are those of the step that will train on this batch;
        ``adv_correct`` and ``train_loss`` come from the copy's training forward. Its gradient
        computations (attack and probe) count as probe cost in the next ``play``'s record.
        """
        return self._step(action, train=False)

    def _step(self, action: Tensor, *, train: bool) -> StepRecord:
        """``play`` (``train=True``: the real target steps) or ``score`` (a look-ahead copy steps)."""
        if self.target is None:
            raise RuntimeError(f"Call reset(seed) before {'play' if train else 'score'}().")
        if self.done:
            raise RuntimeError("The episode is over (the whole training budget is spent); call reset().")
        cfg, r = self.config, self.config.reward
        x, y = self._x, self._y
        rng = self.rng if train else self.score_rng
        chosen = self.strategy(action)
        extras = {name: chosen[name] for name in self.space.extra_columns}
        full = (self.is_reward_step() and cfg.step_reward) if train else True
        probed = full and r.needs_updated_target
        # Before the attack, so neither can depend on this batch's actions (not even via the RNG).
        rows = self._probe_rows(rng) if probed and r.probe_fraction < 1 else None
        attack_count, probe_count = GradientCount(), GradientCount()
        terms_before = self._terms_before(x, y, rng, rows, probe_count) if full else None
        x_adv = self._attack(x, y, chosen, rng, attack_count)
        lr = self.trainer.lr
        eval_l1 = self._eval_l1(x, x_adv, y, extras) if full and r.l1_forward == "eval" else None
        probe: UpdatedTargetProbe | None = None
        fit: MethodLoss | None = None
        if not train or (probed and r.w_hat == "deepcopy"):
            # score: the copy continues the real optimiser's momentum under w_hat="this_step"
            momentum = self.trainer.optimizer.state_dict() if not train and r.w_hat == "this_step" else None
            w_hat, fit = lookahead_step(self.target, x_adv, y, self._lookahead_optim, lr, precision=cfg.precision,
                                        optimizer_state=momentum, method=self.method, x=x, extras=extras,
                                        epoch=self.epoch)
            probe = self._probe(w_hat, x, y, rng, rows, probe_count) if probed else None
        if train:
            fit = self.trainer.train_step(x_adv, y, x=x, extras=extras, epoch=self.epoch)
            if probed and r.w_hat == "this_step":
                probe = self._probe(self.target, x, y, rng, rows, probe_count)
            probe_count.gradients += self._scored_gradients
            self._scored_gradients = 0
        else:
            self._scored_gradients += attack_count.gradients + probe_count.gradients

        terms, rewards = reward_terms(r, fit.per_image if eval_l1 is None else eval_l1, probe, rows)
        record = StepRecord(
            reward=rewards.mean() if full else torch.zeros((), device=self.device),
            reward_computed=full,
            rewards=rewards,
            terms=terms,
            adv_correct=fit.correct,
            clean_correct=probe.clean_correct if probe is not None else None,
            probe_correct=probe.probe_correct if probe is not None else None,
            terms_before=terms_before,
            train_loss=fit.per_image.mean(),
            strategy=chosen,
            indices=self._indices,
            attack_gradients=attack_count.gradients,
            probe_gradients=probe_count.gradients,
            step=self.step_index,
            epoch=self.epoch,
            lr=lr,
        )
        if train:
            self._advance()
        return record

    def _advance(self) -> None:
        """The next step's batch (a new epoch order at an epoch's end)."""
        self.step_index += 1
        if not self.done:
            if self.step_index % self.steps_per_epoch == 0:
                self._new_epoch_order()
            self._load_batch()

    def _probe_rows(self, generator: torch.Generator) -> Tensor:
        """The images this reward step's probes measure (``reward.probe_fraction`` < 1): a fresh
        uniformly random subset of ``max(1, round(fraction * B))`` rows, in batch order."""
        b = self._y.shape[0]
        m = max(1, round(self.config.reward.probe_fraction * b))
        return torch.randperm(b, generator=generator, device=self.device)[:m].sort().values

    def _terms_before(self, x: Tensor, y: Tensor, generator: torch.Generator, rows: Tensor | None,
                      count: GradientCount) -> Tensor | None:
        """``alpha*L2 + beta*L3`` per image of the target before the update (``credit="unbiased"``'s
        control variate), or None when ``reward.pre_update_probe`` is off."""
        r = self.config.reward
        if not (r.pre_update_probe and r.needs_updated_target):
            return None
        before = self._probe(self.target, x, y, generator, rows, count)
        return updated_target_total(r, before, y.shape[0], y.device, rows)

    def _attack(self, x: Tensor, y: Tensor, chosen: dict[str, Tensor], generator: torch.Generator,
                count: GradientCount) -> Tensor:
        """The training attack of the method (PGD-AT: CE; TRADES: KL to the clean softmax) with the
        strategy ``chosen`` (per image: step size, iterations, epsilon and, when the grid has the
        column, FAT's early stop tau), from the random start ``config.attack_start`` asks for."""
        epsilon = chosen["epsilon"]
        tau = chosen.get(EARLY_STOP_COLUMN)  # None: no early stop (the grid has no such column)
        start = None  # per_image_pgd's own: uniform in each image's ball
        if self.config.attack_start == "threat_ball":
            start = random_start(x, torch.full_like(epsilon, self.threat.epsilon), generator, self.shard)
        elif self.config.attack_start == "gaussian":
            start = 0.001 * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        loss, reference = self.method.attack_objective(self.target, x, y, self.config.precision)
        with autocast(self.device, self.config.precision):
            return per_image_pgd(self.target, x, reference, epsilon, chosen["step_size"], chosen["iterations"],
                                 start=start, generator=generator, loss=loss, shard=self.shard,
                                 early_stop=None if tau is None else tau.long(),
                                 clip_start=self.config.attack_clip == "start", count=count)

    def _eval_l1(self, x: Tensor, x_adv: Tensor, y: Tensor, extras: dict[str, Tensor]) -> Tensor:
        """The method's per-image L1 of the target (not yet updated) in eval mode: the authors' L1
        forward (PGD-AT: CE on the adversarial examples)."""
        with torch.no_grad(), eval_mode(self.target):
            return self.method.loss(self.target, MethodBatch(x, x_adv, y, extras), self.config.optim,
                                    self.config.precision).per_image

    def _probe(self, model: torch.nn.Module, x: Tensor, y: Tensor, generator: torch.Generator,
               rows: Tensor | None = None, count: GradientCount | None = None) -> UpdatedTargetProbe:
        """The reward's probe of ``model`` (the updated target, or the target before the update) on
        the batch's ``rows`` (None: all of it)."""
        r = self.config.reward
        if rows is not None:
            x, y = x[rows], y[rows]
        eps = r.probe_epsilon if r.probe_epsilon is not None else self.threat.epsilon
        step = r.probe_step_size if r.probe_step_size is not None else self.threat.step_size
        return probe_updated_target(model, x, y, r, eps, step, generator=generator,
                                    precision=self.config.precision, shard=self.shard, count=count)

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
        self._indices_global = self._batch_indices().to(self.device)
        self._indices = self.shard.rows(self._indices_global)
