"""One run across several processes (``torchrun``, docs/distributed.md): the process group, sharded
evaluation, rank 0's privileges (the run lock, every file, the final evaluation), a clear failure when a
rank dies. The game's side (shards, the agent's global view) is ``las_env``'s."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

import evaluation
from evaluation import CleanRobust
from experiments.config.errors import ConfigError
from experiments.config.schema import RunConfig
from las_env.sharding import Shard, process_shard

EXIT_RANK_LOST = 3


class RankLost(RuntimeError):
    """A collective failed: another rank died, or stayed silent longer than the timeout."""


def launched_world() -> int:
    """Processes of this job as ``torchrun`` (or any ``env://`` launcher) announced them."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextmanager
def process_group(device: str, timeout_s: float = RunConfig.ddp_timeout_s) -> Iterator[Shard]:
    """The job's process group under ``torchrun`` (NCCL on CUDA, gloo on CPU); a lost rank raises :class:`RankLost`."""
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
        # Reference cycles can keep the group's gloo objects alive past it; destroyed at interpreter exit they
        # abort the process ("terminate called without an active exception", exit -6: 1 two-rank run in 4 here).
        gc.collect()


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


def check_agent(agent: Any, shard: Shard) -> None:
    """Agents whose learning is not replicated exactly (Stable-Baselines3's) are refused under DDP."""
    if shard.distributed and type(agent).__module__.startswith("agents.sb3"):
        raise ConfigError(
            f"agent {type(agent).__name__} (Stable-Baselines3) does not run under torchrun: its rollout buffer "
            f"and optimiser are not replicated exactly across ranks. Use agent=reinforce (or fixed/random) with "
            f"several processes, or run this agent in one process (python experiments/run.py ...)."
        )


def robust_accuracy(model: torch.nn.Module, x: Tensor, y: Tensor, eps: float, step: float, iterations: int, *,
                    batch_size: int, seed: int, early_stop: bool = False) -> CleanRobust:
    """:func:`evaluation.robust_accuracy` of the whole set, each rank evaluating its share, counts summed: this
    rank's rows of EACH batch when every batch splits evenly (random starts drawn for the whole batch: exactly one
    process's numbers), else a contiguous block with its own random starts (within random-start noise)."""
    shard = process_shard()
    n, w, r = x.shape[0], shard.world, shard.rank
    rows, batch, even = slice(None), batch_size, None
    if shard.distributed and batch_size % w == 0 and (n % batch_size) % w == 0:
        blocks = [(s, (min(batch_size, n - s)) // w) for s in range(0, n, batch_size)]
        rows = torch.cat([torch.arange(s + r * m, s + (r + 1) * m) for s, m in blocks]).to(x.device)
        batch, even = batch_size // w, shard
    elif shard.distributed:
        rows = slice(n * r // w, n * (r + 1) // w)
    xr, yr = x[rows], y[rows]
    result = evaluation.robust_accuracy(model, xr, yr, eps, step, iterations, batch_size=batch, seed=seed,
                                        shard=even, early_stop=early_stop)
    m = xr.shape[0]
    if m == n:
        return result
    counts = torch.tensor([round(result.clean * m), round(result.robust * m)], dtype=torch.float64, device=x.device)
    dist.all_reduce(counts)  # m < n only under DDP
    clean, robust = counts.tolist()
    return result._replace(clean=clean / n, robust=robust / n)


def timeout_s(config: dict[str, Any] | None) -> float:
    """``ddp_timeout_s`` of the resolved config, checked."""
    value = (config or {}).get("ddp_timeout_s", RunConfig.ddp_timeout_s)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"ddp_timeout_s={value!r} must be a number of seconds > 0 (how long a collective waits "
                          f"for a silent rank before the job fails; default {RunConfig.ddp_timeout_s:g}).")
    return float(value)

