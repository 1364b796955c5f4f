"""The main job (experiments/run.py + experiments/training/loop.py): resume equivalence, atomic
checkpoints, bad input, multirun folders, W&B offline, a user's own agent.

Budgets are tiny (digits, a few steps per epoch); the command-line tests run in subprocesses,
in parallel, since most of their time is the Python/torch start-up.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from experiments.config.errors import ConfigError
from experiments.training.loop import train
from experiments.runfolder.rundir import settings_hash
from experiments.config.settings import settings_from_config
from las_env.checkpoint import load_checkpoint
from las_env.strategy_space import StrategySpace
from las_env.datasets.registry import lookup
from tests.conftest import main_in_process

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "experiments" / "conf"
RUN = [sys.executable, str(REPO / "experiments" / "run.py")]

# A tiny budget: 3 epochs x 4 steps of 32 digits, evaluation on 32/32/64 images.
TINY = [
    "data.epochs=3", "data.max_steps_per_epoch=4", "data.batch_size=32",
    "eval.test_subset=32", "eval.train_subset=32", "eval.final_n=64", "eval.final_attacks=[clean,pgd5]",
    "eval.pgd_iterations=3", "agent.k=2", "logger=none", "progress=false", "log_every_steps=3",
]


@pytest.fixture(autouse=True)
def _one_thread():
    # The runs set torch's thread count (digits: 1); give the rest of the session its own back.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def settings(run_dir: Path, *overrides: str, **changes):
    cfg = config(*TINY, *overrides)
    s = settings_from_config(cfg, run_dir, settings_hash=settings_hash(cfg))
    for k, v in changes.items():
        setattr(s, k, v)
    return s


def cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([*RUN, *args], cwd=cwd, capture_output=True, text=True, env=full_env, timeout=300)


# ----------------------------------------------------------------------------- resume


class Crash(Exception):
    """Stands in for the process being killed."""


def test_resumed_run_ends_with_exactly_the_metrics_of_an_uninterrupted_one(tmp_path):
    whole = train(settings(tmp_path / "whole"))
    assert whole.completed and whole.epochs_done == 3

    # Stopped cleanly after epoch 1 (as a preemption would), then resumed.
    stopped = train(settings(tmp_path / "stopped", stop_after_epochs=1))
    assert not stopped.completed and stopped.epochs_done == 1
    resumed = train(settings(tmp_path / "stopped", resume=True))
    assert resumed.completed

    # Crashed in the middle of epoch 2 (its work is lost), then resumed from epoch 1's checkpoint.
    crash_dir = tmp_path / "crashed"
    s = settings(crash_dir)
    build = s.agent

    def crashing_agent(spec):
        agent = build(spec)
        learn, calls = agent.learn, [0]

        def learn_then_die(reward, info):
            calls[0] += 1
            if calls[0] == 6:  # step 6 of 12: inside epoch 2
                raise Crash
            return learn(reward, info)

        agent.learn = learn_then_die
        return agent

    s.agent = crashing_agent
    with pytest.raises(Crash):
        train(s)
    assert load_checkpoint(crash_dir)["loop"]["epochs_done"] == 1
    crashed = train(settings(crash_dir, resume=True))

    reference = (tmp_path / "whole" / "metrics.json").read_bytes()
    for run in (resumed, crashed):
        assert (run.run_dir / "metrics.json").read_bytes() == reference
        a = torch.load(whole.run_dir / "target_state_dict.pt")
        b = torch.load(run.run_dir / "target_state_dict.pt")
        assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = json.loads(reference)
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    assert {r["name"] for r in metrics["final"]} == {"clean", "pgd5"}


def test_rerun_without_resume_refuses_to_overwrite(tmp_path):
    train(settings(tmp_path, stop_after_epochs=1))
    with pytest.raises(ConfigError, match="resume=true"):
        train(settings(tmp_path))


def test_crash_while_saving_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    train(settings(tmp_path, stop_after_epochs=1))
    before = load_checkpoint(tmp_path)
    real_save = torch.save

    def torn_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")  # a partial write, then the crash
        raise Crash

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(Crash):
        train(settings(tmp_path, resume=True))
    monkeypatch.setattr(torch, "save", real_save)
    after = load_checkpoint(tmp_path)
    assert after["loop"]["epochs_done"] == 1
    assert all(torch.equal(before["target"][k], after["target"][k]) for k in before["target"])
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    # The checkpoint carries what docs/architecture.md promises.
    assert {"dataset", "data_root", "model", "in_channels", "num_classes", "run_dir", "wandb"} <= set(after["meta"])
    assert {"env", "agent", "loop", "target", "config"} <= set(after)


# ----------------------------------------------------------------------------- settings


def test_settings_hash_separates_runs_that_differ_in_any_setting():
    base = settings_hash(config())
    assert settings_hash(config("agent=reinforce")) == base  # the default, spelled out
    assert settings_hash(config("resume=true", "progress=false")) == base  # run controls only
    assert settings_hash(config("agent.k=7")) != base
    assert settings_hash(config("reward.alpha=3")) != base
    assert settings_hash(config("seed=1")) != base


@pytest.mark.parametrize("name", ["digits", "cifar10", "cifar100", "svhn", "gtsrb", "tiny_imagenet"])
def test_data_configs_resolve_to_the_default_grids(name, tmp_path):
    # The YAML leaves the grid to the registry (null); the settings, and the config a run records,
    # hold the registry's grid.
    s = settings_from_config(config(f"data={name}"), tmp_path)
    key = s.env.dataset
    assert s.env.grid == lookup(key).grid
    assert StrategySpace.from_config(s.config["data"]["grid"]) == lookup(key).grid


SECTION_7_EPOCHS = {"cifar10_wrn34_10_las_trades": 100, "cifar10_wrn34_10_trades": 100,
                    "cifar10_wrn34_10_las_awp": 200, "cifar10_wrn34_10_awp": 200}


def test_paper_presets_compose_and_validate(tmp_path):
    for preset in sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")):
        cfg = config(f"experiment={preset}", "device=cpu", "logger=none")
        s = settings_from_config(cfg, tmp_path)
        epochs = SECTION_7_EPOCHS.get(preset, 110)  # LAS-TRADES / LAS-AWP and their baselines: SPEC section 7
        assert s.env.epochs == epochs and s.env.batch_size == 128 and s.env.optim.lr == 0.1
        if "lasat" in preset:
            assert s.env.reward.w_hat == "deepcopy" and cfg.agent.credit == "paper" and cfg.agent.k in (1, 20, 40)
            assert s.env.optim.true_class_prob in (0.6, 0.7, 0.8) and s.env.optim.label_smoothing == 0


# ----------------------------------------------------------------------------- command line


# The list, end to end through run.py's entry point: two in a subprocess (a Hydra failure,
# a data set that cannot be loaded), the others in-process (tests/conftest.py).
BAD_INPUTS = {
    "unknown agent": (["agent=nope"], "Unknown agent option 'nope'"),
    "empty grid": (["data.grid.epsilons=[]"], "empty"),
    "k < 1": (["agent.k=0"], "agent.k=0"),
    "missing data folder": (["data=cifar10", "data.root=does/not/exist"], "cifar-10-batches-py"),
    "unwritable output dir": (["run_root=not_a_dir.txt/runs"], "cannot be written"),
}
IN_CLI = ["missing data folder"]  # one real process; the rest run.py's entry point in this one


@pytest.mark.parametrize("overrides, expected", [
    (["model.name=resnet7"], "resnet7"),
    (["data.grid.step_sizes=[-0.1,0.1]"], "non-positive"),
    (["agent=custom"], "agent._target_"),
    (["agent=custom", "agent._target_=no_such_module.Agent"], "cannot be imported"),
    (["agent=fixed", "+agent.lr=3"], "does not accept"),
    (["eval.final_attacks=[deepfool]"], "Unknown attack"),
    (["reward.measure=vibes"], "reward.measure"),
])
def test_bad_settings_are_reported_before_anything_is_loaded(tmp_path, overrides, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        settings_from_config(config(*overrides), tmp_path)


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("bad")
    (cwd / "not_a_dir.txt").write_text("a file where a folder is expected")
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(cli, *BAD_INPUTS[name][0], "logger=none", cwd=cwd) for name in IN_CLI}
        runs = {name: f.result() for name, f in futures.items()}
    runs |= {name: main_in_process("run", *args, "logger=none", cwd=cwd)
             for name, (args, _) in BAD_INPUTS.items() if name not in IN_CLI}
    return runs, cwd


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_paragraph_and_a_nonzero_exit(bad_input_runs, case):
    runs, cwd = bad_input_runs
    proc = runs[case]
    expected = BAD_INPUTS[case][1]
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("las-at: error:")]
    assert len(errors) == 1, proc.stderr
    assert expected in errors[0], errors[0]
    assert "epoch 1/" not in proc.stdout  # nothing trained
    assert not list(cwd.glob("runs/**/checkpoint.pt"))


@pytest.mark.slow
def test_multirun_gives_each_run_its_own_folder_and_a_user_agent_runs_from_the_command_line(tmp_path):
    # A user's agent in the directory the command runs from, not in the package.
    (tmp_path / "my_agents.py").write_text(textwrap.dedent('''
        import torch

        class LargestEpsilon:
            """Always the largest epsilon, the smallest step and iteration count."""

            def __init__(self, spec, *, column_two=None):
                self.reward_interval = 1
                n = spec.grid.nvec[2] - 1 if column_two is None else column_two
                self.action = torch.tensor([0, 0, n], device=spec.device).repeat(spec.observation_shape[0], 1)

            def act(self, observation, info):
                return self.action

            def learn(self, reward, info):
                return {"seen_reward": reward}

            def state_dict(self):
                return {}

            def load_state_dict(self, state):
                pass
    '''))
    tiny = [a for a in TINY if not a.startswith(("agent.k", "data.epochs"))] + ["data.epochs=1"]  # three trainings
    # The scripts run as __main__ in this process (tests/conftest.py): test_safety runs multiruns and
    # test_custom_agent a user's agent in real processes.
    multi = main_in_process("run", "-m", "agent=fixed,random", *tiny, cwd=tmp_path)
    assert multi.returncode == 0, multi.stderr[-3000:]
    dirs = sorted(p.parent for p in tmp_path.glob("runs/digits/*/*/metrics.json"))
    assert [d.parent.name for d in dirs] == ["fixed", "random"]
    assert len({d.name for d in dirs}) == 2
    assert len(list(tmp_path.glob("runs/multiruns/*/multirun.yaml"))) == 1  # the sweep's record, its own folder

    try:
        user = main_in_process("run", "agent=custom", "agent._target_=my_agents.LargestEpsilon", "+agent.column_two=5",
                               *tiny, cwd=tmp_path)
    finally:
        sys.modules.pop("my_agents", None)  # imported from tmp_path: no other test may find it
    assert user.returncode == 0, user.stderr[-3000:]
    assert "Robustness evaluation" in user.stdout and "PGD-5" in user.stdout
    (run_dir,) = tmp_path.glob("runs/digits/custom/*")
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert all(h["choices"]["epsilon"][-1] == sum(h["choices"]["epsilon"]) for h in history)

    again = main_in_process("run", "agent=fixed", *tiny, cwd=tmp_path)  # same settings as a multirun job: its folder
    assert again.returncode == 1 and "resume=true" in again.stderr and "Traceback" not in again.stderr
    resumed = main_in_process("run", "agent=fixed", *tiny, "resume=true", cwd=tmp_path)  # finished: re-prints the table
    assert resumed.returncode == 0 and "Robustness evaluation" in resumed.stdout


# ----------------------------------------------------------------------------- W&B


def test_wandb_offline_writes_a_syncable_run_and_records_its_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # this test only: never online
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-default"))
    result = train(settings(tmp_path / "run", "logger=wandb", "data.epochs=1"))
    offline = result.wandb_offline_dir
    assert offline is not None and offline.parent == tmp_path / "run" / "wandb"
    assert list(offline.glob("run-*.wandb")), list(offline.iterdir())
    meta = load_checkpoint(tmp_path / "run")["meta"]["wandb"]
    assert meta["mode"] == "offline" and offline.name.endswith(meta["id"])
    assert f"wandb sync {offline.parent}/offline-run-*" in (tmp_path / "run" / "results.md").read_text()
