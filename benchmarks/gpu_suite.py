"""GPU readiness suite: one command that proves the CUDA path and measures it, in under 8 minutes.

Three sections, five parts; each part is a child process with its own time budget (a part
over budget is killed, reported as ``cut`` with what it had printed, and the next part still
runs). The speed parts run benchmarks/epoch_cost.py and attack_cost.py unchanged, as child
processes rather than imported, because only a process can be cut at its budget:

  cuda_tests  the tests marked ``cuda`` (tests/test_cuda.py): per-image PGD on CUDA = CPU,
              device-resident and pinned host-resident data, bf16/fp16 steps, channels_last,
              official AutoAttack, checkpoints across devices.
  speed       speed_main: epoch_cost.py, all variants side by side in one process, on
              CIFAR-10-shaped random batches of 128: ResNet-18 target and strategy, PGD-AT
              (PGD-10) vs LAS-AT k=20 and k=1, fp32/bf16 x NCHW/channels_last; speed_wide:
              WRN-34-10 (ResNet-18 strategy, as its preset) at bf16 with fewer steps;
              speed_attack: attack_cost.py (per-image attack vs uniform PGD vs the authors'
              masked loop). Per variant: time per step, images/s, projected time of a
              50,000-image epoch; LAS/PGD-AT ratios per setting.
  smoke       2 epochs of the CIFAR-10 paper preset (experiment=cifar10_resnet18_lasat_k20,
              data.epochs=2) on the exact-pixel CIFAR-10 subset, final evaluation included.

    python benchmarks/gpu_suite.py --prepare-data          # .gpu_data/ from ../shared/data (27 MB)
    python benchmarks/gpu_suite.py --out gpu_suite.json    # on the GPU machine: <= 8 minutes
    python benchmarks/gpu_suite.py --device cpu --tiny --out tiny.json   # every part at toy size

``--tiny`` runs every part at toy sizes (small_cnn, batches of 8, a 2-step smoke) so CI
exercises the whole script; on the CPU the cuda tests are dry-run there (``LAS_AT_CUDA_TEST_DEVICE=cpu``,
tests/test_cuda.py), so their code cannot rot on machines without a GPU. One JSON
file (``--out``) holds the machine, every part's status, seconds and budget, and each part's
results; a short table is printed. Exit status 1 when a part failed, else 0 (cut parts included:
they are reported as cut). docs/benchmarks.md describes the table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):  # the packages, and gpu_report beside this file
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402

from experiments.config.errors import fail  # noqa: E402
from experiments.runfolder.runfiles import RESULTS_FILE  # noqa: E402
from gpu_report import Report, machine, table  # noqa: E402

FORMAT = "las-at/gpu-suite/v1"
EPOCH_IMAGES = 50_000  # CIFAR-10's training set: the projected epoch
SHARED_DATA = REPO.parent / "shared" / "data"
CIFAR_FOLDER = "cifar-10-batches-py"
PRESET = "cifar10_resnet18_lasat_k20"
# Seconds per part on a GPU, summing to 460 (< 8 minutes with start-up); --tiny: on a shared CPU
# (about 3x what its parts took at load average 6 on 2 cores, so that CI load does not cut them).
BUDGETS = {"cuda_tests": 100, "speed_main": 150, "speed_wide": 60, "speed_attack": 30, "smoke": 120}
TINY_BUDGETS = {"cuda_tests": 240, "speed_main": 120, "speed_wide": 60, "speed_attack": 60, "smoke": 120}
MIN_START_S = 10.0  # a part with less time left than this is not started (reported as cut)


# ----------------------------------------------------------------------------- running a part


@dataclass
class Part:
    """One guarded child process and what came of it."""

    name: str
    command: list[str]
    budget_s: float
    status: str = "pending"  # ok | failed | cut | skipped
    seconds: float = 0.0
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    reason: str = ""
    result: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        rec = {"status": self.status, "seconds": round(self.seconds, 1), "budget_s": self.budget_s,
               "command": " ".join(self.command), "returncode": self.returncode}
        if self.reason:
            rec["reason"] = self.reason
        if self.status in ("failed", "cut"):
            rec["stdout_tail"], rec["stderr_tail"] = self.stdout[-3000:], self.stderr[-3000:]
        return rec


def child_env(tiny_cpu: bool) -> dict[str, str]:
    env = dict(os.environ, WANDB_MODE="disabled", WANDB_SILENT="true")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    if tiny_cpu:  # toy sizes: thread hand-off costs more than it saves (and CI cores are shared)
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("LAS_AT_CUDA_TEST_DEVICE", "cpu")  # the CUDA tests' code, dry-run on the CPU
    return env


def run(part: Part, deadline: float, env: dict[str, str]) -> Part:
    """Run ``part.command`` for at most its budget (and never past ``deadline``)."""
    timeout = min(part.budget_s, deadline - time.monotonic())
    if timeout < MIN_START_S:
        part.status, part.reason = "cut", f"not started: {max(timeout, 0):.0f}s of the suite's budget left"
        return part
    t0 = time.monotonic()
    # Its own session, so that a cut kills the child's whole process group, nothing else.
    proc = subprocess.Popen(part.command, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        part.stdout, part.stderr = proc.communicate(timeout=timeout)
        part.returncode = proc.returncode
        part.status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        part.stdout, part.stderr = proc.communicate()
        part.status, part.reason = "cut", f"over its {timeout:.0f}s budget: killed"
    part.seconds = time.monotonic() - t0
    if part.status == "failed":
        part.reason = f"exit status {proc.returncode}"
    return part


def last_json_line(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


# ----------------------------------------------------------------------------- cuda tests


def cuda_tests_part(args: argparse.Namespace, junit: Path, budget: float) -> Part:
    # One process (-n 0): one GPU, and the workers pyproject.toml asks for would each collect every test again.
    # Only tests/test_cuda.py holds cuda-marked tests (tests/test_gpu_suite.py checks): collecting every
    # other test file too cost 5 s of imports.
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-m", "cuda", "-p", "no:cacheprovider", f"--junitxml={junit}",
           "tests/test_cuda.py"]
    return Part("cuda_tests", cmd, budget)


def read_junit(path: Path) -> dict[str, Any]:
    """Per test: outcome (passed, failed, skipped, xfailed, xpassed) and the reason, from pytest's JUnit XML."""
    tests, counts = [], {}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", child.get("message", "")
            elif child.tag == "skipped":
                xfail = child.get("type") == "pytest.xfail"
                outcome, message = ("xfailed" if xfail else "skipped"), child.get("message", "")
        name = case.get("name", "")
        tests.append({"test": name, "outcome": outcome, "seconds": round(float(case.get("time", 0)), 2),
                      "message": message[:300]})
        counts[outcome] = counts.get(outcome, 0) + 1
    return {"counts": counts, "tests": tests}


def finish_cuda_tests(part: Part, junit: Path) -> None:
    if junit.is_file():
        part.result = read_junit(junit)
    counts = part.result.get("counts", {})
    if part.status == "ok" and counts and set(counts) == {"skipped"}:
        part.status = "skipped"
        part.reason = "skipped: " + ("no CUDA" if not torch.cuda.is_available() else part.result["tests"][0]["message"])
    elif part.status == "failed" and counts.get("failed", 0) == 0 and part.returncode == 5:
        part.reason = "no test is marked cuda (pytest exit status 5)"


# ----------------------------------------------------------------------------- speed


def speed_parts(args: argparse.Namespace, budgets: dict[str, float]) -> list[Part]:
    bench = str(REPO / "benchmarks")
    device = ["--device", args.device]
    if args.tiny:  # 8x8 digits (its grid and PGD-5 PGD-AT): 16x fewer pixels than CIFAR's 32x32
        data = ["--data", "digits"]
        main_size = ["--model", "small_cnn", "--batch-size", "8", "--batches", "2", "--rounds", "1", "--warmup", "1"]
        wide_size = ["--model", "wrn-10-1", "--strategy-backbone", "small_cnn", "--batch-size", "8", "--batches", "2",
                     "--rounds", "1", "--warmup", "1"]
        attack_size = ["--model", "small_cnn", "--batch-size", "8", "--repeats", "1"]
    else:
        data = ["--data", "cifar10-random"]
        main_size = ["--model", "resnet18", "--batch-size", "128", "--batches", "20", "--rounds", "2", "--warmup", "2"]
        wide_size = ["--model", "wrn-34-10", "--strategy-backbone", "resnet18", "--batch-size", "128", "--batches", "5",
                     "--rounds", "1", "--warmup", "1"]
        attack_size = ["--model", "resnet18", "--batch-size", "128", "--repeats", "5"]
    common = [*data, "--k", "20", "1", "--variants", "pgdat", "las", "--no-breakdown", *device]
    epoch_cost = [sys.executable, f"{bench}/epoch_cost.py", *common]
    return [
        Part("speed_main", [*epoch_cost, *main_size, "--precision", "fp32", "bf16",
                            "--memory-format", "nchw", "channels_last"], budgets["speed_main"]),
        Part("speed_wide", [*epoch_cost, *wide_size, "--precision", "bf16"], budgets["speed_wide"]),
        Part("speed_attack", [sys.executable, f"{bench}/attack_cost.py", *attack_size, *device], budgets["speed_attack"]),
    ]


def speed_table(out: dict[str, Any]) -> dict[str, Any]:
    """epoch_cost's JSON as per-variant rows and per-setting LAS/PGD-AT ratios."""
    batches, batch = out["batches"], out["batch_size"]
    rows, ratios = [], {}
    for name, seconds in out["seconds"].items():
        setting, variant = name.split("/", 1) if "/" in name else (out["settings"][0], name)
        ips = batches * batch / seconds
        rows.append({"setting": setting, "variant": variant, "step_s": round(seconds / batches, 4),
                     "images_per_s": round(ips, 1), "epoch_50k_s": round(EPOCH_IMAGES / ips, 1),
                     "iterations_mean": out["iterations_mean"][name]})
    by = {(r["setting"], r["variant"]): r["step_s"] for r in rows}
    for (setting, variant), step in by.items():
        if variant != "pgdat" and (setting, "pgdat") in by:
            ratios[f"{setting}/{variant}_vs_pgdat"] = round(step / by[(setting, "pgdat")], 3)
    return {"model": out["model"], "strategy_backbone": out["strategy_backbone"], "batch_size": batch,
            "steps_timed": batches, "rounds": out["rounds"], "data": out["data"], "device": out["device"],
            "rows": rows, "ratios": ratios, "setting_speedup": out.get("setting_speedup", {}),
            "epoch_projection": f"{EPOCH_IMAGES} images / images per second"}


def partial_rounds(stderr: str) -> list[dict[str, float]]:
    """The rounds a cut epoch_cost run had finished (its 'round r/R: name 1.23s, ...' lines)."""
    rounds = []
    for line in stderr.splitlines():
        if line.startswith("round "):
            rounds.append({m[0]: float(m[1]) for m in re.findall(r"([\w+./-]+) ([\d.]+)s", line.split(":", 1)[1])})
    return rounds


def finish_speed(part: Part) -> None:
    out = last_json_line(part.stdout)
    if part.status == "ok" and out is None:
        part.status, part.reason = "failed", "no JSON line on stdout"
    elif out is not None:
        part.result = speed_table(out) if out.get("benchmark") == "epoch_cost" else out
    if part.status == "cut" and part.name != "speed_attack":
        part.result = {"partial_rounds": partial_rounds(part.stderr)}


# ----------------------------------------------------------------------------- smoke


def prepare_data(data_dir: Path) -> str:
    """Write the exact-pixel CIFAR-10 subset into ``data_dir`` (the layout the loaders read)."""
    script = SHARED_DATA / "prepare_cifar.py"
    if not script.is_file():
        fail(f"--prepare-data needs {script} (the shared data folder beside the repository); it is absent here. "
             f"On a machine without it, copy a prepared .gpu_data/ folder from one that has it.")
    subprocess.run([sys.executable, str(script), str(data_dir), "--exact-subset"], check=True,
                   stdout=subprocess.DEVNULL)
    return f"prepared from {SHARED_DATA / 'cifar10-exact-subset.npz'}"


def smoke_part(args: argparse.Namespace, run_root: Path, budget: float) -> tuple[Part, str]:
    """The paper preset for 2 epochs; at --tiny a toy size of it (digits when no CIFAR-10 is at hand)."""
    data_dir = Path(args.data_dir).resolve()
    note = f"CIFAR-10 as found in {data_dir} (--data-dir)"
    prepare_error = ""
    if not (data_dir / CIFAR_FOLDER).is_dir() and (SHARED_DATA / "prepare_cifar.py").is_file():
        try:
            note = prepare_data(data_dir)
        except (OSError, subprocess.CalledProcessError) as exc:
            prepare_error = f"preparing {data_dir} from {SHARED_DATA} failed: {exc}"
    cmd = [sys.executable, str(REPO / "experiments" / "run.py"), f"experiment={PRESET}", f"data.root={data_dir}",
           f"device={args.device}", "data.epochs=2", "logger=none", "progress=false", f"run_root={run_root}",
           "eval.autoattack=false"]  # the preset's AutoAttack on 10,000 images would take hours, not the budget
    if args.tiny:
        cmd += ["data.batch_size=8", "data.max_steps_per_epoch=2", "model.name=small_cnn", "agent.backbone=small_cnn",
                "agent.k=2", "eval.test_subset=16", "eval.train_subset=16", "eval.final_n=16",
                "eval.final_attacks=[clean,pgd10]", "selection.val_fraction=0.005", "threads=1"]
    part = Part("smoke", cmd, budget)
    if prepare_error:
        part.status, part.reason = "failed", prepare_error
    elif not (data_dir / CIFAR_FOLDER).is_dir():
        if not args.tiny:
            part.status = "skipped"
            part.reason = (f"no CIFAR-10 at {data_dir / CIFAR_FOLDER}: run `python benchmarks/gpu_suite.py "
                           f"--prepare-data` where ../shared/data exists and carry the folder")
            return part, note
        cmd.insert(3, "data=digits")  # after experiment=: the command line overrides the preset's data
        note = f"digits (scikit-learn): no CIFAR-10 at {data_dir / CIFAR_FOLDER} and no {SHARED_DATA}"
    return part, note


def finish_smoke(part: Part, run_root: Path, data_note: str) -> None:
    found = sorted(run_root.glob(f"**/{RESULTS_FILE}"))
    part.result = {"preset": PRESET, "data_source": data_note, "overrides": part.command[3:],
                   "schedule": "data.epochs=2: the preset's lr milestones (90% and 94.5% of the budget) fall "
                               "inside these 2 epochs; every other setting is the preset's"}
    if not found:
        if part.status == "ok":
            part.status, part.reason = "failed", "no results.json written"
        return
    res = json.loads(found[0].read_text())
    history = [{"epoch": h["epoch"], "steps": h["steps"], "train_images": h["images"],
                "train_s": round(h["seconds"]["train"], 2), "train_images_per_s": round(h["images"] / h["seconds"]["train"], 1),
                **(h.get("eval") or {})} for h in res["history"]]
    final = [{k: r[k] for k in ("name", "label", "accuracy", "correct", "n_images", "epsilon")} for r in res["final"]]
    part.result.update(data=res["data"], threat_model=res["threat_model"], per_epoch_attack=res["per_epoch_attack"],
                       model=res["model"], agent=res["agent"], history=history, final=final,
                       seconds={k: round(v, 1) for k, v in res["seconds"].items()})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_suite.json", help="the JSON report (default gpu_suite.json)")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (with --tiny)")
    p.add_argument("--tiny", action="store_true", help="every part at toy size (CI; under a minute on a CPU)")
    p.add_argument("--data-dir", default=str(REPO / ".gpu_data"),
                   help="folder holding cifar-10-batches-py/ for the smoke (default .gpu_data/, prepared from "
                        "../shared/data when absent)")
    p.add_argument("--prepare-data", action="store_true", help="only write the CIFAR-10 subset into --data-dir")
    p.add_argument("--total-budget", type=float, default=None,
                   help="seconds for the whole suite (default: the sum of the part budgets)")
    p.add_argument("--parts", nargs="+", default=["cuda_tests", "speed", "smoke"],
                   choices=["cuda_tests", "speed", "smoke"])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.prepare_data:
        print(prepare_data(Path(args.data_dir)) + f" into {args.data_dir}/{CIFAR_FOLDER}")
        return 0
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {args.device} but CUDA is not available here (torch {torch.__version__}). On a machine without "
             f"a GPU run the toy version: python benchmarks/gpu_suite.py --device cpu --tiny --out X.json")
    if torch.device(args.device).type == "cpu" and not args.tiny:
        fail("--device cpu runs the GPU-sized suite on a CPU (hours). Add --tiny for the toy sizes, or use --device cuda.")
    budgets = TINY_BUDGETS if args.tiny else BUDGETS
    total = args.total_budget or float(sum(budgets.values()))
    t_start = time.monotonic()
    deadline = t_start + total
    env = child_env(args.tiny and args.device == "cpu")
    report = Report(Path(args.out), {"format": FORMAT, "mode": "tiny" if args.tiny else "full",
                                     "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                     "machine": machine(args.device), "total_budget_s": total, "parts": {},
                                     "cuda_tests": {}, "speed": {}, "smoke": {}})
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as tmp:
        tmp_path = Path(tmp)
        if "cuda_tests" in args.parts:
            junit = tmp_path / "junit.xml"
            part = run(cuda_tests_part(args, junit, budgets["cuda_tests"]), deadline, env)
            report.add(part, ["cuda_tests"], lambda: finish_cuda_tests(part, junit))
        if "speed" in args.parts:
            for part, key in zip(speed_parts(args, budgets), ("main", "wide", "attack")):
                run(part, deadline, env)
                report.add(part, ["speed", key], lambda: finish_speed(part))  # noqa: B023 - called at once
        if "smoke" in args.parts:
            run_root = tmp_path / "runs"
            part, note = smoke_part(args, run_root, budgets["smoke"])
            if part.status == "pending":
                run(part, deadline, env)
            report.add(part, ["smoke"], lambda: finish_smoke(part, run_root, note))
    report.save()
    report = report.data
    print(table(report))
    print(f"report: {args.out}")
    return 1 if any(p["status"] == "failed" for p in report["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
