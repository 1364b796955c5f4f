"""The LAS-TRADES / LAS-AWP presets and their TRADES / AWP baselines equal SPEC section 7.

Every value of SPEC section 7 is written out here a second time, from SPEC, and compared with what
Hydra composes and what the code builds (method, grids with the 4th column, reward weights and
clamps, k, the policy's optimiser and its lr schedule, the target's schedule and epochs). A CPU
smoke test then runs 2 steps of each preset on the exact CIFAR-10 subset in ../shared/data.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from agents import AgentSpec, FixedAgent, ReinforceAgent
from experiments.config.settings import settings_from_config
from las_env.game_config import steps_per_epoch
from las_env.strategy_space import StrategySpace
from las_env.target import TargetTrainer
from tests.conftest import SHARED_DATA, requires_shared_data

CONF = Path(__file__).resolve().parents[1] / "experiments" / "conf"
PRESETS = ("cifar10_wrn34_10_las_trades", "cifar10_wrn34_10_las_awp", "cifar10_wrn34_10_trades", "cifar10_wrn34_10_awp")
PER_EPOCH = -(-50_000 // 128)  # their DataLoader keeps the partial batch: 391 steps


def compose_preset(name: str, tmp_path: Path, *extra: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={name}", "device=cpu", "logger=none", *extra])
    return settings_from_config(cfg, tmp_path)


def spec_of(s, total_steps: int) -> AgentSpec:
    return AgentSpec(grid=s.env.grid, observation_shape=(128, 3, 32, 32), num_classes=10, dataset="cifar10",
                     device=torch.device("cpu"), total_steps=total_steps, steps_per_epoch=PER_EPOCH, seed=0,
                     reward_interval=s.env.reward_interval)


def target_lrs(s, epochs: int, at: list[int]) -> list[float]:
    trainer = TargetTrainer(nn.Linear(1, 1), s.env.optim, total_steps=epochs * PER_EPOCH)
    return [trainer.lr_at(e * PER_EPOCH) for e in at]


def check_target(s, epochs: int, decays: tuple[int, int], method: str) -> None:
    env, o = s.env, s.env.optim
    assert (env.dataset, env.model, env.batch_size, env.epochs) == ("cifar10", "wrn-34-10", 128, epochs)
    assert (o.lr, o.momentum, o.weight_decay, o.schedule, o.gamma) == (0.1, 0.9, 5e-4, "piecewise", 0.1)
    assert o.true_class_prob is None and o.label_smoothing == 0  # plain CE in the target's step
    assert env.last_batch == "wrap"
    assert steps_per_epoch(50_000, 128, env.max_steps_per_epoch, env.last_batch) == PER_EPOCH
    d1, d2 = decays
    assert target_lrs(s, epochs, [0, d1 - 1, d1, d2 - 1, d2, epochs - 1]) == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert env.method.name == method


def check_grid(grid, eps, iters, step, beta=None) -> None:
    assert grid.epsilons == pytest.approx([v / 255 for v in range(eps[0], eps[1] + 1)])
    assert list(grid.iterations) == list(range(iters[0], iters[1] + 1))
    assert grid.step_sizes == pytest.approx([v / 255 for v in range(step[0], step[1] + 1)])
    if beta is None:
        assert grid.extra == ()
    else:
        assert grid.columns[3:] == ("trades_beta",)
        assert dict(grid.extra)["trades_beta"] == pytest.approx(list(range(beta[0], beta[1] + 1)))


def check_policy(s, *, momentum: float, weight_decay: float, milestones: list[int], total_steps: int) -> None:
    agent = s.agent(spec_of(s, total_steps))
    assert isinstance(agent, ReinforceAgent) and s.env.reward_interval == 1
    assert agent.backbone == "resnet18" and agent.credit == "paper" and agent.grad_clip == 1.0
    assert agent.entropy_coef == 0.0 and len(agent.net.heads) == len(s.env.grid.nvec)
    group = agent.optimizer.param_groups[0]
    assert isinstance(agent.optimizer, torch.optim.SGD)
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (1e-4, momentum, weight_decay)
    m1, m2 = milestones
    assert [agent.lr_at(u) for u in (0, m1 - 1, m1, m2 - 1, m2, total_steps - 1)] == pytest.approx(
        [1e-4, 1e-4, 1e-5, 1e-5, 1e-6, 1e-6])
    # The paper presets' one rule: the authors' reward flow (tests/test_paper_presets.py).
    assert agent.reward_flow == "score_then_resample" and agent.bn_mode == "split"


def check_reward(r, alpha: float, beta: float, clamp: float, w_hat_smoothing, l1_forward: str) -> None:
    assert (r.alpha, r.beta, r.l1_clamp, r.measure, r.l1_clamp_scope) == (alpha, beta, clamp, "accuracy", "batch_mean")
    assert (r.probe_iterations, r.probe_restarts, r.w_hat, r.l1_forward) == (10, 2, "deepcopy", l1_forward)
    assert r.probe_epsilon is None and r.probe_step_size is None  # the threat model: 8/255, 2/255
    assert r.w_hat_true_class_prob == w_hat_smoothing
    assert r.use_l1 and r.use_l2 and r.use_l3


def test_las_trades_preset_is_spec_section_7(tmp_path):
    s = compose_preset("cifar10_wrn34_10_las_trades", tmp_path)
    check_target(s, 100, (75, 90), "trades")
    check_grid(s.env.grid, eps=(5, 9), iters=(7, 14), step=(2, 4), beta=(5, 9))
    assert s.env.attack_start == "gaussian"
    total = 100 * PER_EPOCH
    check_policy(s, momentum=0.9, weight_decay=5e-4, milestones=[round(0.75 * total), round(0.9 * total)],
                 total_steps=total)
    check_reward(s.env.reward, 8.0, 4.0, 20.0, None, "train")  # their R1: the target in train mode (SPEC 9)
    assert s.eval.pgd_iterations == 10


def test_las_awp_preset_is_spec_section_7(tmp_path):
    s = compose_preset("cifar10_wrn34_10_las_awp", tmp_path)
    check_target(s, 200, (100, 150), "awp")
    m = s.env.method
    assert (m.awp_base, m.awp_gamma, m.awp_warmup_epochs, m.awp_proxy_lr) == ("pgd_at", 0.01, 0, 0.01)
    check_grid(s.env.grid, eps=(7, 15), iters=(8, 16), step=(2, 5))
    assert s.env.attack_start == "threat_ball"
    total = 200 * PER_EPOCH
    check_policy(s, momentum=0.0, weight_decay=0.0, milestones=[total // 2, round(0.75 * total)], total_steps=total)
    check_reward(s.env.reward, 1.0, 1.0, 10.0, 0.7, "eval")
    assert s.eval.pgd_iterations == 20


@pytest.mark.parametrize("name, method, epochs, decays, start, pgd", [
    ("cifar10_wrn34_10_trades", "trades", 100, (75, 90), "gaussian", 10),
    ("cifar10_wrn34_10_awp", "awp", 200, (100, 150), "threat_ball", 20),
])
def test_baseline_presets(tmp_path, name, method, epochs, decays, start, pgd):
    s = compose_preset(name, tmp_path)
    check_target(s, epochs, decays, method)
    assert s.env.attack_start == start and s.eval.pgd_iterations == pgd
    agent = s.agent(spec_of(s, epochs * PER_EPOCH))
    assert isinstance(agent, FixedAgent)
    assert (agent.epsilon, agent.step_size, agent.iterations) == pytest.approx((8 / 255, 2 / 255, 10))
    m = s.env.method
    if method == "trades":
        assert m.trades_beta == 6.0
    else:
        assert (m.awp_base, m.awp_gamma, m.awp_warmup_epochs, m.awp_proxy_lr) == ("pgd_at", 0.01, 0, 0.01)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    subprocess.run([sys.executable, str(SHARED_DATA / "prepare_cifar.py"), str(root), "--exact-subset"],
                   check=True, capture_output=True)
    return root


SMOKE = ["data.epochs=1", "data.max_steps_per_epoch=2", "data.batch_size=8", "model=small_cnn",
         "agent.backbone=small_cnn", "eval.test_subset=16", "eval.train_subset=16", "eval.final_n=16",
         "eval.final_attacks=[clean]", "eval.autoattack=false", "eval.pgd_iterations=2", "progress=false",
         "reward.probe_iterations=2", "selection.val_fraction=0.01", "threads=1"]  # 52 validation images, not 516


@pytest.mark.slow
@requires_shared_data()
@pytest.mark.parametrize("name", PRESETS)
def test_presets_run_two_steps_on_the_exact_cifar10_subset(tmp_path, cifar_root, name):
    """CPU smoke: the preset's whole machinery (method, 4th head, reward, schedules), a small
    model and batch instead of WRN-34-10 x 128 so it takes seconds."""
    from experiments.training.loop import train

    learns = "las_" in name  # the fixed agent has no strategy backbone
    overrides = [o for o in SMOKE if learns or not o.startswith("agent.backbone")]
    s = compose_preset(name, tmp_path, f"data.root={cifar_root}", f"run_root={tmp_path}", *overrides)
    torch.set_num_threads(1)
    train(s)
    assert (tmp_path / "results.json").is_file()


def test_the_policy_lr_schedule_steps_with_the_agent_updates():
    spec = AgentSpec(grid=StrategySpace((0.05,), (1,), (0.1, 0.2)), observation_shape=(4, 1, 8, 8), num_classes=10,
                     dataset="digits", device=torch.device("cpu"), total_steps=8, steps_per_epoch=8, seed=0,
                     reward_interval=2)
    agent = ReinforceAgent(spec, credit="per_image", lr=0.1, lr_milestones=[0.5, 0.75], lr_gamma=0.1)  # 4 updates: at 2 and 3
    seen = []
    for _ in range(4):
        agent.act(torch.rand(4, 1, 8, 8), {"reward_next_step": True})
        agent.learn(torch.tensor(1.0), {"reward_computed": True, "rewards": torch.rand(4), "reward_next_step": True})
        seen.append(agent.optimizer.param_groups[0]["lr"])
    assert seen == pytest.approx([0.1, 0.1, 0.01, 0.001])
    with pytest.raises(ValueError, match="lr_milestones"):
        ReinforceAgent(spec, lr_milestones=[75])


def test_w_hat_smoothing_reaches_the_look_ahead_copy_only(digits, monkeypatch):
    import las_env.game as game_module
    from las_env import LASEnv

    seen = []
    real = game_module.lookahead_step
    monkeypatch.setattr(game_module, "lookahead_step", lambda *a, **kw: seen.append(a[3]) or real(*a, **kw))
    env = LASEnv(data=digits, tensor_api=True, batch_size=8, epochs=1, max_steps_per_epoch=1, method="awp",
                 reward={"w_hat": "deepcopy", "w_hat_true_class_prob": 0.7, "probe_iterations": 1})
    env.reset(seed=0)
    env.step(torch.zeros((8, 3), dtype=torch.long))
    assert [o.true_class_prob for o in seen] == [0.7]
    assert env.game.trainer.optim.true_class_prob is None  # the target's own step: plain CE


@pytest.mark.parametrize("overrides, words", [
    (["+data.grid.extra.trades_beta=[5,6]"], "data.grid.extra=['trades_beta']: has the strategy column"),
    (["method=trades", "+data.grid.extra.foo=[]"], "data.grid.extra.foo=[]: is empty"),
    (["method=awp", "method.awp_gamma=-1"], "method.awp_gamma=-1"),
])
def test_bad_method_settings_are_one_paragraph_naming_the_key(tmp_path, overrides, words):
    from experiments.config.errors import ConfigError

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "logger=none"])
    with pytest.raises(ConfigError, match=re.escape(words)):
        settings_from_config(cfg, tmp_path)


def test_method_trades_with_a_beta_column_builds_a_four_column_game(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["method=trades", "+data.grid.extra.trades_beta=[5,6]", "logger=none"])
    s = settings_from_config(cfg, tmp_path)
    assert s.env.grid.columns == ("step_size", "iterations", "epsilon", "trades_beta") and s.env.grid.nvec[3] == 2
