"""One run across several processes (``torchrun``): process group, the agent's global view,
sharded evaluation, rank 0's privileges, and a clear failure when a rank dies.

Every rank plays its rows of each global batch with the same seed (``las_env/sharding.py``); the
agent is replicated and sees the GLOBAL batch and rewards (:class:`GlobalView`), rank 0's actions
broadcast, so replicas cannot drift; per-epoch evaluation is split over the ranks; rank 0 alone
holds the run lock, writes every file and runs the final evaluation (README, "Several GPUs and machines").
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

import evaluation
from evaluation import CleanRobust
from experiments.config.errors import ConfigError
from las_env.reward import REWARD_TERMS
from las_env.sharding import Shard, process_shard
from las_env.step_record import BATCH_MEANS, PER_IMAGE

DEFAULT_TIMEOUT_S = 900  # ddp_timeout_s: how long a collective waits for a silent rank
EXIT_RANK_LOST = 3


class RankLost(RuntimeError):
    """A collective failed: another rank died, or stayed silent longer than the timeout."""


def launched_world() -> int:
    """Processes of this job as ``torchrun`` (or any ``env://`` launcher) announced them."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Whether this process writes files (rank 0, or the only process)."""
    return process_shard().rank == 0


@contextmanager
def process_group(device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[Shard]:
    """Join the job's process group under ``torchrun`` (NCCL on CUDA, gloo on CPU) and leave it at the
    end; a single process passes through. A failed or timed-out collective raises :class:`RankLost`."""
    if launched_world() <= 1 or dist.is_initialized():
        yield process_shard()
        return
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(torch.device(device))
    backend = "nccl" if cuda else "gloo"
    try:
        dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    except Exception as exc:  # noqa: BLE001 - the launcher's variables or the rendezvous
        raise RankLost(f"Could not join the {launched_world()}-process group ({backend}) within "
                       f"ddp_timeout_s={timeout_s:g}s: {_first_line(exc)}. Launch every rank with the same "
                       f"torchrun command (same --nnodes, --nproc-per-node, --rdzv-endpoint).") from None
    shard = process_shard()
    try:
        yield shard
    except Exception as exc:
        if isinstance(exc, (ConfigError, RankLost)) or not _is_comm_error(exc):
            raise
        raise RankLost(
            f"Rank {shard.rank} of {shard.world} lost contact with the other processes ({_first_line(exc)}): "
            f"another rank died or stayed silent longer than ddp_timeout_s={timeout_s:g}s. The job stops "
            f"(torchrun ends the other ranks). The checkpoint of the last finished epoch is intact: see the "
            f"first failing rank's output for the cause, then rerun the same command with resume=true."
        ) from None
    finally:
        dist.destroy_process_group()


def _is_comm_error(exc: BaseException) -> bool:
    dist_error = getattr(dist, "DistError", ())
    if dist_error and isinstance(exc, dist_error):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(k in text for k in ("gloo", "nccl", "connection", "timed out",
                                                                      "peer", "socket"))


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def check_batch(batch_size: int) -> None:
    """The global batch must split into equal shards (before anything is built)."""
    try:
        process_shard().check_batch(batch_size)
    except ValueError as exc:
        raise ConfigError(f"data.batch_size={batch_size} is the global batch of all ranks, but {exc}") from None


def check_agent(agent: Any, shard: Shard) -> None:
    """Agents whose learning is not replicated exactly (Stable-Baselines3's) are refused under DDP."""
    if shard.distributed and type(agent).__module__.startswith("agents.sb3"):
        raise ConfigError(
            f"agent {type(agent).__name__} (Stable-Baselines3) does not run under torchrun: its rollout buffer "
            f"and optimiser are not replicated exactly across ranks. Use agent=reinforce (or fixed/random) with "
            f"several processes, or run this agent in one process (python experiments/run.py ...)."
        )


class GlobalView:
    """The env as the agent and the loop see it under DDP: this rank's :class:`las_env.env.LASEnv`
    (``tensor_api=True``) playing its rows of the global action (rank 0's, broadcast), with the
    per-image info all-gathered and the batch means averaged: the keys and shapes of one process's."""

    def __init__(self, env: Any, shard: Shard) -> None:
        if not env.tensor_api:
            raise ValueError("GlobalView needs LASEnv(tensor_api=True).")
        self.env, self.shard = env, shard

    def __getattr__(self, name: str) -> Any:
        return getattr(self.env, name)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self.env.reset(seed=seed, options=options)
        return self.observe()

    def observe(self) -> tuple[Tensor, dict[str, Any]]:
        _, info = self.env.observe()
        x, y = self.env.game.global_batch
        return x, {**info, "labels": y}

    def step(self, action):
        a = self._shared(action)
        _, _, terminated, truncated, info = self.env.step(self.shard.rows(a))
        info = self._global_info(a, info)
        return self.env.game.global_batch[0], self._reward(info), terminated, truncated, info

    def score(self, action) -> tuple[Tensor, dict[str, Any]]:
        a = self._shared(action)
        _, info = self.env.score(self.shard.rows(a))
        info = self._global_info(a, info)
        return self._reward(info), info

    def _shared(self, action) -> Tensor:
        game = self.env.game
        a = torch.as_tensor(action, device=game.device).long().contiguous()
        expected = (game.config.batch_size, len(game.space.nvec))
        if tuple(a.shape) != expected:
            raise ValueError(f"Action has shape {tuple(a.shape)}; expected {expected}: one row per image of the "
                             f"global batch (every rank's), under torchrun as in one process.")
        dist.broadcast(a, src=0)  # rank 0's choice: replicas never act on different actions
        return a

    def _reward(self, info: dict[str, Any]) -> Tensor:
        if info["reward_computed"]:
            return info["rewards"].mean()
        return torch.zeros((), device=self.env.game.device)

    def _global_info(self, action: Tensor, info: dict[str, Any]) -> dict[str, Any]:
        # The step record's per-image values (reward terms included) are gathered, its batch means
        # averaged (equal shards); float64 carries indices, flags and float32 values exactly.
        keys = [k for k in (*PER_IMAGE, *REWARD_TERMS) if k in info]
        local = torch.stack([info[k].double() for k in keys])  # (keys, B / world)
        parts = [torch.empty_like(local) for _ in range(self.shard.world)]
        dist.all_gather(parts, local)
        full = torch.cat(parts, dim=1)
        averaged = [k for k in BATCH_MEANS if k != "adv_accuracy"]  # adv_accuracy: of the gathered flags
        means = torch.stack([info[k].float() for k in averaged])
        dist.all_reduce(means)
        means /= self.shard.world
        out = dict(info)
        for i, k in enumerate(keys):
            out[k] = full[i].to(info[k].dtype)
        for i, k in enumerate(averaged):
            out[k] = means[i]
        out["adv_accuracy"] = out["adv_correct"].float().mean()  # exactly the single process's
        out.update(self.env.game.strategy(action))  # every column of the space, global rows
        out["labels"] = self.env.game.global_batch[1]
        return out


def global_view(env: Any) -> Any:
    """``env`` itself in one process, :class:`GlobalView` of it under DDP."""
    shard = env.game.shard
    return GlobalView(env, shard) if shard.distributed else env


def split_for_eval(x: Tensor, y: Tensor, batch_size: int) -> tuple[Tensor, Tensor, int, Shard | None]:
    """``(x_r, y_r, batch_size_r, shard)``: this rank's share of an evaluation set.

    When every batch splits evenly over the ranks, rank r takes its rows of EACH batch with
    ``shard`` (random starts drawn for the whole batch): exactly one process's numbers. Otherwise a
    contiguous block with its own random starts (robust accuracy within random-start noise)."""
    shard = process_shard()
    if not shard.distributed:
        return x, y, batch_size, None
    n, w, r = x.shape[0], shard.world, shard.rank
    if batch_size % w == 0 and (n % batch_size) % w == 0:
        starts = range(0, n, batch_size)
        blocks = [(s, (min(batch_size, n - s)) // w) for s in starts]
        idx = torch.cat([torch.arange(s + r * m, s + (r + 1) * m) for s, m in blocks]).to(x.device)
        return x[idx], y[idx], batch_size // w, shard
    lo, hi = n * r // w, n * (r + 1) // w
    return x[lo:hi], y[lo:hi], batch_size, None


def robust_accuracy(model: torch.nn.Module, x: Tensor, y: Tensor, eps: float, step: float, iterations: int, *,
                    batch_size: int, seed: int) -> CleanRobust:
    """:func:`evaluation.robust_accuracy` of the whole set, each rank evaluating its share
    (:func:`split_for_eval`) and the counts summed; the plain call in one process."""
    xr, yr, batch, shard = split_for_eval(x, y, batch_size)
    r = evaluation.robust_accuracy(model, xr, yr, eps, step, iterations, batch_size=batch, seed=seed, shard=shard)
    n, m = x.shape[0], xr.shape[0]
    if m == n:
        return r
    counts = torch.tensor([round(r.clean * m), round(r.robust * m)], dtype=torch.float64, device=x.device)
    dist.all_reduce(counts)  # m < n only under DDP
    clean, robust = counts.tolist()
    return r._replace(clean=clean / n, robust=robust / n)


def localized(settings: Any) -> Any:
    """``settings`` with ``device=cuda`` pinned to this process's GPU (``cuda:LOCAL_RANK``) under a launcher."""
    if settings.env.device != "cuda" or launched_world() <= 1:
        return settings
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return replace(settings, env=replace(settings.env, device=device))


def timeout_s(config: dict[str, Any] | None) -> float:
    """``ddp_timeout_s`` of the resolved config, checked."""
    value = (config or {}).get("ddp_timeout_s", DEFAULT_TIMEOUT_S)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"ddp_timeout_s={value!r} must be a number of seconds > 0 (how long a collective waits "
                          f"for a silent rank before the job fails; default {DEFAULT_TIMEOUT_S}).")
    return float(value)


class _Silent:
    """The console of ranks other than 0: rank 0 alone prints and writes log.txt."""

    log_path = None

    def print(self, text: str = "") -> None:
        pass

    def log(self, text: str) -> None:
        pass


def for_this_rank(settings: Any, console: Any) -> tuple[Any, Any]:
    """``(settings, console)`` of this rank: unchanged on rank 0; elsewhere no progress bars, no
    tracker and a silent console."""
    if is_main():
        return settings, console
    logger = replace(settings.logger, name="none")
    return replace(settings, progress=False, logger=logger), _Silent()
