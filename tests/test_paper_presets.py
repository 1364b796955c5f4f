"""Each ``paper`` preset (experiments/conf/experiment/*.yaml) equals the authors' setting.

Every value of SPEC section 2 is written out here a second time, from SPEC, and compared with
what Hydra composes and what the code then builds (the agent itself, the lr schedule it
steps): label smoothing, grids, k, the target's schedule, the policy's optimiser, the reward's
weights and clamps, ``w_hat``, and every ours-vs-the-authors' switch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from agents import AgentSpec, FixedAgent, ReinforceAgent
from experiments.config.settings import settings_from_config
from las_env.game_config import steps_per_epoch
from las_env.datasets.registry import lookup
from las_env.target import TargetTrainer

CONF = Path(__file__).resolve().parents[1] / "experiments" / "conf"

# SPEC section 2, in the units of its table (/255 for epsilon and step size).
GRIDS = {  # data set: (epsilon, iterations, step size), inclusive ranges
    "cifar10": ((3, 15), (3, 14), (1, 5)),
    "cifar100": ((3, 15), (3, 12), (1, 5)),
    "tiny-imagenet": ((3, 15), (3, 14), (1, 5)),
}
TRUE_CLASS_PROB = {"cifar10": 0.7, "cifar100": 0.6, "tiny-imagenet": 0.8}
TRAIN_IMAGES = {"cifar10": 50_000, "cifar100": 50_000, "tiny-imagenet": 100_000}
LASAT = {  # preset: (data set, target model, k)
    "cifar10_resnet18_lasat_k20": ("cifar10", "resnet18", 20),
    "cifar10_resnet18_lasat_k40": ("cifar10", "resnet18", 40),
    "cifar10_wrn34_10_lasat": ("cifar10", "wrn-34-10", 20),
    "cifar100_resnet18_lasat": ("cifar100", "resnet18", 20),
    "tiny_imagenet_preact_resnet18_lasat": ("tiny-imagenet", "preact_resnet18", 20),
}
PGDAT = {"cifar10_resnet18_pgdat": ("cifar10", "resnet18"), "cifar10_wrn34_10_pgdat": ("cifar10", "wrn-34-10")}
PLUG_IN = {"cifar10_wrn34_10_las_trades", "cifar10_wrn34_10_las_awp", "cifar10_wrn34_10_trades",
           "cifar10_wrn34_10_awp"}
"""SPEC section 7's presets: checked value by value in tests/test_plugin_presets.py."""


def test_every_preset_is_covered_here():
    assert set(LASAT) | set(PGDAT) | PLUG_IN == {p.stem for p in (CONF / "experiment").glob("*.yaml")}


def preset(name: str, tmp_path: Path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={name}", "device=cpu", "logger=none"])
    return settings_from_config(cfg, tmp_path)


def agent_spec(s, dataset: str) -> AgentSpec:
    size = 64 if dataset == "tiny-imagenet" else 32
    return AgentSpec(grid=s.env.grid, observation_shape=(128, 3, size, size), num_classes=10, dataset=dataset,
                     device=torch.device("cpu"), total_steps=1000, steps_per_epoch=391, seed=0,
                     reward_interval=s.env.reward_interval)


def check_target_training(s, dataset: str, model: str) -> None:
    """SGD 0.1 / 0.9 / 5e-4, batch 128, 110 epochs, x0.1 at epochs 99 and 104 stepped per
    iteration, the partial last batch kept, the authors' random start, no normalisation."""
    env, o = s.env, s.env.optim
    assert (env.dataset, env.model, env.batch_size, env.epochs) == (dataset, model, 128, 110)
    assert (o.lr, o.momentum, o.weight_decay, o.schedule, o.gamma) == (0.1, 0.9, 5e-4, "piecewise", 0.1)
    assert env.last_batch == "wrap" and env.attack_start == "threat_ball"
    per_epoch = steps_per_epoch(TRAIN_IMAGES[dataset], 128, env.max_steps_per_epoch, env.last_batch)
    assert per_epoch == -(-TRAIN_IMAGES[dataset] // 128)  # their DataLoader keeps the partial batch
    trainer = TargetTrainer(nn.Linear(1, 1), o, total_steps=110 * per_epoch)
    lr = [trainer.lr_at(e * per_epoch + i) for e, i in ((0, 0), (98, per_epoch - 1), (99, 0), (103, per_epoch - 1),
                                                         (104, 0), (109, per_epoch - 1))]
    assert lr == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def check_grid(s, dataset: str) -> None:
    (e0, e1), (i0, i1), (s0, s1) = GRIDS[dataset]
    grid = s.env.grid
    assert grid.epsilons == pytest.approx([v / 255 for v in range(e0, e1 + 1)])
    assert list(grid.iterations) == list(range(i0, i1 + 1))
    assert grid.step_sizes == pytest.approx([v / 255 for v in range(s0, s1 + 1)])


@pytest.mark.parametrize("name", sorted(LASAT))
def test_lasat_presets_are_the_authors_setting(name, tmp_path):
    dataset, model, k = LASAT[name]
    s = preset(name, tmp_path)
    check_target_training(s, dataset, model)
    check_grid(s, dataset)
    o, r = s.env.optim, s.env.reward
    assert o.true_class_prob == TRUE_CLASS_PROB[dataset] and o.label_smoothing == 0.0

    # Reward: R1 = clamp(mean CE, 0, 10) from an eval-mode forward; R2 = 4 x PGD-10 accuracy
    # (8/255, step 2/255, 2 restarts) and R3 = 2 x clean accuracy of a deep-copied w_hat.
    threat = lookup(dataset).threat
    assert (threat.epsilon, threat.step_size) == pytest.approx((8 / 255, 2 / 255))
    assert (r.alpha, r.beta, r.measure, r.l1_clamp) == (4.0, 2.0, "accuracy", 10.0)
    assert (r.use_l1, r.use_l2, r.use_l3) == (True, True, True)
    assert (r.probe_iterations, r.probe_epsilon, r.probe_step_size, r.probe_restarts) == (10, None, None, 2)
    assert (r.w_hat, r.l1_forward, r.l1_clamp_scope) == ("deepcopy", "eval", "batch_mean")

    # The policy: ResNet-18, REINFORCE every k steps, one scalar per batch, plain SGD 1e-4, clip 1.
    agent = s.agent(agent_spec(s, dataset))
    assert isinstance(agent, ReinforceAgent)
    assert (s.env.reward_interval, agent.credit, agent.backbone) == (k, "paper", "resnet18")
    opt = agent.optimizer
    assert type(opt) is torch.optim.SGD
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (1e-4, 0.0, 0.0)
    assert (agent.entropy_coef, agent.grad_clip, agent.normalize_advantages) == (0.0, 1.0, False)
    assert any(h.weight.abs().sum() > 0 for h in agent.net.heads)  # PyTorch's default init, not zeros
    assert (agent.reward_flow, agent.bn_mode, agent.scores_actions) == ("score_then_resample", "split", True)


@pytest.mark.parametrize("name", sorted(PGDAT))
def test_pgdat_presets_are_the_authors_baseline(name, tmp_path):
    dataset, model = PGDAT[name]
    s = preset(name, tmp_path)
    check_target_training(s, dataset, model)
    assert s.env.optim.true_class_prob is None and s.env.optim.label_smoothing == 0.0
    agent = s.agent(agent_spec(s, dataset))
    assert isinstance(agent, FixedAgent)
    assert (agent.epsilon, agent.step_size, agent.iterations) == pytest.approx((8 / 255, 2 / 255, 10))


def test_the_authors_block_lives_once_in_the_shared_base():
    for path in (CONF / "experiment").glob("*lasat*.yaml"):
        text = path.read_text()
        assert "/paper/authors_lasat" in text and "\nreward:" not in text, path.name
        assert "\n    label_smoothing:" not in text, path.name  # only the authors' spelling, true_class_prob
    for path in (CONF / "experiment").glob("*pgdat*.yaml"):
        assert "/paper/authors_training" in path.read_text(), path.name
