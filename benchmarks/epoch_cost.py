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
(``experiments/training/loop.py``): ``act -> env.step -> learn``, no per-step host reads.

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
    python benchmarks/epoch_cost.py --probe-fraction 0.25          # the L2/L3 probe on a quarter of each batch
    python benchmarks/epoch_cost.py --precision fp32 bf16 --variants pgdat   # precision speed
    python benchmarks/epoch_cost.py --memory-format nchw channels_last --variants pgdat las --k 20

With several ``--precision`` / ``--memory-format`` values every variant runs in each
combination ("setting", named like ``bf16+channels_last``), all interleaved; variant names get the
setting as a prefix (``bf16/pgdat``), ``setting_speedup`` holds first-setting time / time per
variant, and the main ratios use the first setting.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.epoch_variants import VARIANT_KINDS, Variant, load_data  # noqa: E402
from benchmarks.timing import (  # noqa: E402
    act_cost,
    load_average,
    median,
    retain_freed_memory,
    run_round,
    schedule,
    sync,
    wrapper_cost,
)
from experiments.config.errors import fail  # noqa: E402
from las_env.methods import METHODS  # noqa: E402

GOALS = {"las_k20_vs_pgdat": 1.0, "las_k1_vs_pgdat": 2.0, "env_overhead": 1.03}


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
    p.add_argument("--probe-fraction", type=float, default=1.0,
                   help="reward.probe_fraction of the LAS variants: the share of each batch the L2/L3 probe "
                        "measures (default 1.0, the whole batch)")
    p.add_argument("--no-breakdown", action="store_true", help="skip the strategy-forward and wrapper timings")
    args = p.parse_args(argv)
    if args.batches < 1 or args.batch_size < 1 or args.rounds < 1 or min(args.k) < 1:
        p.error("--batches, --batch-size, --rounds and --k must be >= 1")
    if not 0 < args.probe_fraction <= 1:
        p.error("--probe-fraction must be in (0, 1] (the share of each batch the L2/L3 probe measures)")
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
        fail(f"--batch-size {args.batch_size} exceeds the {data.x_train.shape[0]} training images: give a smaller "
             f"--batch-size, or a data set with more training images (--data).")
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
        "probe_fraction": args.probe_fraction,
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
