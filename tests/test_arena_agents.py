"""The literature's adaptive strategies as agents (CAT, IAAT, FAT, the Exp3 bandit), each against a
toy game whose outcome its rule fixes, and what they need from the env: ``info["next_indices"]``,
the ``early_stop_tau`` column in the training attack and the attack cost the step reports."""

from __future__ import annotations

import io
import json

import pytest
import torch

from agents.bandit import Exp3Agent, exp3_gamma
from agents.base import AgentSpec
from agents.baselines import FixedAgent
from agents.curriculum import CurriculumAgent
from agents.friendly import FriendlyAgent
from agents.instance_adaptive import InstanceAdaptiveAgent
from las_env import LASEnv
from las_env.datasets.registry import lookup
from las_env.strategy_space import StrategySpace
from las_env.validate import SettingError
from tests.conftest import main_in_process

DIGITS = lookup("digits")
TAU_GRID = StrategySpace(DIGITS.grid.step_sizes, DIGITS.grid.iterations, DIGITS.grid.epsilons,
                         extra={"early_stop_tau": (0, 1, 2)})


def spec(grid=DIGITS.grid, *, batch=4, epochs=10, steps_per_epoch=2, k=None, train_images=8) -> AgentSpec:
    return AgentSpec(grid=grid, observation_shape=(batch, 1, 8, 8), num_classes=10, dataset="digits",
                     device=torch.device("cpu"), total_steps=epochs * steps_per_epoch,
                     steps_per_epoch=steps_per_epoch, reward_interval=k, threat=DIGITS.threat,
                     train_images=train_images)


def play(agent, indices, correct, *, next_indices=None, reward=0.0, reward_computed=False):
    """One scripted step: act on ``indices``, learn that each image withstood its attack or not."""
    obs = torch.zeros(len(indices), 1, 8, 8)
    idx = torch.tensor(indices)
    action = agent.act(obs, {"next_indices": idx})
    agent.learn(torch.tensor(reward), {"indices": idx, "adv_correct": torch.tensor(correct),
                                       "reward_computed": reward_computed})
    return action


def roundtrip(state):
    """A state as a checkpoint gives it back (torch.save / torch.load(weights_only=True))."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ----------------------------------------------------------------------------------------- IAAT
def test_iaat_raises_an_image_that_always_withstands_to_the_grids_top_and_lowers_one_that_never_does():
    s = spec(epochs=20)
    agent = InstanceAdaptiveAgent(s, warmup_fraction=0.0)
    eps_col = s.grid.column("epsilon")
    threat = s.grid.epsilons.index(DIGITS.threat.epsilon)
    first = play(agent, [0, 1, 2, 3], [True, False, True, False])
    assert first[:, eps_col].tolist() == [threat] * 4  # every image starts at the threat epsilon
    for _ in range(len(s.grid.epsilons) + 2):  # more visits than grid steps: both ends are reached
        action = play(agent, [0, 1, 2, 3], [True, False, True, False])
    top, bottom = len(s.grid.epsilons) - 1, 0  # the digits grid is ascending
    assert agent.memory[:4].tolist() == [top, bottom, top, bottom]
    assert action[:, eps_col].tolist() == [top, bottom, top, bottom]
    assert agent.memory[4:].tolist() == [threat] * 4  # images never seen keep the threat epsilon
    # The step size follows the paper's max(2 eps / K, threat step), nearest grid value: K = 5 on digits.
    step_col = s.grid.column("step_size")
    assert s.grid.step_sizes[int(action[0, step_col])] == pytest.approx(0.125)  # 2 * 0.3 / 5 = 0.12
    assert s.grid.step_sizes[int(action[1, step_col])] == pytest.approx(0.05)  # max(0.02, 0.05)


def test_iaat_plays_the_threat_epsilon_during_the_warm_up_and_moves_only_after_it():
    s = spec(epochs=10)  # warm-up 10/110 of 10 epochs: 1 epoch = 2 steps
    agent = InstanceAdaptiveAgent(s)
    assert agent.warmup_epochs == 1
    threat = s.grid.epsilons.index(DIGITS.threat.epsilon)
    for _ in range(2):
        play(agent, [0, 1, 2, 3], [True] * 4)
    assert agent.memory.tolist() == [threat] * 8
    play(agent, [0, 1, 2, 3], [True] * 4)
    assert agent.memory[:4].tolist() == [threat + 1] * 4


def test_iaat_resumes_exactly_with_its_per_image_epsilons():
    s = spec(epochs=20)
    script = [([i % 8, (i + 3) % 8, (i + 5) % 8, (i + 6) % 8], [bool((i * j) % 3) for j in range(4)])
              for i in range(30)]
    whole, first = InstanceAdaptiveAgent(s), InstanceAdaptiveAgent(s)
    for idx, correct in script[:12]:
        play(whole, idx, correct)
        play(first, idx, correct)
    resumed = InstanceAdaptiveAgent(s)
    resumed.load_state_dict(roundtrip(first.state_dict()))
    for idx, correct in script[12:]:
        assert torch.equal(play(whole, idx, correct), play(resumed, idx, correct))
    assert torch.equal(whole.memory, resumed.memory) and len(set(whole.memory.tolist())) > 1


# ------------------------------------------------------------------------------------------ CAT
def test_cat_follows_the_plateau_rule_on_a_scripted_accuracy_sequence():
    s = spec(epochs=12, steps_per_epoch=1)
    agent = CurriculumAgent(s, patience=1)
    accuracies = [0.5, 0.75, 0.75, 1.0, 0.5, 0.5, 0.25, 0.5, 0.75, 0.5, 0.5, 0.5]
    # Rises when an epoch fails to beat the level's best (patience 1), then the new level starts a
    # record of its own: the levels after each epoch, by hand.
    expected = [0, 0, 1, 1, 2, 2, 3, 3, 3, 4, 4, 4]  # top = 5 iterations (threat) = level 4 of 1..5
    levels = []
    for acc in accuracies:
        play(agent, [0, 1, 2, 3], [j < 4 * acc for j in range(4)])
        levels.append(agent.level)
    assert levels == expected
    it_col = s.grid.column("iterations")
    assert [s.grid.iterations[r[it_col]] for r in agent.levels] == [1, 2, 3, 4, 5]
    assert agent.levels[-1] == FixedAgent(s).action_indices  # ends at the threat model's attack


@pytest.mark.parametrize("epsilon_rises", [False, True])
def test_cat_linear_schedule_is_monotone_and_ends_at_the_threat_attack(epsilon_rises):
    s = spec(epochs=10, steps_per_epoch=3)
    agent = CurriculumAgent(s, schedule="linear", epsilon_rises=epsilon_rises)
    rows = [play(agent, [0, 1, 2, 3], [True] * 4)[0].tolist() for _ in range(s.total_steps)]
    it_col, eps_col = s.grid.column("iterations"), s.grid.column("epsilon")
    iterations = [s.grid.iterations[r[it_col]] for r in rows]
    epsilons = [s.grid.epsilons[r[eps_col]] for r in rows]
    assert iterations == sorted(iterations) and iterations[0] == 1 and iterations[-1] == 5
    assert epsilons == sorted(epsilons) and epsilons[-1] == DIGITS.threat.epsilon
    assert (epsilons[0] < epsilons[-1]) == epsilon_rises
    assert tuple(rows[-1]) == FixedAgent(s).action_indices


# ------------------------------------------------------------------------------------------ FAT
def test_fat_plays_the_papers_tau_schedule_scaled_to_the_run():
    s = spec(TAU_GRID, epochs=12, steps_per_epoch=1)
    agent = FriendlyAgent(s)
    tau_col = s.grid.column("early_stop_tau")
    taus = [int(TAU_GRID.values["early_stop_tau"][play(agent, [0], [True])[0, tau_col]]) for _ in range(12)]
    # 50/120 and 90/120 of 12 epochs: tau 0 for epochs 0-4, 1 for 5-8, 2 for 9-11.
    assert taus == [0] * 5 + [1] * 4 + [2] * 3
    with pytest.raises(ValueError, match="early_stop_tau"):
        FriendlyAgent(spec())  # no column: one clear error, never a silent no-op


def test_the_training_attack_stops_early_per_image_and_reports_fewer_gradients(digits):
    def cost(agent_class, grid):
        env = LASEnv(data=digits, tensor_api=True, batch_size=32, epochs=1, max_steps_per_epoch=3, grid=grid,
                     reward_interval=None)
        obs, info = env.reset(seed=0)
        agent = agent_class(AgentSpec.from_game(env))
        costs = []
        for _ in range(3):
            obs, _, _, _, info = env.step(agent.act(obs, info))
            agent.learn(torch.zeros(()), info)
            costs.append((info["attack_gradients_per_image"], info["probe_gradients_per_image"]))
        return costs

    fixed = cost(FixedAgent, DIGITS.grid)
    assert fixed == [(5.0, 0.0)] * 3  # PGD-AT on digits: 5 iterations per image, no probe
    fat = cost(FriendlyAgent, TAU_GRID)
    # tau 0: an image stops at the first check that finds it misclassified (that check's gradient counted).
    assert all(0 < a < 5 for a, _ in fat) and all(p == 0 for _, p in fat)


def test_the_probe_cost_is_its_iterations_per_probed_image(digits):
    env = LASEnv(data=digits, tensor_api=True, batch_size=16, epochs=1, max_steps_per_epoch=4, reward_interval=2)
    obs, info = env.reset(seed=0)
    agent = FixedAgent(AgentSpec.from_game(env))
    probes = []
    for _ in range(4):
        obs, _, _, _, info = env.step(agent.act(obs, info))
        probes.append(info["probe_gradients_per_image"])
    r = env.config.reward
    assert probes == [0.0, r.probe_iterations * r.probe_restarts] * 2


def test_early_stop_is_refused_for_the_trades_kl_attack(digits):
    with pytest.raises(SettingError, match="no label"):
        LASEnv(data=digits, grid=TAU_GRID, method="trades")
    with pytest.raises(SettingError, match="whole numbers"):
        LASEnv(data=digits, grid=StrategySpace((0.05,), (1,), (0.2,), extra={"early_stop_tau": (0.5,)}))


# ----------------------------------------------------------------------------------------- bandit
def test_the_bandit_concentrates_on_the_best_arm_of_a_toy_reward():
    s = spec(epochs=1500, steps_per_epoch=1, k=1)
    agent = Exp3Agent(s)
    eps_col, best = s.grid.column("epsilon"), 4
    for _ in range(s.total_steps):
        action = agent.act(torch.zeros(4, 1, 8, 8), {})
        reward = torch.tensor(1.0 if int(action[0, eps_col]) == best else 0.0)
        agent.learn(reward, {"reward_computed": True})
    p = agent.probabilities("epsilon")
    assert int(p.argmax()) == best and p[best] > 0.8
    assert (action == action[0]).all()  # one arm for the whole batch
    assert agent.gammas["epsilon"] == pytest.approx(exp3_gamma(6, 1500))


def test_the_bandit_needs_the_reward_and_resumes_exactly():
    with pytest.raises(ValueError, match="agent.k"):
        Exp3Agent(spec(k=None))
    s = spec(epochs=40, steps_per_epoch=1, k=2)
    whole, first = Exp3Agent(s), Exp3Agent(s)

    def step(agent, t):
        a = agent.act(torch.zeros(4, 1, 8, 8), {})
        agent.learn(a.float().mean(), {"reward_computed": t % 2 == 1})
        return a

    for t in range(15):
        step(whole, t), step(first, t)
    resumed = Exp3Agent(s)
    resumed.load_state_dict(roundtrip(first.state_dict()))
    for t in range(15, 40):
        assert torch.equal(step(whole, t), step(resumed, t))


# ---------------------------------------------------------------------------------------- the env
def test_next_indices_are_the_indices_the_next_step_reports(digits):
    env = LASEnv(data=digits, tensor_api=True, batch_size=64, epochs=2, max_steps_per_epoch=3, reward_interval=None)
    obs, info = env.reset(seed=1)
    agent = FixedAgent(AgentSpec.from_game(env))
    seen = []
    for _ in range(env.game.total_steps):
        announced = info["next_indices"]
        torch.testing.assert_close(env.game.data.x_train[announced], obs)  # the observation's own images
        obs, _, _, _, info = env.step(agent.act(obs, info))
        assert torch.equal(info["indices"], announced)
        seen.append(announced)
    assert len(torch.cat(seen[:3]).unique()) == 3 * 64  # one epoch: no image twice
    numpy_env = LASEnv(data=digits, batch_size=8, epochs=1, max_steps_per_epoch=2, reward_interval=None)
    assert numpy_env.reset(seed=0)[1]["next_indices"].shape == (8,)


# ------------------------------------------------------------------------------- the command line
def test_the_four_agents_run_from_the_command_line_and_record_their_cost(tmp_path):
    tiny = ["data.epochs=1", "data.max_steps_per_epoch=5", "data.batch_size=32", "eval.test_subset=32",
            "eval.train_subset=32", "eval.final_n=32", "eval.final_attacks=[clean]", "eval.pgd_iterations=2",
            "logger=none", "progress=false", f"run_root={tmp_path / 'runs'}"]
    ran = main_in_process("run", "-m", "agent=cat,iaat,fat,bandit", *tiny, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-2000:]
    results = {p.parts[-3]: json.loads(p.read_text()) for p in (tmp_path / "runs").rglob("results.json")}
    assert sorted(results) == ["bandit", "cat", "fat", "iaat"]
    for name, doc in results.items():
        cost = doc["cost"]
        assert cost["images"] == 5 * 32
        assert cost["gradients_per_image"] == pytest.approx(cost["attack_gradients_per_image"]
                                                            + cost["probe_gradients_per_image"])
        assert (cost["probe_gradients_per_image"] > 0) == (name == "bandit")  # only the bandit needs the reward (k=5)
    assert results["fat"]["config"]["data"]["grid"]["extra"] == {"early_stop_tau": [0, 1, 2]}  # added before the env
    assert results["fat"]["cost"]["attack_gradients_per_image"] < 5  # early-stopped PGD-5
    assert results["cat"]["cost"]["attack_gradients_per_image"] == 1  # the curriculum's first level


def test_cat_batch_mixing_draws_every_level_up_to_the_current_one_and_resumes_exactly():
    s = spec(epochs=6, steps_per_epoch=1, batch=64)
    agent = CurriculumAgent(s, batch_mixing=True)
    agent.level = 2
    it_col = s.grid.column("iterations")
    played = agent.act(torch.zeros(64, 1, 8, 8), {})[:, it_col]
    assert set(played.tolist()) == {agent.levels[n][it_col] for n in range(3)}  # levels 0, 1, 2 only
    resumed = CurriculumAgent(s, batch_mixing=True)
    resumed.load_state_dict(roundtrip(agent.state_dict()))
    assert torch.equal(agent.act(torch.zeros(64, 1, 8, 8), {}), resumed.act(torch.zeros(64, 1, 8, 8), {}))
