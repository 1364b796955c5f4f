"""The fault catalog: what a hostile but fair user meets, and that each failure is one paragraph.

Every bad input runs through run.py's entry point (one case, and the divergence, in a subprocess) and must: exit non-zero
within 30 s, print no traceback, name the key in one ``las-at: error:`` paragraph, and leave
every file of an earlier run untouched. Each suggested fix is then followed, and must not give
the same error. Then the run-time faults: divergence (lr=1e6), two runs in one folder, damaged
checkpoints, stale temporary files; and the pieces behind them (strict JSON, the lock, the
guard's gradient norm, file modes).

Budgets are tiny (digits, a few steps).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from experiments.config.errors import ConfigError
from experiments.training.guard import SKIPPED, DivergenceGuard, TrainingDiverged
from experiments.training.loop import train
from experiments.runfolder.rundir import settings_hash
from experiments.runfolder.runlock import RunLock
from experiments.config.settings import settings_from_config
from las_env.checkpoint import CorruptCheckpointError, atomic_save, load_checkpoint
from las_env.files import NONFINITE_KEY, stale_temp_files, strict_json, write_json
from tests.conftest import Ran, main_in_process

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "experiments" / "conf"
RUN = [sys.executable, str(REPO / "experiments" / "run.py")]
EVALUATE = [sys.executable, str(REPO / "experiments" / "evaluate.py")]
LIMIT_S = 30

TINY = ["data.epochs=2", "data.max_steps_per_epoch=3", "data.batch_size=32", "eval.test_subset=32",
        "eval.train_subset=32", "eval.final_n=32", "eval.final_attacks=[clean]", "eval.pgd_iterations=2",
        "agent.k=2", "logger=none", "progress=false", "log_every_steps=2"]


def cli(*args: str, cwd: Path, tool: list[str] = RUN) -> Ran:
    """Run a command line to its end. "Exits within 30 s" is asserted on its CPU time (user +
    system): four test suites share two cores here, so wall-clock time measures the neighbours."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([*tool, *args], cwd=cwd, stdout=out, stderr=err, text=True, env=env)
        deadline = time.time() + 180
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.time() > deadline:
                proc.kill()
                raise AssertionError(f"{args} did not finish within 180 s")
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Ran(proc.returncode, out.read(), err.read(), usage.ru_utime + usage.ru_stime)


def error_line(proc: Ran) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("las-at: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def strict_load(path: Path):
    def refuse(name):
        raise ValueError(f"{path} holds the non-JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def settings(run_dir: Path, *overrides: str, **changes):
    cfg = config(*TINY, *overrides)
    s = settings_from_config(cfg, run_dir, settings_hash=settings_hash(cfg))
    for k, v in changes.items():
        setattr(s, k, v)
    return s


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- bad input

# case -> (overrides, the key the message must name, the fix: overrides replacing the bad one;
#          None = the one the message itself suggests as "e.g. KEY=VALUE")
CATALOG = {
    # Through run.py's entry point (the ones that used to end in a traceback or exit 0, plus one of
    # each kind of check): one in a subprocess, the others in-process (tests/conftest.py).
    "lr nan": (["data.optim.lr=nan"], "data.optim.lr", ["data.optim.lr=0.05"]),
    "alpha nan": (["reward.alpha=nan"], "reward.alpha", ["reward.alpha=4"]),
    "radius above the pixel range": (["data.grid.epsilons=[0.2,2.0]"], "data.grid.epsilons",
                                     ["data.grid.epsilons=[0.2,0.3]"]),
    "device tpu": (["device=tpu"], "device", ["device=cpu"]),
    "batch size abc": (["data.batch_size=abc"], "data.batch_size", ["data.batch_size=32"]),
    "forbidden hydra.run.dir": (["hydra.run.dir=/proc/forbidden"], "hydra.run.dir", []),
    # The same validation, checked in-process (settings_from_config is what the CLI calls).
    "empty grid": (["data.grid.epsilons=[]"], "data.grid.epsilons", None),
    "negative epochs": (["data.epochs=-1"], "data.epochs", ["data.epochs=2"]),
    "lr inf": (["data.optim.lr=inf"], "data.optim.lr", ["data.optim.lr=0.05"]),
    "negative probe radius": (["reward.probe_epsilon=-1"], "reward.probe_epsilon", ["reward.probe_epsilon=null"]),
    "nan probe radius": (["reward.probe_epsilon=nan"], "reward.probe_epsilon", ["reward.probe_epsilon=0.2"]),
    "infinite step size": (["data.grid.step_sizes=[inf]"], "data.grid.step_sizes", ["data.grid.step_sizes=[0.05]"]),
    "fractional iterations": (["data.grid.iterations=[2.5]"], "data.grid.iterations", None),
    "momentum 1.5": (["data.optim.momentum=1.5"], "data.optim.momentum", ["data.optim.momentum=0.9"]),
    "negative weight decay": (["data.optim.weight_decay=-1e-4"], "data.optim.weight_decay",
                              ["data.optim.weight_decay=5e-4"]),
    "milestone outside the budget": (["data.optim.milestones=[1.5]"], "data.optim.milestones",
                                     ["data.optim.milestones=[0.5]"]),
    "unknown on_nonfinite": (["on_nonfinite=maybe"], "on_nonfinite", ["on_nonfinite=skip"]),
    "negative eval seed": (["eval.seed=-1"], "eval.seed", ["eval.seed=0"]),  # eval.seed=abc: Hydra's, as batch size
}
IN_CLI = ["lr nan"]
IN_MAIN = list(CATALOG)[:6]  # run.py's whole entry point: IN_CLI in a subprocess, the rest in-process


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """An earlier run in ``runs/``, then the entry-point cases in the same folder."""
    cwd = tmp_path_factory.mktemp("catalog")
    train(settings(cwd / "runs" / "earlier", "data.epochs=1"))
    before = snapshot(cwd / "runs")
    runs = {name: cli(*TINY, *CATALOG[name][0], cwd=cwd) for name in IN_CLI}
    runs |= {name: main_in_process("run", *TINY, *CATALOG[name][0], cwd=cwd) for name in IN_MAIN if name not in IN_CLI}
    return runs, before, cwd


def message(catalog, case: str, tmp_path: Path) -> str:
    """The one error paragraph of a catalog case (from run.py's entry point, or its settings check)."""
    if case in IN_MAIN:
        return error_line(catalog[0][case])
    with pytest.raises(ConfigError) as caught:
        settings_from_config(config(*TINY, *CATALOG[case][0]), tmp_path)
    return "las-at: error: " + " ".join(str(caught.value).split())


@pytest.mark.parametrize("case", IN_MAIN)
def test_bad_input_exits_at_once_with_one_paragraph_and_no_traceback(catalog, case):
    proc = catalog[0][case]
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert proc.cpu_s < LIMIT_S
    assert "Traceback" not in proc.stderr
    error_line(proc)
    assert "epoch 1/" not in proc.stdout


@pytest.mark.parametrize("case", list(CATALOG))
def test_bad_input_message_names_the_key(catalog, case, tmp_path):
    line = message(catalog, case, tmp_path)
    key = CATALOG[case][1]
    assert line.startswith(f"las-at: error: {key}=") or f"Give {key} a writable folder" in line, line
    if case == "negative epochs":
        assert "null" not in line  # "or null for all" was advice that was then rejected


def test_bad_input_changes_no_file_of_an_earlier_run_and_leaves_no_folder(catalog):
    _, before, cwd = catalog
    assert snapshot(cwd / "runs") == before
    assert [p.name for p in (cwd / "runs").iterdir()] == ["earlier"]  # e.g. device=tpu leaves no run folder


@pytest.mark.parametrize("case", [c for c in CATALOG if c != "forbidden hydra.run.dir"])
def test_following_each_suggested_fix_does_not_give_the_same_error(catalog, case, tmp_path):
    args, key, fix = CATALOG[case]
    line = message(catalog, case, tmp_path)
    if fix is None:  # the message's own suggestion, verbatim
        suggested = re.search(r"e\.g\. (\S+=\S+?)[.,]?(?:\s|$)", line)
        assert suggested, line
        fix = [suggested.group(1)]
    assert fix[0].split("=")[0] == key
    try:
        settings_from_config(config(*TINY, *fix), tmp_path)
    except ConfigError as exc:
        assert key not in str(exc), str(exc)


# ----------------------------------------------------------------------------- divergence


def test_lr_1e6_stops_at_once_with_a_failed_record_and_no_poisoned_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc = cli(*TINY, "data.optim.lr=1e6", "data.epochs=3", "data.max_steps_per_epoch=8", f"hydra.run.dir={run_dir}",
               cwd=tmp_path)
    assert proc.returncode == 2 and proc.cpu_s < LIMIT_S
    assert "Traceback" not in proc.stderr
    line = error_line(proc)
    assert "Training diverged" in line and "data.optim.lr=1e+06" in line and "was nan" in line
    assert not (run_dir / "checkpoint.pt").exists()  # epoch 1 never finished: nothing to save
    doc = strict_load(run_dir / "results.json")
    assert doc["status"] == "failed" and doc["failure"]["kind"] == "diverged"
    first, (start, end) = doc["failure"]["first_nonfinite_step"], doc["failure"]["steps"]
    assert start <= first <= end and end - first < 2  # log_every_steps=2: noticed within one interval
    assert "epoch 1/" not in proc.stdout


class Recorder:
    """A tracker that remembers what it was told."""

    info = None

    def __init__(self) -> None:
        self.summaries, self.exit_code = [], None

    def log(self, metrics, step):
        pass

    def log_choices(self, choices, step):
        pass

    def summary(self, values):
        self.summaries.append(dict(values))

    def log_checkpoint(self, path, metadata):
        pass

    def finish(self, exit_code=0):
        self.exit_code = exit_code


def test_divergence_keeps_the_last_finite_checkpoint_which_resumes_once_fixed(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    good = settings(run_dir, "data.epochs=3", "data.max_steps_per_epoch=6", "log_every_steps=4")
    train(good.__class__(**{**vars(good), "stop_after_epochs": 1}))
    saved = (run_dir / "checkpoint.pt").read_bytes()
    # The same run from epoch 2 on with lr 1e6 (same settings hash: as if the schedule blew up).
    bad = settings(run_dir, "data.epochs=3", "data.max_steps_per_epoch=6", "log_every_steps=4", "data.optim.lr=1e6",
                   resume=True, settings_hash=good.settings_hash)
    tracked = Recorder()
    monkeypatch.setattr("experiments.training.loop.make_tracker", lambda *args, **kwargs: tracked)
    with pytest.raises(TrainingDiverged) as caught:
        train(bad)
    monkeypatch.undo()
    assert tracked.summaries[-1]["status"] == "failed" and tracked.exit_code == 1  # W&B: the run failed
    exc = caught.value
    assert exc.epoch == 2 and exc.first_step is not None and 7 <= exc.first_step <= exc.steps[1]
    assert exc.steps[1] - exc.first_step < 4  # within one logging interval (log_every_steps=4)
    assert (run_dir / "checkpoint.pt").read_bytes() == saved  # never overwritten by a poisoned state
    assert f"init_from={run_dir}" in str(exc) and "epoch 1 of 3" in str(exc)
    assert strict_load(run_dir / "results.json")["status"] == "failed"
    assert not (run_dir / "run.lock").exists()
    # What the message says to do: the fixed command with init_from= (a folder of its own).
    fixed = train(settings(tmp_path / "fixed", "data.epochs=3", "data.max_steps_per_epoch=6",
                           "data.optim.lr=0.02", init_from=run_dir))
    assert fixed.completed and [h["epoch"] for h in fixed.history] == [1, 2, 3]
    assert load_checkpoint(tmp_path / "fixed")["loop"]["init_from"]["epochs_done"] == 1
    # And the checkpoint itself still resumes with the run's own settings.
    assert train(settings(run_dir, "data.epochs=3", "data.max_steps_per_epoch=6", "log_every_steps=4",
                          resume=True)).completed


def test_init_from_refuses_a_run_of_another_shape(tmp_path):
    train(settings(tmp_path / "a", stop_after_epochs=1))
    with pytest.raises(ConfigError, match=r"init_from=.*data\.batch_size"):
        train(settings(tmp_path / "b", "data.batch_size=16", init_from=tmp_path / "a"))


@pytest.fixture
def poisoned_digits(digits):
    """Digits whose training images 0..99 hold a NaN pixel: their batches have NaN gradients."""
    x = digits.x_train.clone()
    x[:100, :, 0, 0] = math.nan
    return digits.__class__(**{**vars(digits), "x_train": x})


def test_skip_mode_drops_non_finite_batches_counts_them_and_keeps_the_weights_finite(tmp_path, poisoned_digits):
    over = ["agent=fixed", "data.max_steps_per_epoch=null", "data.epochs=1", "data.batch_size=128"]
    over = [o for o in over]
    tiny = [a for a in TINY if not a.startswith("agent.k")]
    cfg = config(*tiny, *over, "on_nonfinite=skip")
    s = settings_from_config(cfg, tmp_path / "skip", settings_hash=settings_hash(cfg))
    result = train(s, data=poisoned_digits)
    skipped = result.history[0]["train"][SKIPPED]
    assert 1 <= skipped <= 10  # 10 batches of 128, 100 poisoned images among 1347
    assert all(torch.isfinite(v).all() for v in load_checkpoint(tmp_path / "skip")["target"].values())
    cfg = config(*tiny, *over)
    with pytest.raises(TrainingDiverged, match="gradient"):
        train(settings_from_config(cfg, tmp_path / "stop", settings_hash=settings_hash(cfg)), data=poisoned_digits)


def test_guard_gradient_norm_is_the_global_l2_norm_and_skip_zeroes_the_gradient():
    class Game:  # the attributes of LASGame the guard reads
        device = torch.device("cpu")
        step_index = 0

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.0, weight_decay=0.0)
    game = Game()
    game.trainer = type("T", (), {"optimizer": opt})()
    guard = DivergenceGuard(game, "skip")
    model(torch.randn(5, 4)).square().sum().backward()
    expected = math.sqrt(sum(float(p.grad.square().sum()) for p in model.parameters()))
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert float(guard._grad_norm) == pytest.approx(expected, rel=1e-6)
    assert float(guard._skipped) == 0.0 and any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    opt.zero_grad()
    model(torch.full((5, 4), math.nan)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert float(guard._skipped) == 1.0 and math.isnan(float(guard._grad_norm))
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))  # no momentum, no decay: unchanged
    guard.close()


# ----------------------------------------------------------------------------- one run per folder


@pytest.mark.slow
def test_a_second_run_and_a_live_resume_are_refused_and_a_dead_owners_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY, "data.epochs=200", "data.max_steps_per_epoch=10", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    first = subprocess.Popen([*RUN, *args], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run_dir / "checkpoint.pt").is_file():  # it holds the lock and has trained an epoch
            assert first.poll() is None and time.time() < deadline, "the first run ended or never started"
            time.sleep(0.2)
        record = snapshot(run_dir / ".hydra")
        # In this process (a start-up less): the owner is the other process all the same.
        again = main_in_process("run", *args, cwd=tmp_path)
        live_resume = main_in_process("run", *args, "resume=true", cwd=tmp_path)
        assert snapshot(run_dir / ".hydra") == record  # Hydra's record of the live run is left alone
        for proc in (again, live_resume):
            assert proc.returncode == 1 and proc.cpu_s < LIMIT_S and "Traceback" not in proc.stderr
            assert f"in use by process {first.pid}" in error_line(proc)
            assert "epoch 1/" not in proc.stdout
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (run_dir / "run.lock").exists()  # left by the killed owner
    tmp = run_dir / ".checkpoint.pt.abcd1234.tmp"  # as a write killed mid-way leaves it
    tmp.write_bytes(b"x" * 1000)
    # Following the advice once the owner is gone: the same command with resume=true.
    resumed = train(settings(run_dir, "data.epochs=200", "data.max_steps_per_epoch=10", resume=True,
                             stop_after_epochs=1))  # in-process: the same code, one start-up less
    assert resumed.epochs_done >= 2
    log = (run_dir / "log.txt").read_text()
    # Ours, plus the owner's own when the kill landed inside one of its checkpoint writes.
    assert "Took over the lock" in log and re.search(r"Removed [12] temporary file", log)
    assert not tmp.exists() and not list(run_dir.glob(".*.tmp")) and not (run_dir / "run.lock").exists()


def test_lock_records_its_owner_and_refuses_a_second_holder(tmp_path):
    with RunLock.acquire(tmp_path) as lock:
        owner = json.loads(lock.path.read_text())
        assert owner["pid"] == os.getpid() and owner["host"] and owner["started"]
        with pytest.raises(ConfigError, match=f"in use by process {os.getpid()}"):
            RunLock.acquire(tmp_path)
    assert not (tmp_path / "run.lock").exists()
    (tmp_path / "run.lock").write_text(json.dumps({"pid": 2**22 + 12345, "host": "elsewhere", "started": "then"}))
    with RunLock.acquire(tmp_path) as lock:  # nobody holds it: stale
        assert lock.took_over["started"] == "then"


# ----------------------------------------------------------------------------- damaged checkpoints


def test_damaged_checkpoint_is_named_and_the_previous_one_resumes(tmp_path):
    run_dir = tmp_path / "run"
    train(settings(run_dir, "data.epochs=3", stop_after_epochs=2))
    ckpt, prev = run_dir / "checkpoint.pt", run_dir / "checkpoint.prev.pt"
    assert load_checkpoint(prev)["meta"]["epochs_done"] == 1 and load_checkpoint(ckpt)["meta"]["epochs_done"] == 2
    ckpt.write_bytes(ckpt.read_bytes()[:5000])  # truncated
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    plain = main_in_process("run", *TINY, "data.epochs=3", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    evaluated = main_in_process("evaluate", f"checkpoint={tmp_path / 'notes.pt'}", "attacks=[clean]", cwd=tmp_path)
    assert plain.returncode == 1 and plain.cpu_s < LIMIT_S and "Traceback" not in plain.stderr
    line = error_line(plain)
    assert str(ckpt) in line and "damaged" in line and "resume=true" in line
    assert evaluated.returncode == 1 and "Traceback" not in evaluated.stderr
    assert "notes.pt is not a LAS-AT checkpoint: it is not a file torch.save writes" in evaluated.stderr
    # The advice: resume=true continues from the previous checkpoint.
    resumed = train(settings(run_dir, "data.epochs=3", resume=True))
    assert resumed.completed and [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert "resuming from checkpoint.prev.pt (epoch 1)" in (run_dir / "log.txt").read_text()
    assert (run_dir / "checkpoint.damaged.pt").is_file()
    assert [h["epoch"] for h in strict_load(run_dir / "metrics.json")["history"]] == [1, 2, 3]


def test_damaged_checkpoint_without_a_previous_one_says_start_over_and_that_works(tmp_path):
    run_dir = tmp_path / "run"
    train(settings(run_dir, "data.epochs=1"))
    ckpt = run_dir / "checkpoint.pt"
    assert not (run_dir / "checkpoint.prev.pt").exists()
    ckpt.write_bytes(b"")
    proc = main_in_process("run", *TINY, "data.epochs=1", "resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    line = error_line(proc)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "0 bytes; EOFError" in line
    assert f"delete {ckpt}" in line
    ckpt.unlink()  # the advice
    assert train(settings(run_dir, "data.epochs=1", resume=True)).completed


def test_a_foreign_checkpoint_gets_advice_that_works(tmp_path):
    a = train(settings(tmp_path / "a", "data.epochs=1"))
    s_b = settings(tmp_path / "b", "data.epochs=1", "seed=1")
    (tmp_path / "b").mkdir()
    shutil.copy(a.run_dir / "checkpoint.pt", tmp_path / "b" / "checkpoint.pt")
    with pytest.raises(ConfigError, match="other settings") as caught:
        train(s_b)
    assert "resume=" not in str(caught.value)  # resume=<dir> would meet the same mismatch
    assert "delete" not in str(caught.value)  # a checkpoint of another run: moved, never deleted
    shutil.move(tmp_path / "b" / "checkpoint.pt", tmp_path / "a-checkpoint.pt")  # the advice
    assert train(s_b).completed


def test_the_new_keys_at_their_defaults_keep_earlier_runs_in_their_folders():
    base = settings_hash(config())
    assert settings_hash(config("on_nonfinite=stop", "init_from=null")) == base
    assert settings_hash(config("on_nonfinite=skip")) != base
    assert settings_hash(config("init_from=runs/x")) != base


def test_checkpoint_rotation_is_atomic_and_files_get_the_usual_mode(tmp_path):
    path = tmp_path / "checkpoint.pt"
    for n in range(3):
        atomic_save({"format": "las-at/v1", "n": n}, path, keep_previous=True)
    assert load_checkpoint(path)["n"] == 2 and load_checkpoint(tmp_path / "checkpoint.prev.pt")["n"] == 1
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    path.write_bytes(b"\x00" * 10)
    with pytest.raises(CorruptCheckpointError, match="checkpoint.prev.pt"):
        load_checkpoint(path)


def test_a_checkpoint_cut_anywhere_is_reported_as_damaged(tmp_path):
    path = tmp_path / "checkpoint.pt"
    atomic_save({"format": "las-at/v1", "w": torch.randn(500), "meta": {"epochs_done": 1}}, path)
    whole = path.read_bytes()
    for cut in [*range(0, len(whole), 61), len(whole) - 1]:
        path.write_bytes(whole[:cut])
        with pytest.raises(CorruptCheckpointError, match=f"{cut} bytes"):
            load_checkpoint(path)


def test_stale_temporaries_of_dead_writers_only(tmp_path):
    mine = tmp_path / f".evaluation.json.{os.getpid()}.tabc.tmp"
    dead = tmp_path / ".evaluation.json.4194999.t12.tmp"
    for p in (mine, dead):
        p.write_text("x")
    assert stale_temp_files(tmp_path) == [dead]
    assert sorted(stale_temp_files(tmp_path, any_writer=True)) == sorted([mine, dead])


# ----------------------------------------------------------------------------- strict JSON


def test_strict_json_writes_null_and_lists_what_was_not_finite(tmp_path):
    doc = {"a": math.nan, "b": [1.5, math.inf], "c/d": {"e": -math.inf}, "f": None, "g": 2}
    clean, found = strict_json(doc)
    assert clean == {"a": None, "b": [1.5, None], "c/d": {"e": None}, "f": None, "g": 2}
    assert found == {"/a": "nan", "/b/1": "inf", "/c~1d/e": "-inf"}
    write_json(tmp_path / "x.json", doc)
    back = strict_load(tmp_path / "x.json")
    assert back[NONFINITE_KEY] == found and back["f"] is None
    write_json(tmp_path / "y.json", {"a": 1.0})
    assert NONFINITE_KEY not in strict_load(tmp_path / "y.json")


def test_online_wandb_says_at_once_that_it_is_connecting(tmp_path, monkeypatch, capsys):
    wandb = pytest.importorskip("wandb")
    from experiments.tracking.loggers import WandbTracker
    from experiments.config.settings import LoggerSettings

    def no_network(**kwargs):
        raise TimeoutError("no network")

    monkeypatch.setattr(wandb, "init", no_network)
    with pytest.raises(ConfigError, match="logger.mode=offline"):
        WandbTracker(LoggerSettings(name="wandb", mode="online"), tmp_path, {})
    assert "connecting to W&B online" in capsys.readouterr().err
