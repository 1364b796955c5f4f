"""Smoke tests of the benchmarks: they run at a tiny size and print the JSON line they promise.

Their ``main()`` runs in this process (a Python and torch start-up less each); the process-wide
settings they make (threads, denormals flushed) are put back after each test. No timing goal is
asserted here (timings belong to docs/benchmarks.md, not to unit tests).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tests.conftest import load_script

REPO = Path(__file__).resolve().parents[1]
TINY = ["--data", "digits", "--batch-size", "8", "--batches", "2", "--rounds", "1", "--warmup", "1"]


@pytest.fixture(autouse=True)
def _process_settings_back():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)


def run_script(name: str, *args: str, capsys: pytest.CaptureFixture) -> dict:
    """``benchmarks/<name>.py ARGS``'s main() here; what it prints must be one JSON line."""
    load_script(REPO / "benchmarks" / f"{name}.py").main(list(args))
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, f"expected one JSON line on stdout, got: {lines!r}"
    return json.loads(lines[0])


def run_benchmark(*args: str, capsys: pytest.CaptureFixture) -> dict:
    return run_script("epoch_cost", *TINY, *args, capsys=capsys)


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_epoch_cost_prints_the_ratios_and_per_variant_times(capsys):
    out = run_benchmark(capsys=capsys)
    for key in ("las_k20_vs_pgdat", "las_k1_vs_pgdat", "env_overhead"):
        assert positive(out[key]), key
    variants = ("pgdat", "las_k20", "game_k20", "las_k1")
    for table in ("seconds", "cpu_seconds", "images_per_second", "iterations_mean"):
        assert set(out[table]) == set(variants), table
        assert all(positive(v) for v in out[table].values()), table
    # Same seed, same agent: the env and the bare game played exactly the same attacks.
    assert out["iterations_mean"]["las_k20"] == out["iterations_mean"]["game_k20"]
    assert out["iterations_mean"]["pgdat"] == 5.0  # PGD-5, the digits PGD-AT attack
    assert positive(out["breakdown"]["strategy_act_s"]) and positive(out["breakdown"]["env_wrapper_s"])
    assert set(out["goals"]) == {"las_k20_vs_pgdat <= 1.0", "las_k1_vs_pgdat <= 2.0", "env_overhead <= 1.03"}


def test_epoch_cost_compares_precisions_on_cpu(capsys):
    out = run_benchmark("--variants", "pgdat", "--precision", "fp32", "bf16", "--no-breakdown", capsys=capsys)
    assert set(out["seconds"]) == {"fp32/pgdat", "bf16/pgdat"}
    assert positive(out["setting_speedup"]["bf16_vs_fp32/pgdat"])


@pytest.mark.parametrize("method", ["trades", "awp"])
def test_epoch_cost_compares_las_x_with_x(method, capsys):
    out = run_benchmark("--method", method, "--variants", "pgdat", "las", "--no-breakdown", capsys=capsys)
    assert out["method"] == method
    assert positive(out["las_k20_vs_pgdat"]) and positive(out["las_k1_vs_pgdat"])
    assert out["iterations_mean"]["pgdat"] == 5.0  # the baseline X keeps the fixed PGD-5 attack


def test_method_cost_compares_each_method_with_pgd_at(capsys):
    out = run_script("method_cost", "--batch-size", "8", "--batches", "2", "--rounds", "1", "--methods", "trades",
                     capsys=capsys)
    assert set(out["seconds_median"]) == {"pgd_at", "las_pgd_at", "trades", "las_trades"}  # PGD-AT added as reference
    assert positive(out["ratios"]["trades_vs_pgd_at"]) and positive(out["ratios"]["las_trades_vs_las_pgd_at"])
    assert out["iterations_mean"]["trades"] == out["iterations_mean"]["pgd_at"] == 5.0  # same fixed attack
