"""What a LAS-AT epoch costs against a PGD-AT epoch, measured side by side in one process.

On the same data, the same target initialisation and the same batches, it times one "epoch"
(``--batches`` training steps) of:

  pgdat      PGD-AT: the fixed agent (PGD-10 on CIFAR, PGD-5 on digits) through LASEnv
  las_k20    LAS-AT: the REINFORCE agent through LASEnv(tensor_api=True), learning every 20 steps

With ``--method trades`` or ``--method awp`` every variant trains by that method instead
(``pgdat`` is then the TRADES / AT-AWP baseline, beta 6 for TRADES, and the LAS variants are
LAS-TRADES, with the 4th ``trades_beta`` head over 5..9, or LAS-AWP).
  las_k1     the same, learning (and paying for the L2/L3 probe) on every step
  game_k20   the las_k20 step driven on LASGame directly, without the Gymnasium wrapper

Every timed run starts from the same state: ``reset(seed)`` of the env/game (same target,
data order, augmentation) and the agent's initial state restored, so each variant trains
exactly the same thing in every round. After a warm-up, ``--rounds`` rounds; in each, by
default (``--interleave step``), the variants advance one step at a time in turn (the order
rotating every step) and every step is timed on its own, so a change of the machine's load hits
all variants alike; ``--interleave epoch`` times each variant's epoch in one piece instead.
Medians over rounds are reported. The loop is the training loop's hot loop
(``experiments/loop.py``): ``act -> env.step -> learn``, no per-step host reads.

Default size (about 3 minutes on 2 shared CPU cores): random CIFAR-10-shaped tensors with the
CIFAR-10 grid and threat model (PGD-AT = PGD-10; LAS iterations 3..14), small_cnn target and
strategy network, batch 32, 20 batches (one learning step at k=20), 1 CPU thread, glibc told to
keep freed memory (``--malloc retain``; see ``retain_freed_memory``), denormals flushed to zero
(``--denormals flush``: a denormal-heavy backward pass runs several times slower on a CPU, and
which variant's model produces one at which step is chance). docs/benchmarks.md has the figures
and why this size.

Prints one JSON line. The ratios:
  las_k20_vs_pgdat   median las_k20 / median pgdat        (goal <= 1.0)
  las_k1_vs_pgdat    median las_k1  / median pgdat        (goal <= 2.0)
  env_overhead       median over rounds of las_kK / game_kK, K the first --k (goal <= 1.03)
                     (paired: the two ran side by side in each round)
and, to explain them: the mean chosen iteration count of each variant (``iterations_mean``),
``attack_iterations_ratio`` (LAS iterations / PGD-AT iterations, the attack's share of the
saving), the strategy network's forward cost per step (``strategy_act_s``), and the wrapper's
own cost per step measured in isolation (``env_wrapper_s``, ``env_overhead_from_wrapper``).

    python benchmarks/epoch_cost.py                                  # default size, CPU
    python benchmarks/epoch_cost.py --data digits --batch-size 64 --batches 40   # the digits demo
    python benchmarks/epoch_cost.py --data cifar10 --data-root data --model resnet18 \\
        --batch-size 128 --batches 40 --device cuda --precision bf16 --channels-last
    python benchmarks/epoch_cost.py --precision fp32 bf16 --variants pgdat   # precision speed
    python benchmarks/epoch_cost.py --memory-format nchw channels_last --variants pgdat las --k 20

With several ``--precision`` / ``--memory-format`` values every variant runs in each
combination ("setting", named like ``bf16+channels_last``), all interleaved; variant names get the
setting as a prefix (``bf16/pgdat``), ``setting_speedup`` holds first-setting time / time per
variant, and the main ratios use the first setting.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import replace
from typing import Any

import torch

from agents.base import AgentSpec
from agents.baselines import FixedAgent
from agents.reinforce import ReinforceAgent
from las_env.data import ImageData, load_dataset
from las_env.env import LASEnv
from las_env.game import LASConfig, LASGame
from las_env.grids import StrategyGrid, grid_for
from las_env.methods import METHODS, MethodConfig
from las_env.target import OptimConfig

VARIANT_KINDS = ("pgdat", "las", "game")
GOALS = {"las_k20_vs_pgdat": 1.0, "las_k1_vs_pgdat": 2.0, "env_overhead": 1.03}


# ----------------------------------------------------------------------------- data


def random_cifar(n_train: int, n_test: int, seed: int) -> ImageData:
    """CIFAR-10-shaped random images (3x32x32 in [0, 1], 10 classes): timing needs no files."""
    g = torch.Generator().manual_seed(seed)
    return ImageData(
        name="cifar10",
        x_train=torch.rand(n_train, 3, 32, 32, generator=g),
        y_train=torch.randint(0, 10, (n_train,), generator=g),
        x_test=torch.rand(n_test, 3, 32, 32, generator=g),
        y_test=torch.randint(0, 10, (n_test,), generator=g),
        num_classes=10,
        class_names=[str(i) for i in range(10)],
        description=f"random CIFAR-10-shaped tensors ({n_train} train images)",
    )


def load_data(args: argparse.Namespace) -> tuple[str, ImageData]:
    """``(dataset name for the grid / threat model, data)``."""
    if args.data == "cifar10-random":
        return "cifar10", random_cifar(args.batch_size * args.batches, 16, args.seed)
    try:
        return args.data, load_dataset(args.data, args.data_root, download=False)
    except FileNotFoundError as exc:
        sys.exit(
            f"{exc}\nFor CIFAR-10 offline: python ../shared/data/prepare_cifar.py --help writes the "
            f"'python version' folder; or time on random tensors of CIFAR shape: --data cifar10-random."
        )


# ----------------------------------------------------------------------------- variants


def make_spec(dataset: str, data: ImageData, cfg: LASConfig, total_steps: int, steps_per_epoch: int,
              seed: int) -> AgentSpec:
    return AgentSpec(
        grid=cfg.grid,
        observation_shape=(cfg.batch_size, data.channels, data.height, data.width),
        num_classes=data.num_classes,
        dataset=dataset,
        device=torch.device(cfg.device),
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        seed=seed,
    )


def method_grid(dataset: str, method: str, *, learns: bool) -> StrategyGrid:
    """The data set's grid; a learning agent of TRADES also picks beta (the authors' 5..9)."""
    grid = grid_for(dataset)
    return replace(grid, extra=(("trades_beta", (5, 6, 7, 8, 9)),)) if method == "trades" and learns else grid


class Variant:
    """One timed configuration: ``start()`` puts it back to the same initial state (target,
    data order, agent), ``step()`` plays one training step and returns its iteration counts.

    ``kind``: "pgdat" (FixedAgent through LASEnv), "las" (ReinforceAgent through LASEnv) or
    "game" (ReinforceAgent on LASGame, no Gymnasium wrapper).
    """

    def __init__(self, kind: str, k: int | None, precision: str, channels_last: bool, args: argparse.Namespace,
                 dataset: str, data: ImageData) -> None:
        self.kind, self.seed = kind, args.seed
        n_train = data.x_train.shape[0]
        per_epoch = min(n_train // args.batch_size, args.batches)
        epochs = math.ceil(max(args.batches, args.warmup) / per_epoch)
        cfg = LASConfig(
            dataset=dataset,
            model=args.model,
            batch_size=args.batch_size,
            epochs=epochs,
            max_steps_per_epoch=per_epoch,
            optim=OptimConfig(lr=0.05 if dataset == "digits" else 0.1, schedule="constant"),
            method=MethodConfig(name=args.method),
            grid=method_grid(dataset, args.method, learns=kind != "pgdat"),
            device=args.device,
            precision=precision,
            channels_last=channels_last,
        )
        spec = make_spec(dataset, data, cfg, per_epoch * epochs, per_epoch, args.seed)
        if kind == "pgdat":
            self.agent: Any = FixedAgent(spec)
        else:
            self.agent = ReinforceAgent(spec, k=k, backbone=args.strategy_backbone, seed=args.seed)
            if channels_last:
                self.agent.net.to(memory_format=torch.channels_last)
        cfg = replace(cfg, reward_interval=self.agent.reward_interval)
        self.initial = copy.deepcopy(self.agent.state_dict())
        if kind == "game":
            self.game = LASGame(cfg, data)
        else:
            self.env = LASEnv(config=cfg, data=data, tensor_api=True)
            self.game = self.env.game

    def start(self) -> None:
        if self.kind == "game":
            self.game.reset(self.seed)
        else:
            self.obs, self.info = self.env.reset(seed=self.seed)
        self.agent.load_state_dict(copy.deepcopy(self.initial))

    def step(self) -> torch.Tensor:
        agent = self.agent
        if self.kind == "game":  # what LASEnv.step does, minus validation and the info dict
            outcome = self.game.play(agent.act(self.game.batch[0], {"reward_next_step": self.game.is_reward_step()}))
            agent.learn(outcome.reward, {"reward_computed": outcome.reward_computed, "rewards": outcome.terms.total})
            return outcome.iterations
        action = agent.act(self.obs, self.info)  # the training loop's hot loop (experiments/loop.py)
        self.obs, reward, _, _, self.info = self.env.step(action)
        agent.learn(reward, self.info)
        return self.info["iterations"]


# ----------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_round(variants: dict[str, Variant], order: list[str], n: int, device: torch.device,
              interleave: str, r: int) -> dict[str, tuple[float, float, float]]:
    """One timed round: ``name -> (wall s, cpu s, mean iterations)`` of ``n`` steps from a fresh start.

    ``interleave="step"``: the variants advance one step at a time in turn (the order rotating
    every step) and each step is timed on its own, so a change in the machine's load during the
    round hits every variant alike. ``"epoch"``: each variant plays its ``n`` steps in one
    go, timed as a whole (no synchronisation between steps).
    """
    wall = dict.fromkeys(order, 0.0)
    cpu = dict.fromkeys(order, 0.0)
    iterations: dict[str, list[torch.Tensor]] = {name: [] for name in order}
    if interleave == "step":
        for v in variants.values():
            v.start()
        for i in range(n):
            s = (i + r) % len(order)
            for name in order[s:] + order[:s]:
                sync(device)
                c0, t0 = time.process_time(), time.perf_counter()
                iterations[name].append(variants[name].step())
                sync(device)
                wall[name] += time.perf_counter() - t0
                cpu[name] += time.process_time() - c0
    else:
        for name in order:
            v = variants[name]
            v.start()
            sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            iterations[name] = [v.step() for _ in range(n)]
            sync(device)
            wall[name], cpu[name] = time.perf_counter() - t0, time.process_time() - c0
    return {name: (wall[name], cpu[name], float(torch.stack(iterations[name]).float().mean())) for name in order}


def schedule(names: list[str], r: int) -> list[str]:
    """Round ``r``'s order: rotated by ``r``, with each las_kK immediately next to game_kK
    (alternating which goes first), so their ratio compares neighbours in time."""
    units: list[list[str]] = []
    for name in names:
        if name.split("/")[-1].startswith("game_"):
            continue
        unit = [name]
        twin = name.replace("las_", "game_", 1)
        if name.split("/")[-1].startswith("las_") and twin in names:
            unit = [name, twin] if r % 2 == 0 else [twin, name]
        units.append(unit)
    s = r % len(units)
    return [n for unit in units[s:] + units[:s] for n in unit]


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def wrapper_cost(v: Variant, device: torch.device, repeats: int = 50) -> float:
    """Seconds per step of LASEnv's own work around ``LASGame.play`` (action validation,
    info dict, observation), timed in isolation on a real step's outcome."""
    env, agent = v.env, v.agent
    obs, info = env.reset(seed=v.seed)
    action = agent.act(obs, info)
    outcome = env.game.play(env._validate(action))  # noqa: SLF001
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        env._validate(action)  # noqa: SLF001
        env._step_info(outcome)  # noqa: SLF001
        env._observation()  # noqa: SLF001
        sync(device)
        times.append(time.perf_counter() - t0)
    return median(times)


def act_cost(v: Variant, device: torch.device, repeats: int = 5) -> float:
    """Seconds per step of the strategy network's sampling on a non-learning step."""
    obs, _ = v.env.reset(seed=v.seed)
    info = {"reward_next_step": False}
    v.agent.act(obs, info)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        v.agent.act(obs, info)
        sync(device)
        times.append(time.perf_counter() - t0)
    return median(times)


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory in the process (``mallopt``): no ``mmap`` for large blocks,
    no trimming of the heap. PyTorch has no caching allocator on the CPU, so by default every
    large activation of every step is a fresh ``mmap`` (or heap growth after a trim) whose pages
    the kernel must fault in and zero again: measured here, up to ~25% of a LAS-AT step in system
    time, erratically (glibc adapts its thresholds as it goes), and more for variants that keep
    more memory alive (the k=1 strategy graph across the attack and probe). Retaining freed
    memory is the CPU analogue of CUDA's caching allocator. Same as running under
    ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647``.
    Returns False (and changes nothing) where glibc's ``mallopt`` is not available."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="cifar10-random",
                   help="cifar10-random (default: random CIFAR-10-shaped tensors, CIFAR-10 grid and threat "
                        "model, no files), digits (the offline demo), or a data set of "
                        "las_env.data.load_dataset read from --data-root (cifar10, cifar100, ...)")
    p.add_argument("--data-root", default="data")
    p.add_argument("--model", default="small_cnn", help="target architecture (default small_cnn; resnet18 for "
                                                        "the paper's setting)")
    p.add_argument("--strategy-backbone", default=None,
                   help="REINFORCE strategy backbone; default: the target's architecture (the authors' "
                        "ResNet-18 strategy for a ResNet-18 target)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=20,
                   help="training steps per timed epoch (default 20: exactly one learning step at k=20)")
    p.add_argument("--k", type=int, nargs="+", default=[20, 1],
                   help="REINFORCE update intervals to time (default 20 1); env overhead at the first")
    p.add_argument("--variants", nargs="+", default=list(VARIANT_KINDS), choices=VARIANT_KINDS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--memory-format", nargs="+", default=["nchw"], choices=["nchw", "channels_last"],
                   help="target (and strategy) network memory format(s)")
    p.add_argument("--channels-last", action="store_true", help="same as --memory-format channels_last")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds; medians are reported")
    p.add_argument("--interleave", choices=["step", "epoch"], default="step",
                   help="step (default): variants advance one step at a time in turn, each step timed; "
                        "epoch: each variant's epoch timed in one piece")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before the rounds")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1; 0 = torch's default). On a shared machine more "
                        "threads stall whenever another job holds a core")
    p.add_argument("--malloc", choices=["retain", "default"], default="retain",
                   help="CPU only. retain (default): glibc keeps freed memory (see retain_freed_memory); "
                        "default: glibc's own behaviour (page faults on fresh large blocks every step)")
    p.add_argument("--denormals", choices=["flush", "keep"], default="flush",
                   help="CPU only. flush (default): torch.set_flush_denormal(True), so that tiny gradients "
                        "(~1e-38 and below, e.g. from a saturated softmax) do not take the CPU's slow "
                        "denormal path; keep: IEEE denormals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", choices=list(METHODS), default="pgd_at",
                   help="training method of every variant: LAS-X vs X (default pgd_at: LAS-AT vs PGD-AT)")
    p.add_argument("--no-breakdown", action="store_true", help="skip the strategy-forward and wrapper timings")
    args = p.parse_args(argv)
    if args.batches < 1 or args.batch_size < 1 or args.rounds < 1 or min(args.k) < 1:
        p.error("--batches, --batch-size, --rounds and --k must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads > 0 and device.type == "cpu":
        torch.set_num_threads(args.threads)
    malloc = "default"
    denormals = "keep"
    if args.denormals == "flush" and device.type == "cpu" and torch.set_flush_denormal(True):
        denormals = "flush"
    if args.malloc == "retain" and device.type == "cpu" and retain_freed_memory():
        malloc = "retain"
    dataset, data = load_data(args)
    args.strategy_backbone = args.strategy_backbone or args.model
    if data.x_train.shape[0] < args.batch_size:
        sys.exit(f"--batch-size {args.batch_size} exceeds the {data.x_train.shape[0]} training images.")
    data = data.to(device)  # once, shared by every variant
    load_start = load_average()
    t_start = time.perf_counter()

    if args.channels_last:
        args.memory_format = ["channels_last"]
    settings = [(p, f) for p in args.precision for f in args.memory_format]
    setting_names = [p if f == "nchw" else f"{p}+{f}" for p, f in settings]
    variants: dict[str, Variant] = {}
    for (precision, fmt), setting in zip(settings, setting_names):
        prefix = "" if len(settings) == 1 else f"{setting}/"
        cl = fmt == "channels_last"
        if "pgdat" in args.variants:
            variants[prefix + "pgdat"] = Variant("pgdat", None, precision, cl, args, dataset, data)
        for i, k in enumerate(args.k):
            if "las" in args.variants:
                variants[f"{prefix}las_k{k}"] = Variant("las", k, precision, cl, args, dataset, data)
            if "game" in args.variants and i == 0:
                variants[f"{prefix}game_k{k}"] = Variant("game", k, precision, cl, args, dataset, data)

    for v in variants.values():  # warm-up: allocator, kernels, autograd, every code path
        v.start()
        for _ in range(args.warmup):
            v.step()
    sync(device)

    names = list(variants)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    cpu_seconds: dict[str, list[float]] = {n: [] for n in names}
    iters: dict[str, float] = {}
    for r in range(args.rounds):
        for name, (wall, cpu, it) in run_round(variants, schedule(names, r), args.batches, device,
                                               args.interleave, r).items():
            seconds[name].append(wall)
            cpu_seconds[name].append(cpu)
            iters[name] = it  # the same in every round (same seeds)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {seconds[n][-1]:.2f}s" for n in names),
              file=sys.stderr, flush=True)
    med = {n: median(v) for n, v in seconds.items()}
    med_cpu = {n: median(v) for n, v in cpu_seconds.items()}

    main_prefix = "" if len(settings) == 1 else f"{setting_names[0]}/"
    out: dict[str, Any] = {
        "benchmark": "epoch_cost",
        "data": data.description,
        "dataset": dataset,
        "model": args.model,
        "method": args.method,
        "strategy_backbone": args.strategy_backbone,
        "batch_size": args.batch_size,
        "batches": args.batches,
        "ks": args.k,
        "device": str(device),
        "settings": setting_names,
        "interleave": args.interleave,
        "malloc": malloc,
        "denormals": denormals,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "rounds": args.rounds,
        "seconds": {n: round(v, 4) for n, v in med.items()},
        "seconds_all": {n: [round(x, 3) for x in v] for n, v in seconds.items()},
        "cpu_seconds": {n: round(v, 4) for n, v in med_cpu.items()},
        "images_per_second": {n: round(args.batches * args.batch_size / v, 1) for n, v in med.items()},
        "iterations_mean": {n: round(v, 3) for n, v in iters.items()},
    }
    by_cpu: dict[str, float] = {}
    pgd = main_prefix + "pgdat"
    if pgd in med:
        for k in args.k:
            las = f"{main_prefix}las_k{k}"
            if las in med:
                out[f"las_k{k}_vs_pgdat"] = round(med[las] / med[pgd], 3)
                by_cpu[f"las_k{k}_vs_pgdat"] = round(med_cpu[las] / med_cpu[pgd], 3)
                out.setdefault("attack_iterations_ratio", {})[f"las_k{k}"] = round(iters[las] / iters[pgd], 3)
    las, game = f"{main_prefix}las_k{args.k[0]}", f"{main_prefix}game_k{args.k[0]}"
    if las in med and game in med:
        # Paired: the two ran side by side (step interleaving: alternate steps) in every round.
        out["env_overhead"] = round(median([a / b for a, b in zip(seconds[las], seconds[game])]), 4)
        by_cpu["env_overhead"] = round(median([a / b for a, b in zip(cpu_seconds[las], cpu_seconds[game])]), 4)
    out["ratios_by_cpu_time"] = by_cpu
    if len(settings) > 1:
        base = setting_names[0]
        out["setting_speedup"] = {
            f"{n.split('/', 1)[0]}_vs_{base}/{n.split('/', 1)[1]}": round(med[f"{base}/{n.split('/', 1)[1]}"] / med[n], 3)
            for n in names if not n.startswith(f"{base}/")
        }
    if not args.no_breakdown and las in variants and hasattr(variants[las], "env"):
        wrap = wrapper_cost(variants[las], device)
        game_step = med[game] / args.batches if game in med else med[las] / args.batches
        out["breakdown"] = {
            "step_s": {n: round(m / args.batches, 5) for n, m in med.items()},
            "strategy_act_s": round(act_cost(variants[las], device), 5),
            "env_wrapper_s": round(wrap, 6),
            "env_overhead_from_wrapper": round(1 + wrap / game_step, 5),
        }
    out["goals"] = {f"{key} <= {limit}": out[key] <= limit for key, limit in GOALS.items() if key in out}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["process"] = {"user_s": round(usage.ru_utime, 1), "system_s": round(usage.ru_stime, 1),
                      "minor_page_faults": usage.ru_minflt}
    out["load_average"] = {"start": load_start, "end": load_average()}
    out["total_seconds"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
