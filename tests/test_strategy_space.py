"""The strategy space as named columns: index <-> value conversion against enumeration, and a toy
fourth column that only the grid config adds, played by a custom agent and carried through the env's
info, the loop's choice counts and results.json, the plots and the compare report, with no edit to
agents, env, loop, compare or plots."""

from __future__ import annotations

import itertools
import json
from typing import Any

import matplotlib.axes
import pytest
import torch
from test_run import TINY, config

from agents.base import AgentSpec
from experiments import compare
from experiments.training.loop import train
from experiments.runfolder.rundir import settings_hash
from experiments.config.settings import settings_from_config
from las_env import LASEnv, StrategySpace
from las_env.datasets import lookup
from las_env.validate import SettingError

DIGITS_GRID = lookup("digits").grid
TOY = (0.5, 1.0, 2.0)
TOY_SPACE = StrategySpace(step_sizes=(0.05, 0.1), iterations=(1, 3, 5), epsilons=(0.1, 0.2), extra={"toy_gain": TOY})


@pytest.mark.parametrize("space", [DIGITS_GRID, TOY_SPACE], ids=["digits", "toy"])
def test_lookup_and_decode_agree_with_enumerating_every_action(space):
    rows = list(itertools.product(*(range(n) for n in space.nvec)))
    assert len(rows) == torch.tensor(space.nvec).prod().item()
    got = space.lookup("cpu")(torch.tensor(rows))
    assert list(got) == list(space.columns)
    assert got["iterations"].dtype == torch.long
    assert all(v.is_contiguous() for v in got.values())  # as a per-column table lookup gives them
    for j, (name, table) in enumerate(space.values.items()):
        want = torch.tensor([table[r[j]] for r in rows], dtype=got[name].dtype)
        torch.testing.assert_close(got[name], want, rtol=0, atol=0)
    for r in rows:
        values = space.decode(r)
        assert space.index_of(**values) == r  # tables hold distinct values: exact round trip
        assert space.index_of(*values.values()) == r


def test_columns_shape_and_nearest_index_by_name():
    assert TOY_SPACE.columns == ("step_size", "iterations", "epsilon", "toy_gain")
    assert TOY_SPACE.nvec == (2, 3, 2, 3) and TOY_SPACE.column("toy_gain") == 3
    assert TOY_SPACE.action_space(5).shape == (5, 4)
    assert TOY_SPACE.index_of(toy_gain=1.4, epsilon=0.01) == (1, 0)  # nearest values, in the order asked
    with pytest.raises(KeyError, match="toy_gain"):
        DIGITS_GRID.index_of(toy_gain=1.0)
    with pytest.raises(SettingError, match="name of its own"):
        StrategySpace((0.1,), (1,), (0.1,), extra={"epsilon": (0.2,)})
    assert StrategySpace.from_config({"step_sizes": [0.1], "iterations": [1], "epsilons": ["8/255"],
                                      "extra": {"toy_gain": {"start": 1, "stop": 3}}}).values["toy_gain"] == (1, 2, 3)


def test_a_column_no_method_reads_is_carried_one_a_method_reads_but_this_one_does_not_is_refused(digits):
    env = LASEnv(data=digits, tensor_api=True, batch_size=6, epochs=1, max_steps_per_epoch=2, grid=TOY_SPACE)
    env.reset(seed=0)
    action = torch.tensor([[0, 0, 1, i % 3] for i in range(6)])
    _, _, _, _, info = env.step(action)
    torch.testing.assert_close(info["toy_gain"], torch.tensor([TOY[i % 3] for i in range(6)]))
    torch.testing.assert_close(info["epsilon"], torch.full((6,), 0.2))
    with pytest.raises(ValueError, match="rename the column"):
        LASEnv(data=digits, batch_size=6, grid=StrategySpace((0.05,), (1,), (0.2,), extra={"labels": (1.0,)}))
    beta = StrategySpace((0.05,), (1,), (0.2,), extra={"trades_beta": (6.0,)})
    with pytest.raises(SettingError, match="method=trades"):
        LASEnv(data=digits, batch_size=6, grid=beta, method="pgd_at")


def test_agent_spec_from_the_game_carries_its_k_and_threat_model(digits):
    env = LASEnv(data=digits, tensor_api=True, batch_size=8, epochs=2, max_steps_per_epoch=3, grid=TOY_SPACE,
                 reward_interval=3)
    spec = AgentSpec.from_game(env, seed=7)
    assert spec == AgentSpec(grid=TOY_SPACE, observation_shape=(8, 1, 8, 8), num_classes=10, dataset="digits",
                             device=torch.device("cpu"), total_steps=6, steps_per_epoch=3, seed=7, reward_interval=3,
                             threat=env.game.threat, train_images=digits.x_train.shape[0])
    assert [env.game.is_reward_step(s) for s in range(6)] == [False, False, True, False, False, True]


class ToyGainAgent:
    """Plays the smallest attack, and toy_gain value ``i % n`` for image ``i``; it only knows the column's
    name, asked from the space (what a user's agent with its own knob does)."""

    def __init__(self, spec: AgentSpec) -> None:
        space = spec.grid
        b = spec.observation_shape[0]
        self.action = torch.zeros((b, len(space.columns)), dtype=torch.long, device=spec.device)
        self.action[:, space.column("toy_gain")] = torch.arange(b) % space.nvec[space.column("toy_gain")]

    def act(self, observation: torch.Tensor, info: dict[str, Any]) -> torch.Tensor:
        return self.action

    def learn(self, reward: torch.Tensor, info: dict[str, Any]) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@pytest.mark.slow
def test_a_toy_fourth_column_from_the_grid_config_reaches_results_plots_and_the_report(tmp_path, monkeypatch):
    titles: list[str] = []
    real = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda ax, label, *a, **kw: titles.append(label)
                        or real(ax, label, *a, **kw))
    tiny = [a for a in TINY if not a.startswith("agent.k")]
    cfg = config(*tiny, "agent=custom", "agent._target_=test_strategy_space.ToyGainAgent", "agent.name=toy",
                 "+data.grid.extra.toy_gain=[0.5,1,2]")
    run_dir = tmp_path / "runs" / "toy"
    result = train(settings_from_config(cfg, run_dir, settings_hash=settings_hash(cfg)))
    assert result.completed

    doc = json.loads((run_dir / "results.json").read_text())
    batch, steps = 32, 4
    per_epoch = [sum(1 for i in range(batch) if i % 3 == v) * steps for v in range(3)]  # [11, 11, 10] * 4
    for h in doc["history"]:
        assert h["choices"]["toy_gain"] == per_epoch
        assert h["choices"]["epsilon"][0] == batch * steps
    assert "chosen toy_gain" in titles  # choices.png has a panel for it
    assert (run_dir / "choices.png").stat().st_size > 10_000

    assert compare.main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert '"toy_gain": [0.5, 1.0, 2.0]' in report
