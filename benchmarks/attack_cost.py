"""What the per-image attack costs, measured side by side in one process.

Three attacks on the same CIFAR-shaped batch and the same model:
  ours      per_image_pgd, iterations drawn uniformly from the CIFAR grid (3..14)
  uniform   plain PGD with every image at the mean of those iteration counts
  masked    the authors' loop: every image runs for the batch maximum, updates masked

Prints one JSON line:
  ratio_vs_uniform_mean  ours / uniform-at-mean (goal <= 1.15: we pay for the sum of the
                         chosen iterations and little more)
  speedup_vs_masked_max  masked / ours (goal >= 1.4 on the CIFAR grid)

    python benchmarks/attack_cost.py                         # ResNet-18, batch 128, CPU
    python benchmarks/attack_cost.py --device cuda --repeats 10
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from las_env.attack import masked_pgd, per_image_pgd, random_start
from las_env.datasets.registry import lookup
from las_env.models import build_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18", help="target architecture (default resnet18)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median is reported")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    model = build_model(args.model, 3, 10).to(device).eval()
    b = args.batch_size
    x = torch.rand(b, 3, 32, 32, generator=gen, device=device)
    y = torch.randint(0, 10, (b,), generator=gen, device=device)
    steps, iters_grid, eps_grid = lookup("cifar10").grid.tables(device)
    pick = lambda table: table[torch.randint(0, len(table), (b,), generator=gen, device=device)]  # noqa: E731
    iterations, epsilon, step_size = pick(iters_grid), pick(eps_grid), pick(steps)
    start = random_start(x, epsilon, gen)
    mean_iters = iterations.float().mean().item()
    # A uniform attack at a whole number of steps, rescaled to the exact mean: PGD's cost
    # is linear in its steps, so this is the cost of "the mean iteration count".
    uniform_iters = max(1, round(mean_iters))
    uniform = lambda: per_image_pgd(  # noqa: E731
        model, x, y, epsilon, step_size, torch.full_like(iterations, uniform_iters), start=start
    )
    ours = lambda: per_image_pgd(model, x, y, epsilon, step_size, iterations, start=start)  # noqa: E731
    masked = lambda: masked_pgd(model, x, y, epsilon, step_size, iterations, start=start)  # noqa: E731
    runs = {"uniform": uniform, "ours": ours, "masked": masked}

    def timed(fn) -> float:
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t0

    for fn in runs.values():  # warm-up: allocator, kernels, caches
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for r in range(args.repeats):
        for name in names[r % 3 :] + names[: r % 3]:  # rotate the order so drift hits all alike
            times[name].append(timed(runs[name]))
    med = {k: statistics.median(v) for k, v in times.items()}
    uniform_at_mean = med["uniform"] * mean_iters / uniform_iters
    print(
        json.dumps(
            {
                "benchmark": "attack_cost",
                "model": args.model,
                "batch_size": b,
                "device": str(device),
                "machine": platform.processor() or platform.machine(),
                "torch_threads": torch.get_num_threads(),
                "iterations_sum": int(iterations.sum()),
                "iterations_mean": round(mean_iters, 3),
                "iterations_max": int(iterations.max()),
                "seconds_ours": round(med["ours"], 4),
                "seconds_uniform_at_mean": round(uniform_at_mean, 4),
                "seconds_masked_max": round(med["masked"], 4),
                "ratio_vs_uniform_mean": round(med["ours"] / uniform_at_mean, 3),
                "speedup_vs_masked_max": round(med["masked"] / med["ours"], 3),
                "expected_speedup_from_counts": round(b * int(iterations.max()) / int(iterations.sum()), 3),
                "repeats": args.repeats,
            }
        )
    )


if __name__ == "__main__":
    main()
