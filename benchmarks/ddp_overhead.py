"""What several processes cost per training step: 2 gloo processes vs 1, same global batch, CPU.

Runs the game (``LASEnv`` through ``las_env.global_view.GlobalView``, as the training loop
does under torchrun) for ``--steps`` timed steps after ``--warmup``, once in one process and once
in two (started here with torchrun's environment variables), with the same seeded actions.
In the two-process run it also times, on their own, the collectives one step makes:

  grad_allreduce_s    all-reduce of the target's gradients (DDP; one flat float32 tensor of
                      the target's parameter count: DDP's buckets move the same bytes)
  info_gather_s       all-gather of the per-image info (rewards, L1-L3, correctness: 6 x B/W floats)
  means_allreduce_s   all-reduce of the 3 shard means (clean/probe accuracy, training loss)
  action_broadcast_s  broadcast of rank 0's (B, 3) actions

and, with ``--k`` the reward interval, the BatchNorm statistics all-reduces of ``ddp.sync_batchnorm``
are part of the measured steps (not of the isolated figures). Prints one JSON line:
``step_s`` per world size (median), ``comm_s`` (the sum of the isolated collectives, median each),
``comm_share`` (comm_s / the 2-process step), ``grad_bytes``, ``cores``.

On 2 shared CPU cores the 2-process step cannot be faster: both processes compete for the same
cores, so ``step_s`` only bounds the overhead; ``comm_s`` is the figure to carry to a GPU
machine (where NCCL is far faster than gloo). docs/benchmarks.md has the figures.

    python benchmarks/ddp_overhead.py                          # digits, small_cnn, batch 64
    python benchmarks/ddp_overhead.py --batch-size 128 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from experiments.training.distributed import process_group  # noqa: E402
from las_env.global_view import global_view  # noqa: E402
from las_env.datasets import load_dataset  # noqa: E402
from las_env.env import LASEnv  # noqa: E402
from las_env.game_config import LASConfig  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--k", type=int, default=20, help="reward interval (the probe runs on every k-th step)")
    p.add_argument("--repeats", type=int, default=20, help="repetitions of each isolated collective")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # the JSON file a worker writes
    return p.parse_args(argv)


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    with process_group("cpu") as shard:
        config = LASConfig(dataset="digits", model=args.model, batch_size=args.batch_size,
                           epochs=1, reward_interval=args.k)
        env = global_view(LASEnv(config=config, data=load_dataset("digits"), tensor_api=True))
        env.reset(seed=0)
        g = torch.Generator().manual_seed(0)
        nvec = env.game.space.nvec
        steps = []
        for i in range(args.warmup + args.steps):
            action = torch.stack([torch.randint(0, n, (args.batch_size,), generator=g) for n in nvec], 1)
            t0 = time.perf_counter()
            env.step(action)
            if i >= args.warmup:
                steps.append(time.perf_counter() - t0)
        params = sum(p.numel() for p in env.game.target.parameters())
        out = {"step_s": statistics.median(steps), "params": params, "grad_bytes": params * 4}
        if shard.distributed:
            b = args.batch_size // shard.world
            grads, info = torch.zeros(params), torch.zeros(6, b)
            parts = [torch.empty_like(info) for _ in range(shard.world)]
            means, actions = torch.zeros(3), torch.zeros(args.batch_size, 3, dtype=torch.long)
            out.update(
                grad_allreduce_s=_timed(lambda: dist.all_reduce(grads), args.repeats),
                info_gather_s=_timed(lambda: dist.all_gather(parts, info), args.repeats),
                means_allreduce_s=_timed(lambda: dist.all_reduce(means), args.repeats),
                action_broadcast_s=_timed(lambda: dist.broadcast(actions, 0), args.repeats),
            )
            # A broadcast's source may return before the others have received; without this barrier
            # rank 0 could tear the group down under them (gloo then aborts: "terminate called ...").
            dist.barrier()
        if shard.rank == 0:
            Path(args.worker).write_text(json.dumps(out))


def _launch(world: int, argv: list[str], out: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, __file__, *argv, "--worker", str(out)]
    procs = []
    for r in range(world):
        env = dict(base, OMP_NUM_THREADS="1")
        if world > 1:
            env.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=port)
        procs.append(subprocess.Popen(cmd, env=env))
    if any(p.wait() for p in procs):
        raise SystemExit(f"a {world}-process worker failed (see its output above)")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        one = _launch(1, argv, Path(tmp) / "one.json")
        two = _launch(2, argv, Path(tmp) / "two.json")
    comm = {k: two[k] for k in ("grad_allreduce_s", "info_gather_s", "means_allreduce_s", "action_broadcast_s")}
    comm_s = sum(comm.values())
    print(json.dumps({
        "model": args.model, "batch_size": args.batch_size, "k": args.k, "steps": args.steps,
        "step_s": {"1": one["step_s"], "2": two["step_s"]},
        "step_ratio_2_vs_1": two["step_s"] / one["step_s"],
        "comm": comm, "comm_s": comm_s, "comm_share": comm_s / two["step_s"],
        "params": one["params"], "grad_bytes": one["grad_bytes"], "cores": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
