"""What an epoch of TRADES and AWP costs against one of PGD-AT, measured side by side in one process.

For each training method (``--methods``, default pgd_at trades awp) it builds the baseline (the
fixed agent: PGD-AT, TRADES with beta 6, AT-AWP) and the LAS variant (the REINFORCE agent
learning every ``--k`` steps: LAS-AT, LAS-TRADES with a ``trades_beta`` column over 5..9, LAS-AWP)
on the same data, target initialisation and batches, then times them interleaved step by step
(``benchmarks/timing.py``, the same machinery as ``epoch_cost.py``), so the machine's load hits
every variant alike. Medians over ``--rounds`` are reported as ratios to PGD-AT's:

  <method>_vs_pgd_at          fixed-attack <method> / PGD-AT
  las_<method>_vs_las_pgd_at  LAS-<method> / LAS-AT (the learned strategy's iterations differ
                              between methods, so ``iterations_mean`` is printed with them)

Default size: the digits demo's epoch (batch 64, 18 batches, small CNN, k = 5), about a minute
and a half on 2 CPU cores. Prints one JSON line.

    python benchmarks/method_cost.py
    python benchmarks/method_cost.py --data cifar10-random --batch-size 32 --batches 20 --k 20
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import epoch_cost  # noqa: E402
from benchmarks.epoch_variants import Variant, load_data  # noqa: E402
from benchmarks.timing import median, run_round, schedule, sync  # noqa: E402
from las_env.methods import METHODS  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["pgd_at", "trades", "awp"], choices=list(METHODS))
    p.add_argument("--data", default="digits", help="digits (default), cifar10-random, or a data set name")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=18, help="timed steps per round (the digits demo's epoch)")
    p.add_argument("--k", type=int, default=5, help="the LAS variants' update interval (the demo's 5)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if "pgd_at" not in args.methods:
        args.methods = ["pgd_at", *args.methods]  # the reference of every ratio
    return args


def _variant_args(args: argparse.Namespace, method: str) -> argparse.Namespace:
    """epoch_cost's settings (model, warm-up, device...) for one method."""
    base = epoch_cost.parse_args(["--data", args.data, "--batch-size", str(args.batch_size),
                                  "--batches", str(args.batches), "--seed", str(args.seed), "--method", method])
    base.strategy_backbone = base.strategy_backbone or base.model
    return base


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as epoch_cost: denormal-heavy steps would time chance, not the method
    dataset, data = load_data(_variant_args(args, "pgd_at"))
    variants: dict[str, Variant] = {}
    for method in args.methods:
        vargs = _variant_args(args, method)
        variants[method] = Variant("pgdat", None, "fp32", False, vargs, dataset, data)
        variants[f"las_{method}"] = Variant("las", args.k, "fp32", False, vargs, dataset, data)
    for v in variants.values():  # warm-up: allocator, kernels, every code path
        v.start()
        for _ in range(2):
            v.step()
    device = torch.device("cpu")
    sync(device)
    names = list(variants)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    iters: dict[str, float] = {}
    for r in range(args.rounds):
        for name, (wall, _cpu, it) in run_round(variants, schedule(names, r), args.batches, device, "step", r).items():
            seconds[name].append(wall)
            iters[name] = it
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {seconds[n][-1]:.2f}s" for n in names),
              file=sys.stderr, flush=True)
    med = {n: median(s) for n, s in seconds.items()}
    ratios = {}
    for method in args.methods:
        if method != "pgd_at":
            ratios[f"{method}_vs_pgd_at"] = round(med[method] / med["pgd_at"], 3)
            ratios[f"las_{method}_vs_las_pgd_at"] = round(med[f"las_{method}"] / med["las_pgd_at"], 3)
    out = {
        "benchmark": "method_cost",
        "data": data.description,
        "batch_size": args.batch_size,
        "batches": args.batches,
        "k": args.k,
        "rounds": args.rounds,
        "seconds_median": {n: round(s, 3) for n, s in med.items()},
        "iterations_mean": {n: round(float(i), 2) for n, i in iters.items()},
        "ratios": ratios,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
