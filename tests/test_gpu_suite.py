"""benchmarks/gpu_suite.py: its toy run on a CPU writes every section; a slow part is cut and the
rest still runs; its parsers; and (in the toy run) a dry run of the CUDA tests on the CPU, so none
of it can rot on machines without a GPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_suite.py"


def load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


suite = load_suite()


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


@pytest.mark.slow
def test_tiny_run_on_cpu_writes_every_section(tmp_path):
    out = tmp_path / "tiny.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(out),
                           "--data-dir", str(tmp_path / "data")],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["format"] == "las-at/gpu-suite/v1" and report["mode"] == "tiny"
    assert report["machine"]["torch"] == torch.__version__ and report["machine"]["device_name"]
    parts = report["parts"]
    assert set(parts) == {"cuda_tests", "speed_main", "speed_wide", "speed_attack", "smoke"}
    for name, p in parts.items():
        assert p["status"] in ("ok", "skipped"), (name, p)
        assert p["seconds"] >= 0 and positive(p["budget_s"]) and p["command"]

    # tests/test_cuda.py's code, dry-run on the CPU (LAS_AT_CUDA_TEST_DEVICE=cpu): it must pass here
    # so that on a GPU only the GPU can make it fail.
    cuda = report["cuda_tests"]
    assert parts["cuda_tests"]["status"] == "ok"
    assert cuda["counts"] == {"passed": len(cuda["tests"])} and len(cuda["tests"]) >= 10

    for key in ("main", "wide"):
        sec = report["speed"][key]
        variants = {(r["setting"], r["variant"]) for r in sec["rows"]}
        settings = {"fp32", "fp32+channels_last", "bf16", "bf16+channels_last"} if key == "main" else {"bf16"}
        assert variants == {(s, v) for s in settings for v in ("pgdat", "las_k20", "las_k1")}
        for r in sec["rows"]:
            assert positive(r["step_s"]) and positive(r["images_per_s"]) and positive(r["epoch_50k_s"])
            # The projection is the measured rate applied to 50,000 images (rounding aside).
            assert abs(r["epoch_50k_s"] - 50_000 / r["images_per_s"]) <= 0.01 * r["epoch_50k_s"] + 0.1
        assert set(sec["ratios"]) == {f"{s}/{v}_vs_pgdat" for s in settings for v in ("las_k20", "las_k1")}
    assert positive(report["speed"]["attack"]["ratio_vs_uniform_mean"])

    smoke = report["smoke"]
    assert smoke["preset"] == "cifar10_resnet18_lasat_k20" and [h["epoch"] for h in smoke["history"]] == [1, 2]
    assert {r["name"] for r in smoke["final"]} == {"clean", "pgd10"}
    for r in smoke["final"]:
        assert 0 <= r["accuracy"] <= 1 and r["n_images"] == 16 and r["correct"] == round(r["accuracy"] * 16)
    if (suite.SHARED_DATA / "prepare_cifar.py").is_file():  # prepared into --data-dir from ../shared/data
        assert "CIFAR-10" in smoke["data"] and "cifar10-exact-subset" in smoke["data_source"]
    else:
        assert smoke["data_source"].startswith("digits")
    assert "speed/main" in proc.stdout and "final, first 16 test images" in proc.stdout


def test_a_part_over_budget_is_cut_and_the_next_one_still_runs(monkeypatch):
    monkeypatch.setattr(suite, "MIN_START_S", 1.0)
    env = suite.child_env(tiny_cpu=True)
    slow = suite.Part("slow", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], 3)
    t0 = time.monotonic()
    suite.run(slow, time.monotonic() + 100, env)
    assert slow.status == "cut" and "killed" in slow.reason and time.monotonic() - t0 < 20
    assert "started" in slow.stdout  # what it printed before the cut is kept
    fast = suite.run(suite.Part("fast", [sys.executable, "-c", "print('{\"x\": 1}')"], 30), time.monotonic() + 100, env)
    assert fast.status == "ok" and suite.last_json_line(fast.stdout) == {"x": 1}
    late = suite.run(suite.Part("late", [sys.executable, "-c", "pass"], 30), time.monotonic() + 0.5, env)
    assert late.status == "cut" and late.reason.startswith("not started")
    failing = suite.run(suite.Part("bad", [sys.executable, "-c", "raise SystemExit(3)"], 30), time.monotonic() + 100, env)
    assert failing.status == "failed" and failing.record()["returncode"] == 3


def test_junit_outcomes_and_partial_rounds_are_read(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase name="a" time="1.5"/>'
        '<testcase name="b" time="0.1"><failure message="assert 1 == 2">trace</failure></testcase>'
        '<testcase name="c" time="0"><skipped type="pytest.skip" message="no CUDA"/></testcase>'
        '<testcase name="d" time="0.2"><skipped type="pytest.xfail" message="known gap"/></testcase>'
        '</testsuite></testsuites>')
    got = suite.read_junit(xml)
    assert got["counts"] == {"passed": 1, "failed": 1, "skipped": 1, "xfailed": 1}
    assert [t["outcome"] for t in got["tests"]] == ["passed", "failed", "skipped", "xfailed"]
    assert got["tests"][1]["message"] == "assert 1 == 2" and got["tests"][0]["seconds"] == 1.5
    stderr = "warming up\nround 1/2: fp32/pgdat 1.25s, fp32/las_k20 1.10s, bf16+channels_last/las_k1 0.50s\n"
    assert suite.partial_rounds(stderr) == [{"fp32/pgdat": 1.25, "fp32/las_k20": 1.1, "bf16+channels_last/las_k1": 0.5}]


def test_speed_rows_follow_from_epoch_cost_seconds():
    out = {"benchmark": "epoch_cost", "model": "resnet18", "strategy_backbone": "resnet18", "batch_size": 128,
           "batches": 20, "rounds": 2, "data": "random", "device": "cuda", "settings": ["fp32", "bf16"],
           "seconds": {"fp32/pgdat": 4.0, "fp32/las_k20": 3.6, "bf16/pgdat": 2.0, "bf16/las_k20": 2.2},
           "iterations_mean": {"fp32/pgdat": 10, "fp32/las_k20": 8.5, "bf16/pgdat": 10, "bf16/las_k20": 8.5},
           "setting_speedup": {"bf16_vs_fp32/pgdat": 2.0}}
    t = suite.speed_table(out)
    row = next(r for r in t["rows"] if r["setting"] == "fp32" and r["variant"] == "pgdat")
    assert row["step_s"] == 0.2 and row["images_per_s"] == 640.0 and row["epoch_50k_s"] == 78.1  # 50000 / 640
    assert t["ratios"] == {"fp32/las_k20_vs_pgdat": 0.9, "bf16/las_k20_vs_pgdat": 1.1}


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available: the refusal is for machines without it")
def test_cuda_device_without_cuda_is_one_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "x.json")],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 1 and proc.stderr.startswith("las-at: error: --device cuda but CUDA is not available")
    assert "--device cpu --tiny" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "x.json").exists()


def test_smoke_without_cifar_is_digits_at_tiny_size_and_skipped_at_full_size(tmp_path, monkeypatch):
    monkeypatch.setattr(suite, "SHARED_DATA", tmp_path / "no_shared_data")
    args = suite.parse_args(["--device", "cpu", "--tiny", "--data-dir", str(tmp_path / "empty")])
    part, note = suite.smoke_part(args, tmp_path / "runs", 60)
    assert part.status == "pending" and part.command[2:4] == ["experiment=cifar10_resnet18_lasat_k20", "data=digits"]
    assert note.startswith("digits") and "no CIFAR-10" in note
    full = suite.parse_args(["--data-dir", str(tmp_path / "empty")])
    part, _ = suite.smoke_part(full, tmp_path / "runs", 60)
    assert part.status == "skipped" and "--prepare-data" in part.reason
    suite.finish_smoke(part, tmp_path / "runs", note)  # nothing ran: the section still names the preset
    assert part.status == "skipped" and part.result["preset"] == "cifar10_resnet18_lasat_k20"


def test_only_test_cuda_holds_cuda_marked_tests():
    # The suite's cuda_tests part collects tests/test_cuda.py alone; a cuda test elsewhere would never run there.
    marker = "pytest.mark." + "cuda"  # spelled apart: this file does not carry the marker
    marked = sorted(p.name for p in (REPO / "tests").glob("test_*.py") if marker in p.read_text())
    assert marked == ["test_cuda.py"]
