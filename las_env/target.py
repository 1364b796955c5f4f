"""The target network's optimiser: SGD with momentum and a schedule over the whole budget,
stepped by the training method (:mod:`las_env.methods`). One call = one training step."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from las_env.methods import PGDAT, MethodBatch, MethodLoss, TrainingMethod
from las_env.optim import OptimConfig, Precision


@dataclass
class TargetTrainer:
    """Owns the target network's optimiser and schedule; ``train_step`` is one SGD step."""

    model: nn.Module
    optim: OptimConfig
    total_steps: int
    precision: Precision = "fp32"
    step_count: int = 0
    method: TrainingMethod | None = None
    """The :class:`las_env.methods.TrainingMethod` of each step; ``None`` = PGD-AT."""
    optimizer: torch.optim.SGD = field(init=False)
    scaler: torch.amp.GradScaler | None = field(init=False)

    def __post_init__(self) -> None:
        if self.method is None:
            self.method = PGDAT()
        self._milestone_steps = [round(m * self.total_steps) for m in self.optim.milestones]
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=self.lr_at(0),
            momentum=self.optim.momentum,
            weight_decay=self.optim.weight_decay,
        )
        device = next(self.model.parameters()).device
        self.scaler = torch.amp.GradScaler(device.type) if self.precision == "fp16" else None
        self._device = device

    def lr_at(self, step: int) -> float:
        """Learning rate used by training step ``step`` (0-based)."""
        o = self.optim
        if o.schedule == "constant":
            return o.lr
        if o.schedule == "cosine":
            return 0.5 * o.lr * (1 + math.cos(math.pi * step / max(1, self.total_steps)))
        passed = sum(step >= m for m in self._milestone_steps)
        return o.lr * o.gamma**passed

    @property
    def lr(self) -> float:
        """The learning rate the next step will use."""
        return self.lr_at(self.step_count)

    def train_step(self, x_adv: Tensor, y: Tensor, *, x: Tensor | None = None,
                   extras: dict[str, Tensor] | None = None, epoch: int = 0) -> MethodLoss:
        """One step of the target on ``(x_adv, y)`` by its training method, in train mode.

        ``x`` (the clean images) and ``extras`` (per-image values of the strategy's extra
        columns) are what methods other than PGD-AT read; ``epoch`` drives AWP's warm-up.
        Returns the method's :class:`las_env.methods.MethodLoss` of the target before the update.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step_count)
        batch = MethodBatch(x if x is not None else x_adv, x_adv, y, extras or {})
        out = self.method.step(self.model, self.optimizer, batch, self.optim, self.precision,
                               scaler=self.scaler, epoch=epoch)
        self.method.after_target_step(self.model, batch, self.precision)  # AWP's clean BN forward
        self.step_count += 1
        return out

    def state_dict(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict(), "step_count": self.step_count}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step_count"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
