"""Robustness evaluation: attacks, ordering, sanity checks, AutoAttack, export, the CLI.

A small CNN is adversarially trained on digits once per module (a few seconds), so robust
accuracy is neither 0 nor 100% and the attacks can be told apart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from evaluation import (
    ATTACKS,
    AttackResult,
    attack_order,
    attack_spec,
    evaluate,
    evaluate_attack,
    format_table,
    robust_accuracy,
    sanity_checks,
)
from evaluation.autoattack import _load_state
from las_env.attack import pgd
from las_env.checkpoint import atomic_save, export_state_dict, load_plain_state_dict
from las_env.models import build_model
from tests.conftest import Ran, main_in_process

REPO = Path(__file__).resolve().parents[1]
EPS, STEP = 0.2, 0.05  # the digits threat model (las_env.datasets.lookup("digits").threat)
N_EVAL = 200


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny 8x8 convolutions are dominated by thread hand-off; one thread is faster, and much
    # faster when other processes share the cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(digits) -> nn.Module:
    """small_cnn after a short PGD-2 adversarial training on digits (about 98% clean, 50% PGD-20)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = build_model("small_cnn", digits.channels, digits.num_classes)
    epochs, batch = 8, 128
    steps = epochs * -(-len(digits.y_train) // batch)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.05, total_steps=steps, pct_start=0.15)
    for _ in range(epochs):
        perm = torch.randperm(len(digits.y_train), generator=g)
        for i in range(0, len(perm), batch):
            x, y = digits.x_train[perm[i:i + batch]], digits.y_train[perm[i:i + batch]]
            x_adv = pgd(model, x, y, EPS, 0.1, 2, generator=g)
            model.train()
            loss = F.cross_entropy(model(x_adv), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


class Quantised(nn.Module):
    """Gradient masking by construction: the input is rounded to 1/16 steps before the net.

    ``round`` has zero gradient everywhere, so PGD only ever sees its random start, while the
    clean digits (multiples of 1/16) are classified exactly as before.
    """

    def __init__(self, net: nn.Module, levels: int = 16) -> None:
        super().__init__()
        self.net, self.levels = net, levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.round(x * self.levels) / self.levels)


@pytest.fixture(scope="module")
def results(trained, digits) -> dict[str, AttackResult]:
    x, y = digits.x_test[:N_EVAL], digits.y_test[:N_EVAL]
    out = evaluate(trained, x, y, ["clean", "fgsm", "pgd10", "pgd20", "pgd50", "cw"], EPS, progress=False)
    return {r.name: r for r in out}


# ----------------------------------------------------------------------------- attacks


def test_registry_names_and_parsing():
    assert set(ATTACKS) == {"clean", "fgsm", "pgd10", "pgd20", "pgd50", "cw", "autoattack"}
    assert attack_spec("PGD100").iterations == 100 and attack_spec("pgd100").loss == "ce"
    assert attack_spec("cw50").loss == "margin" and attack_spec("cw").iterations == 20
    assert "PGD-20 on margin loss" in attack_spec("cw").label(EPS)
    for bad in ("pgd", "pgd0", "apgd", "autoatack"):
        with pytest.raises(ValueError, match="Unknown attack"):
            attack_spec(bad)


def test_attack_order_runs_weakest_to_strongest_with_unknown_names_before_autoattack():
    names = ["autoattack", "square", "cw50", "pgd100", "clean", "pgd20", "fgsm", "PGD10", "cw"]
    assert sorted(names, key=attack_order) == ["clean", "fgsm", "PGD10", "pgd20", "pgd100", "cw", "cw50", "square",
                                               "autoattack"]


def test_every_attack_runs_and_results_are_consistent(results):
    for r in results.values():
        assert r.n_images == N_EVAL and r.robust is not None and r.robust.shape == (N_EVAL,)
        assert r.correct == int(r.robust.sum()) and r.accuracy == pytest.approx(r.correct / N_EVAL)
        assert r.seconds >= 0 and r.label
        assert r.epsilon == (0.0 if r.name == "clean" else EPS)
        # robust means "correct on the clean image and under the attack"
        assert not (r.robust & ~results["clean"].robust).any()
    assert results["pgd10"].details == {"kind": "pgd", "step": STEP, "iterations": 10, "loss": "ce",
                                        "random_start": True, "restarts": 1, "seed": 0}


def test_accuracies_order_sensibly(results):
    acc = {k: r.accuracy for k, r in results.items()}
    tol = 0.02  # random starts move a few of 200 images either way
    assert acc["clean"] > 0.9, "the test model should be accurate"
    assert 0.2 < acc["pgd10"] < acc["clean"] - 0.1, "adversarial training should give partial robustness"
    assert acc["pgd10"] <= acc["fgsm"] + tol
    assert acc["pgd50"] <= acc["pgd10"] + tol
    assert acc["pgd20"] <= acc["pgd10"] + tol
    assert all(a <= acc["clean"] for a in acc.values())


def test_restarts_keep_the_per_image_worst_case(trained, digits):
    x, y = digits.x_test[:100], digits.y_test[:100]
    once = evaluate_attack(trained, x, y, "pgd10", EPS, restarts=1, generator=torch.Generator().manual_seed(3),
                           progress=False)
    thrice = evaluate_attack(trained, x, y, "pgd10", EPS, restarts=3, generator=torch.Generator().manual_seed(3),
                             progress=False)
    # Same generator: the first restart is the single run, later restarts can only break more.
    assert not (thrice.robust & ~once.robust).any()
    assert "3 restarts" in thrice.label


def test_fgsm_is_one_step_from_the_clean_image(trained, digits):
    x, y = digits.x_test[:64], digits.y_test[:64]
    a = evaluate_attack(trained, x, y, "fgsm", EPS, progress=False, seed=0)
    b = evaluate_attack(trained, x, y, "fgsm", EPS, progress=False, seed=1)
    assert torch.equal(a.robust, b.robust), "FGSM has no random start: seeds must not matter"


def test_robust_accuracy_helper_agrees_with_evaluate(trained, digits, results):
    x, y = digits.x_test[:N_EVAL], digits.y_test[:N_EVAL]
    t0 = time.perf_counter()
    clean, robust = robust_accuracy(trained, x, y, EPS, STEP, 10, batch_size=256)
    assert time.perf_counter() - t0 < 20
    assert clean == pytest.approx(results["clean"].accuracy)
    assert robust == pytest.approx(results["pgd10"].accuracy, abs=0.04)
    assert trained.training is False
    trained.train()
    robust_accuracy(trained, x[:16], y[:16], EPS, STEP, 2)
    assert trained.training is True, "the model's mode is restored"
    trained.eval()


# ----------------------------------------------------------------------------- sanity checks


def test_sanity_checks_pass_on_an_honest_model(trained, digits, results):
    x, y = digits.x_test[:N_EVAL], digits.y_test[:N_EVAL]
    checks = {c.name: c for c in sanity_checks(list(results.values()), trained, x, y, EPS, subset=100)}
    assert checks["pgd_monotone"].passed is True
    assert checks["eps_zero_is_clean"].passed is True
    assert checks["huge_eps_breaks_all"].passed is True, checks["huge_eps_breaks_all"].detail
    assert checks["autoattack_strongest"].passed is None  # not evaluated here: skipped, not failed
    table = format_table(list(results.values()), list(checks.values()), "digits test split", n_total=450)
    assert "| pgd50 |" in table and "first 200 of 450" in table and "eps = 0.2" in table and "FAIL" not in table


def test_sanity_checks_fire_on_a_gradient_masking_model(trained, digits):
    masked = Quantised(trained).eval()
    x, y = digits.x_test[:100], digits.y_test[:100]
    rows = evaluate(masked, x, y, ["clean", "pgd10", "pgd50"], EPS, progress=False)
    honest = evaluate_attack(trained, x, y, "pgd50", EPS, progress=False)
    assert rows[2].accuracy > honest.accuracy + 0.2, "masking should make PGD look far stronger than it is"
    checks = {c.name: c for c in sanity_checks(rows, masked, x, y, EPS, subset=100)}
    assert checks["huge_eps_breaks_all"].passed is False
    assert "**FAIL**" in format_table(rows, list(checks.values()), "digits")


def test_sanity_checks_flag_a_rise_and_a_weak_autoattack():
    # Synthetic rows: PGD-50 far above PGD-10, AutoAttack above PGD.
    def row(name: str, flags: list[bool]) -> AttackResult:
        t = torch.tensor(flags)
        kind = "autoattack" if name == "autoattack" else "pgd"
        return AttackResult(name, name, float(t.float().mean()), int(t.sum()), len(t), EPS, 0.0, {"kind": kind}, t)

    weak = [True] * 20 + [False] * 80
    strong = [True] * 60 + [False] * 40
    checks = {c.name: c for c in sanity_checks([row("pgd10", weak), row("pgd50", strong)], None, None, None, EPS)}
    assert checks["pgd_monotone"].passed is False and "p=" in checks["pgd_monotone"].detail
    checks = {c.name: c for c in sanity_checks([row("pgd20", weak), row("autoattack", strong)], None, None, None, EPS)}
    assert checks["autoattack_strongest"].passed is False
    assert checks["eps_zero_is_clean"].passed is None  # no model: skipped
    # A one-image wobble is noise, not a failure.
    checks = {c.name: c for c in sanity_checks([row("pgd10", weak), row("pgd50", [True] * 21 + [False] * 79)],
                                                None, None, None, EPS)}
    assert checks["pgd_monotone"].passed is True


# ----------------------------------------------------------------------------- AutoAttack


def test_autoattack_runs_and_resumes(trained, digits, tmp_path):
    x, y = digits.x_test[:6], digits.y_test[:6]
    state = tmp_path / "aa_state.json"
    t0 = time.perf_counter()
    aa = evaluate_attack(trained, x, y, "autoattack", EPS, batch_size=3, state_path=state, progress=False)
    first = time.perf_counter() - t0
    pgd_rows = evaluate(trained, x, y, ["clean", "pgd50"], EPS, progress=False)
    assert aa.n_images == 6 and aa.details["chunks"] == 2 and aa.details["chunks_resumed"] == 0
    assert "pyautoattack" in aa.details["implementation"] and aa.details["version"] == "standard"
    assert aa.details["max_linf"] <= EPS + 1e-6
    assert not (aa.robust & ~pgd_rows[0].robust).any()
    assert aa.correct <= pgd_rows[1].correct + 1
    assert list(aa.details["robust_after_component"]) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]

    # A crash after the first chunk: the rerun redoes only the second, with the same result.
    saved = json.loads(state.read_text())
    del saved["chunks"]["1"]
    state.write_text(json.dumps(saved))
    again = evaluate_attack(trained, x, y, "autoattack", EPS, batch_size=3, state_path=state, progress=False)
    assert again.details["chunks_resumed"] == 1 and torch.equal(again.robust, aa.robust)

    # A state file from another evaluation (other weights, images, eps, seed...) is not reused.
    fingerprint = dict(saved["fingerprint"], eps=0.1)
    fresh, note = _load_state(state, fingerprint)
    assert fresh["chunks"] == {} and "another evaluation" in note
    print(f"AutoAttack on 6 digits images: {first:.1f}s ({first / 6:.2f}s per image)")


@pytest.mark.slow
def test_autoattack_exposes_gradient_masking(trained, digits):
    masked = Quantised(trained).eval()
    x, y = digits.x_test[:8], digits.y_test[:8]
    rows = evaluate(masked, x, y, ["clean", "pgd50", "autoattack"], EPS, batch_size=8, progress=False)
    checks = {c.name: c for c in sanity_checks(rows, masked, x, y, EPS)}
    assert rows[2].accuracy < rows[1].accuracy, "Square (gradient-free) must get through where PGD cannot"
    assert checks["pgd_autoattack_gap"].passed is False
    assert any("zero gradient" in w or "Square" in w for w in rows[2].details["warnings"])


# ----------------------------------------------------------------------------- export


def test_plain_state_dict_round_trip(trained, digits, tmp_path):
    path = export_state_dict(trained, tmp_path / "plain.pt")
    raw = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: RobustBench's convention
    assert all(isinstance(v, torch.Tensor) for v in raw.values())
    assert not any(k.startswith("module.") for k in raw)
    fresh = build_model("small_cnn", 1, 10)
    fresh.load_state_dict(raw, strict=True)
    fresh.eval()
    x = digits.x_test[:32]
    with torch.no_grad():
        assert torch.equal(fresh(x), trained(x))

    # Our loader also takes DataParallel prefixes and {"state_dict": ...} wrappers.
    torch.save({"state_dict": {f"module.{k}": v for k, v in raw.items()}}, tmp_path / "wrapped.pt")
    again = load_plain_state_dict(build_model("small_cnn", 1, 10), tmp_path / "wrapped.pt").eval()
    with torch.no_grad():
        assert torch.equal(again(x), trained(x))
    with pytest.raises(ValueError, match="does not (match|fit) the architecture"):
        load_plain_state_dict(build_model("small_cnn", 3, 10), path)


# ----------------------------------------------------------------------------- CLI


def _cli(*args: str, cwd: Path, wandb_mode: str = "disabled") -> subprocess.CompletedProcess:
    """A real ``python experiments/evaluate.py`` process (the W&B test: wandb's own process stays out of pytest's)."""
    env = {**os.environ, "WANDB_MODE": wandb_mode, "HYDRA_FULL_ERROR": "0", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "experiments" / "evaluate.py"), *args, "threads=1",
                           "progress=false"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _evaluate(*args: str, cwd: Path) -> Ran:
    """The same command in this process: a Python and torch start-up less (tests/conftest.py)."""
    return main_in_process("evaluate", *args, "threads=1", "progress=false", cwd=cwd)


@pytest.fixture(scope="module")
def run_dir(trained, tmp_path_factory) -> Path:
    """A run directory holding a LAS-AT checkpoint of the trained model, as the runner writes it."""
    folder = tmp_path_factory.mktemp("run")
    meta = {"dataset": "digits", "data_root": "data", "model": "small_cnn", "in_channels": 1, "num_classes": 10,
            "run_dir": str(folder), "wandb": {"id": "test0001", "project": "las-at-tests", "group": None,
                                             "mode": "offline", "dir": str(folder)}}
    atomic_save({"format": "las-at/v1", "meta": meta, "target": trained.state_dict()}, folder / "checkpoint.pt")
    return folder


def test_cli_evaluates_a_checkpoint_and_writes_reports(run_dir, tmp_path):
    out = _evaluate(f"checkpoint={run_dir}", "attacks=[clean,fgsm,pgd10,pgd20]", "n=64", "sanity_n=32", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    report = json.loads((run_dir / "evaluation_n64.json").read_text())
    assert [r["name"] for r in report["results"]] == ["clean", "fgsm", "pgd10", "pgd20"]
    assert report["data"]["n_images"] == 64 and report["threat_model"]["eps"] == EPS
    assert report["sanity_passed"] is True
    md = (run_dir / "evaluation_n64.md").read_text()
    assert "| pgd20 |" in md and md in out.stdout
    assert "[digits] PGD-10" in out.stdout and "64 images" in out.stdout
    assert not list(tmp_path.iterdir()), "nothing is written into the working directory"

    # A second evaluation on the same weights, images and eps adds its rows to the report.
    out = _evaluate(f"checkpoint={run_dir / 'checkpoint.pt'}", "attacks=[pgd50]", "n=64", "sanity=false", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    names = [r["name"] for r in json.loads((run_dir / "evaluation_n64.json").read_text())["results"]]
    assert names == ["clean", "fgsm", "pgd10", "pgd20", "pgd50"]


def test_cli_exports_and_evaluates_a_plain_state_dict(run_dir, trained, tmp_path):
    target = tmp_path / "export" / "target.pt"
    out = _evaluate(f"checkpoint={run_dir}", f"export={target}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "custom_checkpoint" in out.stdout
    weights = torch.load(target, weights_only=True)
    assert weights.keys() == trained.state_dict().keys()
    out = _evaluate(f"state_dict={target}", "model=small_cnn", "data=digits", "attacks=[clean]", "n=32", "sanity=false",
               cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (target.parent / "evaluation_n32.md").is_file()


@pytest.mark.slow
def test_cli_updates_the_logged_runs_summary_offline(run_dir, tmp_path):
    out = _cli(f"checkpoint={run_dir}", "attacks=[clean]", "n=16", "sanity=false", cwd=tmp_path, wandb_mode="offline")
    assert out.returncode == 0, out.stderr
    assert "W&B run test0001 (offline) summary updated" in out.stdout
    (log,) = run_dir.glob("wandb/offline-run-*-test0001/run-test0001.wandb")
    assert b"eval_n16/clean" in log.read_bytes()  # the summary record names its keys verbatim


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["attacks=[clean,pgd10,deepfool]"], "Unknown attack 'deepfool'"),
        (["n=0"], "n=0: must be a whole number >= 1"),
        (["checkpoint=/nonexistent/run"], "No checkpoint at /nonexistent/run"),
    ],
)
def test_cli_rejects_bad_input_before_any_work(run_dir, tmp_path, args, message):
    base = [] if any(a.startswith("checkpoint=") for a in args) else [f"checkpoint={run_dir}"]
    out = _evaluate(*base, *args, cwd=tmp_path)
    assert out.returncode == 1
    assert out.stderr.startswith("las-at: error: ") and message in out.stderr
    assert "Traceback" not in out.stderr and not out.stdout
