"""A user's own agent (examples/custom_agent.py), written outside the package: (a) driven by a
plain Gymnasium loop, (b) driven by experiments/run.py through ``agent._target_``.

Tiny budgets (digits, a few steps of 16-32 images).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from test_run import TINY, cli, config
from tests.conftest import main_in_process

from agents.base import Agent, AgentSpec
from experiments.training.loop import train
from experiments.runfolder.rundir import settings_hash
from experiments.config.settings import settings_from_config
from las_env.datasets.registry import lookup

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `examples` is not an installed package: import it from the checkout
    sys.path.insert(0, str(REPO))

from examples.custom_agent import EpsilonGreedyBandit, main  # noqa: E402

TARGET = "examples.custom_agent.EpsilonGreedyBandit"
# The runner's tiny budget without agent.k (agent=custom lists no settings: they take a "+").
RUNNER_TINY = [a for a in TINY if not a.startswith("agent.k")]


@pytest.fixture(autouse=True)
def _restore_threads():
    # main() and the runner set torch's thread count (digits: 1); give the session its own back.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _spec(batch: int = 8, seed: int = 0) -> AgentSpec:
    return AgentSpec(grid=lookup("digits").grid, observation_shape=(batch, 1, 8, 8), num_classes=10, dataset="digits",
                     device=torch.device("cpu"), total_steps=20, steps_per_epoch=10, seed=seed)


def test_the_example_agent_implements_the_protocol_and_resumes_exactly():
    agent = EpsilonGreedyBandit(_spec(), explore=0.5)
    assert isinstance(agent, Agent)
    obs = torch.rand(8, 1, 8, 8)
    grid = lookup("digits").grid
    for _ in range(3):  # a few reward steps
        action = agent.act(obs, {"reward_next_step": True})
        assert action.shape == (8, 3) and action.dtype == torch.long
        assert (action >= 0).all() and (action < torch.tensor(grid.nvec)).all()
        metrics = agent.learn(torch.tensor(1.0), {"reward_computed": True, "rewards": torch.rand(8)})
        assert set(metrics) == {"best_epsilon", "reward_mean"}
    # Step size and iterations stay the data set's PGD-AT values; only epsilon varies.
    assert set(action[:, 0].tolist()) == {grid.step_sizes.index(0.05)}
    assert set(action[:, 1].tolist()) == {grid.iterations.index(5)}
    # A non-reward step teaches nothing.
    agent.act(obs, {"reward_next_step": False})
    assert agent.learn(torch.tensor(0.0), {"reward_computed": False}) == {}

    state = {k: v.clone() for k, v in agent.state_dict().items()}
    expected = [agent.act(obs, {}) for _ in range(3)]
    resumed = EpsilonGreedyBandit(_spec(seed=7), explore=0.5)  # another seed: the state decides
    resumed.load_state_dict(state)
    assert all(torch.equal(a, resumed.act(obs, {})) for a in expected)


def test_plain_gymnasium_loop(capsys):
    out = main(["--epochs", "2", "--steps-per-epoch", "3", "--batch-size", "16", "--k", "2", "--test-images", "32"])
    assert out["steps"] == 6
    assert out["updates"] == 3  # learned on every 2nd step, exactly the steps that carried the reward
    assert len(out["best_epsilon_per_epoch"]) == 2
    assert out["agent"].counts.sum() > 0
    assert 0.0 <= out["robust"] <= out["clean"] <= 1.0
    printed = capsys.readouterr().out
    assert "epoch 2: 6 steps, 3 bandit updates" in printed and "test accuracy on 32 images" in printed


def test_runner_builds_the_example_from_its_dotted_path(tmp_path):
    cfg = config(*RUNNER_TINY, "agent=custom", f"agent._target_={TARGET}", "agent.name=bandit", "+agent.k=2",
                 "+agent.explore=0.5", "data.epochs=2")
    result = train(settings_from_config(cfg, tmp_path, settings_hash=settings_hash(cfg)))
    assert result.completed
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    for h in history:
        # The bandit plays one step size and one iteration count, and varies epsilon.
        assert sum(c > 0 for c in h["choices"]["step_size"]) == 1
        assert sum(c > 0 for c in h["choices"]["iterations"]) == 1
        assert "agent/best_epsilon" in h["train"]  # what learn() returned is logged


def test_command_line_runs_the_example_from_any_directory(tmp_path):
    # cwd is NOT the repository: run.py itself puts the repository root on sys.path.
    proc = cli("agent=custom", f"agent._target_={TARGET}", "agent.name=bandit", "+agent.k=2",
               "+agent.explore=0.3", "data.epochs=1", *RUNNER_TINY, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bandit agent" in proc.stdout and "Robustness evaluation" in proc.stdout
    (run_dir,) = tmp_path.glob("runs/digits/bandit/*")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["agent"] == "bandit"
    assert results["config"]["agent"]["_target_"] == TARGET

    bad = main_in_process("run", "agent=custom", f"agent._target_={TARGET}", "+agent.explore=2", *RUNNER_TINY,
                          cwd=tmp_path)  # in this process: a start-up less
    assert bad.returncode == 1 and "explore must be in [0, 1]" in bad.stderr and "Traceback" not in bad.stderr
