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

from las_env.attack import eval_mode, per_image_pgd, random_start
from las_env.checkpoint import restore_generator
from las_env.augment import augment_batch
from las_env.data import ImageData, load_dataset
from las_env.datasets.registry import lookup
from las_env.game_config import LASConfig, steps_per_epoch  # noqa: F401 (re-exported)
from las_env.grids import threat_model_for
from las_env.lookahead import lookahead_step
from las_env.methods import MethodBatch, build_method
from las_env.models import build_model
from las_env.outcome import StepOutcome
from las_env.reward import probe_updated_target, reward_terms
from las_env.sharding import Shard, process_shard, wrap_target
from las_env.strategy_space import StrategySpace
from las_env.target import TargetTrainer, autocast

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
        self.grid = self.space  # the earlier name
        self.threat = threat_model_for(config.dataset)
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

    def configure_agent(self, *, reward_interval: int | None = None, step_reward: bool | None = None,
                        pre_update_probe: bool | None = None) -> None:
        """Tell the game what its agent needs, before the first step (the game exists first, the
        agent is built from it, then the game learns the agent's wishes).

        Args:
            reward_interval: the agent's k: the full reward is paid on every k-th step only.
            step_reward: False when the agent scores its actions itself (``score``).
            pre_update_probe: True when the agent needs ``terms_before`` (``credit="unbiased"``).
            ``None`` leaves a setting as the config has it.
        """
        if self.step_index != 0:
            raise RuntimeError("configure_agent() is allowed only before the first step of an episode.")
        changes: dict = {}
        if reward_interval is not None:
            changes["reward_interval"] = reward_interval
        if step_reward is not None:
            changes["step_reward"] = step_reward
        if pre_update_probe is not None:
            changes["reward"] = replace(self.config.reward, pre_update_probe=pre_update_probe)
        self.config = replace(self.config, **changes)  # checked again (k >= 1 ...)

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
            x = augment_batch(x, self.rng, pad_mode=self.config.augment_padding)
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self._x_global, self._y_global = x, y
        self._x, self._y = self.shard.rows(x), self.shard.rows(y)

    # -------------------------------------------------------------------- step
    def strategy(self, action: Tensor) -> dict[str, Tensor]:
        """Column name -> the values ``(B,)`` an index action ``(B, columns)`` plays (one gather)."""
        return self._lookup(action)

    def _extras(self, chosen: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: chosen[name] for name in self.space.extra_columns}

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
        chosen = self.strategy(action)
        step_size, iterations, epsilon = chosen["step_size"], chosen["iterations"], chosen["epsilon"]
        extras = self._extras(chosen)
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
            strategy=chosen,
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
        chosen = self.strategy(action)
        step_size, iterations, epsilon = chosen["step_size"], chosen["iterations"], chosen["epsilon"]
        extras = self._extras(chosen)
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
            strategy=chosen,
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
                                 generator=generator, loss=loss, clip_start=self.config.attack_clip == "start")

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
