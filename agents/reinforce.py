"""REINFORCE for LAS-AT's strategy network, in one file, to be read top to bottom.

The strategy network p(a | x; theta) picks a PGD configuration per image. Its objective
``J = E[L1 + alpha*L2 + beta*L3]`` is not differentiable in the (discrete) action, so it is
maximised with the score-function (REINFORCE) estimator (the slides' Eq. for grad J)::

    grad J  ~  mean_i( A_i * grad log p(a_i | x_i; theta) )

Every ``k``-th environment step carries the full reward. On that step only, ``act``
runs the network with autograd and keeps log p(a_i | x_i) and the entropy; on the other
k-1 steps it samples under ``torch.no_grad()`` and keeps nothing (no graph, no memory).
After the step, ``learn`` turns the per-image rewards into the credit ``A_i`` and takes
one optimiser step.

Three credit assignments (``credit=``); ``agents/credit.py`` derives each and says which
objective it estimates:

- ``"paper"``, exactly the authors' (SPEC section 2): ONE scalar per batch,
  ``A_i = R = mean_j r_j``, no baseline; loss ``sum over heads of mean_i(-log p_h(a_ih) * R)``,
  which equals ``mean_i(-log p(a_i) * R)`` since the joint log-prob is the sum over heads.
  With the authors' SGD lr 1e-4, clip 1.0 and no entropy bonus, this is their update.
  Unbiased for grad J / B, with the largest variance.
- ``"per_image"``: each image is credited with its OWN reward minus a
  baseline, ``A_i = (r_i - b) / s``. ``b`` is a running mean (EMA, ``baseline_momentum``)
  of the batch-mean reward over past updates, initialised from the first batch's mean;
  the b used on an update comes from earlier batches only. ``s`` (``normalize_advantages``)
  is a running RMS of the advantages ``r_i - b`` (same EMA, the current batch included),
  so one learning rate works whatever the reward's scale ("accuracy" rewards span ~0..16,
  "loss" rewards are unbounded) and through training, as rewards drift. Low variance, but
  biased for J: it drops the effect of image i's attack on the OTHER images' L2/L3 through
  the shared target update, so it is in effect the "L1 only" ablation.
- ``"unbiased"``: ``A_i = (L1_i - mean_{j != i} L1_j) + B * (G(w_hat) - G(w))``, with ``G`` the
  batch terms ``alpha*mean L2 + beta*mean L3`` of the updated target and of the target before
  the update (measured by the env with ``reward.pre_update_probe``), divided by
  a running RMS of PAST updates' advantages only. Unbiased for grad J (see ``agents/credit.py``).

All modes: optional entropy bonus ``- entropy_coef * H``, gradient-norm clipping to
``grad_clip``, plain SGD (or Adam).

Reward flow (``reward_flow=``) and BatchNorm mode (``bn_mode=``), kept apart from the credit:

- ``"train_on_scored"`` (ours): the actions sampled on a reward step are the ones the target
  trains on, and the env's step pays their reward (``learn`` after the step).
- ``"score_then_resample"`` (the authors'): on a reward step ``act`` samples actions, has
  them scored by ``env.score`` (a look-ahead copy of the target; the real target does not
  train on them), learns from that reward at once, then samples NEW actions from the updated
  policy for the real training step. The loop binds the scorer (``bind_scorer``).
- ``bn_mode="train"`` (ours): the network runs in training mode throughout (BatchNorm uses
  the batch's own statistics), so every action comes from the same function.
  ``"split"`` (the authors'): training mode for the actions that are scored (their
  log-probabilities are learned from), eval mode (running statistics) for the actions the
  target trains on without them being scored: every step under ``score_then_resample``,
  the non-reward steps under ``train_on_scored``.

Reproducibility: the network is initialised from ``seed`` without touching the global RNG,
and actions are sampled with the agent's own ``torch.Generator`` on the training device;
``state_dict`` holds the network, optimiser, baseline statistics and generator state, so
a resumed run samples exactly the actions the uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from agents.base import AgentSpec, Scorer
from agents.credit import CREDITS, Credit, CreditStats
from agents.strategy_net import StrategyNet
from las_env.attack import eval_mode
from las_env.checkpoint import restore_generator
from las_env.datasets.registry import lookup
from las_env.strategy_space import ATTACK_COLUMNS
from las_env.validate import check_number

RewardFlow = Literal["train_on_scored", "score_then_resample"]
BnMode = Literal["train", "split"]



@dataclass
class _Pending:
    """What a learning step's ``act`` keeps for ``learn``: autograd-carrying (B,) tensors."""

    actions: Tensor  # (B, columns) long, the sampled grid indices
    log_prob: Tensor  # (B,) log p(a_i | x_i), summed over the three heads, with graph
    entropy: Tensor  # (B,) entropy of p(. | x_i), summed over the heads, with graph


class ReinforceAgent:
    """The strategy player of LAS-AT, trained by REINFORCE every ``k = spec.reward_interval`` steps
    (the env's; the authors' default 20, their best 40).

    Args:
        spec: the game (grid, observation shape, device, seed, k).
        credit: ``"unbiased"`` (the default, as on the command line: per-image credit that
            estimates the gradient of the paper's J; needs the env to measure the pre-update
            target, ``RewardConfig.pre_update_probe``), ``"per_image"`` (per-image rewards minus
            a running baseline) or ``"paper"`` (one scalar reward per batch, no baseline: the
            authors' estimator).
        lr: learning rate of the strategy network (authors: 1e-4).
        optimizer: ``"sgd"`` (authors) or ``"adam"``.
        momentum: SGD momentum (authors: 0); ignored by Adam.
        weight_decay: L2 penalty passed to the optimiser (authors: 0).
        entropy_coef: weight of the entropy bonus (authors: 0).
        grad_clip: maximum gradient norm (authors: 1.0); ``0`` or ``None`` disables clipping.
        baseline_momentum: EMA momentum of the baseline and of the advantage scale; the
            baseline weighs the newest batch by ``1 - baseline_momentum``.
        normalize_advantages: divide per-image advantages by their running RMS (per_image and
            unbiased credit; the paper's credit is never rescaled). With unbiased credit the RMS
            is of past updates only (1 on the first), so the scaling adds no bias.
        backbone: strategy backbone name for :func:`las_env.models.build_model`; ``None``
            takes ``small_cnn`` for digits and ``resnet18`` (the authors') otherwise.
        zero_init_heads: start from the uniform strategy (see ``agents.strategy_net``).
        backbone_init: ``"kaiming"`` (ours) or ``"pytorch"`` (the authors' ResNet-18: PyTorch's
            layer defaults), the strategy backbone's initialisation.
        seed: seed of the network's initialisation and of the sampling generator; ``None``
            takes ``spec.seed``.
        reward_flow: ``"train_on_scored"`` (ours) or ``"score_then_resample"`` (the
            authors'; needs ``bind_scorer``); see the module docstring.
        bn_mode: ``"train"`` (ours) or ``"split"`` (the authors'); see the module docstring.
        lr_milestones: fractions of the episode's updates (``total_steps // k``) where the
            strategy's learning rate is multiplied by ``lr_gamma``; empty (the default) = constant.
            The authors' LAS-TRADES: ``[0.75, 0.9]``; LAS-AWP: ``[0.5, 0.75]`` (the target's).
        lr_gamma: the decay factor at each milestone.

    Attributes:
        net: the :class:`StrategyNet`.
        optimizer: its optimiser.
        generator: the sampling RNG, on ``spec.device``.
        baseline: 0-d tensor, running mean of batch rewards (subtracted with per_image credit).
        advantage_sq: 0-d tensor, running mean of squared advantages (the scale ``s**2``).
        updates: number of optimiser steps taken.
    """

    def __init__(
        self,
        spec: AgentSpec,
        *,
        credit: Credit = "unbiased",
        lr: float = 1e-4,
        optimizer: Literal["sgd", "adam"] = "sgd",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        entropy_coef: float = 0.0,
        grad_clip: float | None = 1.0,
        baseline_momentum: float = 0.9,
        normalize_advantages: bool = True,
        backbone: str | None = None,
        zero_init_heads: bool = True,
        backbone_init: str = "kaiming",
        seed: int | None = None,
        reward_flow: RewardFlow = "train_on_scored",
        bn_mode: BnMode = "train",
        lr_milestones: Sequence[float] = (),
        lr_gamma: float = 0.1,
    ) -> None:
        if spec.reward_interval is None:
            raise ValueError("ReinforceAgent learns on reward steps, but its env has none: build the env with "
                             "reward_interval=k (agent.k on the command line).")
        if credit not in CREDITS:
            raise ValueError(f"credit must be one of {', '.join(CREDITS)}, got {credit!r}.")
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}.")
        check_number("lr", lr, 0, low_open=True, meaning="(a step size; e.g. 1e-3 with Adam, the authors' 1e-4 with SGD)")
        check_number("momentum", momentum, 0, 1, high_open=True)
        check_number("baseline_momentum", baseline_momentum, 0, 1, high_open=True, meaning="(a moving average's keep factor)")
        check_number("weight_decay", weight_decay, 0)
        check_number("entropy_coef", entropy_coef, 0, meaning="(a loss weight; 0 switches the term off)")
        if grad_clip is not None:
            check_number("grad_clip", grad_clip, 0, meaning="(gradient norm clip; 0 or null: no clipping)")
        self.spec = spec
        self.device = torch.device(spec.device)
        self.credit = credit
        self.entropy_coef = float(entropy_coef)
        self.grad_clip = float(grad_clip) if grad_clip else 0.0
        self.baseline_momentum = float(baseline_momentum)
        self.normalize_advantages = bool(normalize_advantages)
        self.seed = int(spec.seed if seed is None else seed)
        # The data set's (its registry record): the authors' ResNet-18 for CIFAR-like data, small_cnn on 8x8 digits.
        self.backbone = backbone or lookup(spec.dataset).backbone_for(*spec.observation_shape[2:])

        # The network's initialisation comes from the seed, leaving the global RNG as it was.
        in_channels = spec.observation_shape[1]
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            net = StrategyNet(self.backbone, in_channels, spec.grid.nvec, zero_init_heads=zero_init_heads,
                              backbone_init=backbone_init)
        self.net = net.to(self.device).train()

        if optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                self.net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
            )
        else:
            self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr, weight_decay=weight_decay)

        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.seed)
        self._init_lr_schedule(lr, lr_milestones, lr_gamma)

        self.stats = CreditStats(self.device, self.baseline_momentum, self.normalize_advantages)
        self.updates = 0

        self._lookup = spec.grid.lookup(self.device)  # index -> value, on the device
        self._pending: _Pending | None = None
        self._init_flow(reward_flow, bn_mode)

    def _init_lr_schedule(self, lr: float, milestones: Sequence[float], gamma: float) -> None:
        if any(not 0 <= float(m) <= 1 for m in milestones) or not 0 < float(gamma) <= 1:
            raise ValueError(f"lr_milestones must be fractions of the run in [0, 1] and lr_gamma in (0, 1], got "
                             f"{list(milestones)} and {gamma} (the authors' LAS-TRADES: [0.75, 0.9] and 0.1).")
        per_episode = max(1, int(self.spec.total_steps) // self.spec.reward_interval)
        self._lr0, self._lr_gamma = float(lr), float(gamma)
        self._lr_milestone_updates = [round(float(m) * per_episode) for m in milestones]

    def lr_at(self, update: int) -> float:
        """The strategy's learning rate on update ``update`` (0-based)."""
        return self._lr0 * self._lr_gamma ** sum(update >= m for m in self._lr_milestone_updates)

    # ---------------------------------------------------- reward flow, BN mode
    def _init_flow(self, reward_flow: str, bn_mode: str) -> None:
        if reward_flow not in ("train_on_scored", "score_then_resample"):
            raise ValueError(
                f"reward_flow must be 'train_on_scored' (ours) or 'score_then_resample' (the authors'), got {reward_flow!r}."
            )
        if bn_mode not in ("train", "split"):
            raise ValueError(f"bn_mode must be 'train' (ours) or 'split' (the authors'), got {bn_mode!r}.")
        self.reward_flow, self.bn_mode = reward_flow, bn_mode
        self.scores_actions = reward_flow == "score_then_resample"  # its env has step_reward=False
        self._scorer: Scorer | None = None
        self._scored_metrics: dict[str, Any] | None = None

    def bind_scorer(self, scorer: Scorer) -> None:
        """Give the agent ``env.score`` (the built-in loop does it when ``scores_actions``)."""
        self._scorer = scorer

    def _sample_unscored(self, x: Tensor) -> Tensor:
        """Actions the target trains on without their being scored: no graph; eval-mode
        BatchNorm under ``bn_mode="split"``."""
        with torch.no_grad(), (eval_mode(self.net) if self.bn_mode == "split" else nullcontext()):
            actions, _, _ = self.net.sample(x, self.generator)
        return actions

    def _score_then_resample(self, x: Tensor, scored_actions: Tensor) -> Tensor:
        """The authors' reward step: score the sampled actions, learn, sample anew."""
        if self._scorer is None:
            raise RuntimeError(
                "ReinforceAgent(reward_flow='score_then_resample') has no scorer: call "
                "agent.bind_scorer(env.score) before playing (experiments/training/loop.py does it)."
            )
        reward, info = self._scorer(scored_actions)
        self._scored_metrics = None
        metrics = self.learn(reward, {**info, "reward_computed": True})
        self._scored_metrics = metrics
        return self._sample_unscored(x)

    # ------------------------------------------------------------------ act
    def act(self, observation: Tensor, info: dict[str, Any]) -> Tensor:
        """Sample a (step size, iterations, epsilon) index triple per image, ``(B, 3)`` long.

        On the step that will carry the full reward (``info["reward_next_step"]``) the
        forward pass keeps its autograd graph and the log-probabilities are stored for
        ``learn``; on every other step it runs under ``torch.no_grad()`` and stores nothing.
        """
        x = torch.as_tensor(observation, device=self.device)
        if info.get("reward_next_step", False):
            # enable_grad: the graph is needed even if a caller runs act under no_grad.
            with torch.enable_grad():
                actions, log_prob, entropy = self.net.sample(x, self.generator)
            self._pending = _Pending(actions, log_prob, entropy)
            if self.scores_actions:
                return self._score_then_resample(x, actions)
        else:
            actions = self._sample_unscored(x)
            self._pending = None
        return actions

    # ---------------------------------------------------------------- learn
    def learn(self, reward: Tensor, info: dict[str, Any]) -> dict[str, Any]:
        """One REINFORCE update from the per-image rewards of a reward step.

        Does nothing (returns ``{}``) unless ``info["reward_computed"]`` is true and the
        preceding ``act`` kept log-probabilities. Returns detached 0-d tensors:
        ``policy_loss`` (the REINFORCE term, without the entropy bonus), ``entropy`` (mean
        per-image entropy of the joint strategy, nats), ``reward_mean``, ``reward_std``,
        ``baseline`` (the value used on this update), ``advantage_scale`` (``s``; 1 when
        not normalising), ``grad_norm`` (before clipping), ``step_size_idx``,
        ``iterations_idx``, ``epsilon_idx`` (mean chosen index per head) and ``epsilon``
        (mean chosen radius, pixel units).
        """
        if self._scored_metrics is not None:  # score_then_resample: act already learned
            metrics, self._scored_metrics = self._scored_metrics, None
            return metrics
        pending, self._pending = self._pending, None  # the graph is used at most once
        if not info.get("reward_computed", False):
            return {}
        if pending is None:  # a reward step act did not see coming (an env other than spec's)
            return {}

        rewards = torch.as_tensor(info["rewards"], device=self.device, dtype=torch.float32).detach()
        l1, before = self._unbiased_inputs(info) if self.credit == "unbiased" else (None, None)
        advantage, scale, baseline_used, batch_mean = self.stats.advantages(self.credit, rewards, l1, before)

        policy_loss = (-advantage * pending.log_prob).mean()
        entropy = pending.entropy.mean()
        loss = policy_loss - self.entropy_coef * entropy

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # max_norm=inf leaves the gradients as they are but still reports their norm.
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.net.parameters(), self.grad_clip if self.grad_clip > 0 else float("inf")
        )
        if self._lr_milestone_updates:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_at(self.updates)
        self.optimizer.step()
        self.updates += 1

        actions = pending.actions
        return {
            "policy_loss": policy_loss.detach(),
            "entropy": entropy.detach(),
            "reward_mean": batch_mean,
            "reward_std": rewards.std(correction=0),
            "baseline": baseline_used,
            "advantage_scale": scale.detach(),
            "grad_norm": grad_norm.detach(),
            # The attack's columns (the first three of every space); further columns are in the choice counts.
            **{f"{name}_idx": actions[:, j].float().mean() for j, name in enumerate(ATTACK_COLUMNS)},
            "epsilon": self._lookup(actions)["epsilon"].mean(),
        }

    def _unbiased_inputs(self, info: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """``credit="unbiased"``'s per-image L1 and pre-update batch terms, or a ValueError."""
        before = info.get("batch_terms_before")
        if before is None:
            raise ValueError(
                "credit='unbiased' needs the batch terms of the target before each reward step's update "
                "(info['batch_terms_before']), and the env did not measure them: build the env with "
                "reward=RewardConfig(pre_update_probe=True) (the command line does so for agent.credit=unbiased), "
                "or use credit='per_image' or 'paper'."
            )
        l1 = torch.as_tensor(info["l1"], device=self.device, dtype=torch.float32).detach()
        return l1, torch.as_tensor(before, device=self.device, dtype=torch.float32).detach()

    @property
    def baseline(self) -> Tensor:
        """0-d: the running mean of batch rewards (``agents.credit.CreditStats``)."""
        return self.stats.baseline

    @property
    def advantage_sq(self) -> Tensor:
        """0-d: the running mean of squared advantages (the scale ``s**2``)."""
        return self.stats.advantage_sq

    # ---------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Network, optimiser, running statistics and the sampling generator's state."""
        return {
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "baseline": self.stats.baseline.clone(),
            "advantage_sq": self.stats.advantage_sq.clone(),
            "stats_started": self.stats.started,
            "updates": self.updates,
            "generator": self.generator.get_state(),
            # For the record (not enforced on load): what produced this state.
            "hparams": {"k": self.spec.reward_interval, "credit": self.credit, "backbone": self.backbone},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.stats.baseline.copy_(state["baseline"])
        self.stats.advantage_sq.copy_(state["advantage_sq"])
        self.stats.started = bool(state["stats_started"])
        self.updates = int(state["updates"])
        restore_generator(self.generator, state["generator"])
        self._pending = None
