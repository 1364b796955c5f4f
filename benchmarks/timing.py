"""Timing for benchmarks/epoch_cost.py: interleaved rounds, medians, the wrapper's and the strategy
network's own per-step costs, and the process settings that make CPU timings steady."""

from __future__ import annotations

import ctypes
import os
import statistics
import time

import torch

from benchmarks.epoch_variants import Variant


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
