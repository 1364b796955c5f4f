"""One global batch played by several processes: each rank attacks and trains on its rows.

Under ``torchrun`` every rank runs the same :class:`las_env.game.LASGame` with the same seed,
so every rank draws the same epoch order, loads the same GLOBAL batch of ``batch_size`` images
and augments it with the same generator; then it keeps its own contiguous block of rows
(:meth:`Shard.rows`, rank ``r`` of ``W`` keeps rows ``r*B/W .. (r+1)*B/W``). The random starts
of the training attack and of the reward's probe are drawn the same way (:meth:`Shard.noise`,
which the game passes to the attack and the probe: the noise of the whole global batch is drawn,
the rank keeps its rows), so a shard's images get
exactly the numbers the single process gives the same images, and every generator advances
alike on every rank. The cost is ``B x C x H x W`` random numbers per draw instead of ``B/W x
...``: nothing next to the attack.

The target is wrapped in :class:`torch.nn.parallel.DistributedDataParallel` for its training
step (gradients averaged over the ranks: with equal shards, the gradient of the global batch's
mean loss) and, with ``sync_batchnorm``, its BatchNorm layers normalise with the GLOBAL batch's
statistics: PyTorch's ``SyncBatchNorm`` on CUDA, :class:`GlobalBatchNorm` (the same maths with
differentiable all-reduces, any backend) on the CPU, where ``SyncBatchNorm`` does not run.

In a single process (no process group) :func:`process_shard` is rank 0 of 1 and everything
here is the identity: the single-process game is bit-identical to what it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``world`` processes playing one global batch."""

    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def check_batch(self, batch_size: int) -> None:
        """Equal shards are what makes DDP's gradient average the global batch's gradient."""
        if batch_size % self.world:
            raise ValueError(
                f"{batch_size} is not divisible by the {self.world} processes: every rank must get the "
                f"same number of images. Use a multiple of {self.world} (e.g. "
                f"{batch_size - batch_size % self.world or self.world})."
            )

    def rows(self, t: Tensor) -> Tensor:
        """This rank's block of the global batch ``t`` (a view; ``t`` itself when alone)."""
        if self.world == 1:
            return t
        n = t.shape[0] // self.world
        return t[self.rank * n:(self.rank + 1) * n]

    def noise(self, shape: torch.Size, generator: torch.Generator | None, device: torch.device,
              dtype: torch.dtype) -> Tensor:
        """``torch.rand(shape)`` for this rank's rows: the whole global batch's draw (``shape[0]``
        rows per rank), cut to this rank's rows; a plain draw in one process."""
        if self.world == 1:
            return torch.rand(shape, generator=generator, device=device, dtype=dtype)
        full = torch.rand((shape[0] * self.world, *shape[1:]), generator=generator, device=device, dtype=dtype)
        return self.rows(full)


def process_shard() -> Shard:
    """This process's shard: from the initialised process group, else rank 0 of 1."""
    if dist.is_available() and dist.is_initialized():
        return Shard(dist.get_rank(), dist.get_world_size())
    return Shard()


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward all-reduces the gradients: the total loss of all ranks
    depends on every rank's contribution to the sum."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:  # noqa: D102
        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of the global batch across all ranks.

    The per-channel sum, sum of squares and count are all-reduced by ``_SumOverRanks``
    (differentiable: its backward all-reduces the gradients, as ``SyncBatchNorm`` does), so
    forward AND backward equal BatchNorm on the concatenated batch. Running statistics use the unbiased global variance, like BatchNorm.
    Used on the CPU (gloo), where PyTorch's ``SyncBatchNorm`` refuses to run; every rank must
    call forward in training mode together (the training step and look-ahead copies do).
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        local = torch.cat([x.sum((0, 2, 3)), x.square().sum((0, 2, 3)),
                           x.new_full((1,), float(x.numel() // c))])
        total = _SumOverRanks.apply(local)
        s, sq, n = total[:c], total[c:2 * c], total[2 * c]
        mean = s / n
        var = sq / n - mean.square()
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / max(float(n) - 1, 1.0), alpha=m)
                self.num_batches_tracked.add_(1)
        shape = (1, c, 1, 1)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def global_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every ``BatchNorm2d`` replaced by :class:`GlobalBatchNorm` (same parameters and buffers)."""
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, device=module.weight.device if module.affine else None)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, global_batchnorm(child))
    return module


def average_gradients(model: nn.Module) -> None:
    """Under several processes, each gradient of ``model`` becomes its mean over the ranks (one
    all-reduce): what DDP does for the target, for the look-ahead copies that live outside DDP."""
    shard = process_shard()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not shard.distributed or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= shard.world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def wrap_target(model: nn.Module, shard: Shard, sync_batchnorm: bool) -> tuple[nn.Module, nn.Module]:
    """``(target, trained)``: the network the game attacks, evaluates and checkpoints, and the
    module its optimiser step runs (DDP over ``target`` when distributed, else ``target``)."""
    if not shard.distributed:
        return model, model
    device = next(model.parameters()).device
    if sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model) if device.type == "cuda" else global_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    # Synchronised BatchNorm keeps the same buffers on every rank; without it rank 0's running
    # statistics (its shard's) are broadcast at each forward, as plain DDP does.
    trained = nn.parallel.DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=not sync_batchnorm)
    return model, trained


__all__ = ["GlobalBatchNorm", "Shard", "average_gradients", "global_batchnorm", "process_shard", "wrap_target"]
