"""Each ``paper`` preset (experiments/conf/experiment/*.yaml) equals the authors' setting.

Every value of SPEC sections 2, 7 and 9 is written out here a second time, from SPEC, and compared
with what Hydra composes and what the code then builds (the agent itself, the lr schedule it
steps, the target network): label smoothing, grids, k, the target's schedule and architecture,
the policy's optimiser, the reward's weights and clamps, ``w_hat``, and every ours-vs-the-authors'
switch (early stops, clip order, initialisation, padding, AWP's clean forward and proxy loss,
reward flow, L1's forward), the protocol choice and AutoAttack on all 10,000 test images.
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
from las_env.models import build_model
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
CLASSES = {"cifar10": 10, "cifar100": 100, "tiny-imagenet": 200}
LASAT = {  # preset: (data set, target model, k); SPEC sections 2 and 9
    "cifar10_resnet18_lasat_k20": ("cifar10", "resnet18", 20),
    "cifar10_resnet18_lasat_k40": ("cifar10", "resnet18", 40),
    "cifar10_wrn34_10_lasat": ("cifar10", "wrn-34-10", 20),
    "cifar100_wrn34_10_lasat": ("cifar100", "wrn-34-10", 20),
    "tiny_imagenet_preact_resnet18_lasat": ("tiny-imagenet", "preact_resnet18_pool2", 1),
}
PGDAT = {"cifar10_resnet18_pgdat": ("cifar10", "resnet18"), "cifar10_wrn34_10_pgdat": ("cifar10", "wrn-34-10")}
PLUG_IN = {"cifar10_wrn34_10_las_trades", "cifar10_wrn34_10_las_awp", "cifar10_wrn34_10_trades",
           "cifar10_wrn34_10_awp"}
"""SPEC section 7's presets: checked value by value in tests/test_plugin_presets.py, the items of
section 9 here."""
ALL = sorted(set(LASAT) | set(PGDAT) | PLUG_IN)
LEARNED = sorted(set(LASAT) | {"cifar10_wrn34_10_las_trades", "cifar10_wrn34_10_las_awp"})
AWP = {"cifar10_wrn34_10_las_awp", "cifar10_wrn34_10_awp"}
PYTORCH_INIT = {"resnet18", "preact_resnet18_pool2"}
"""The authors' ResNet-18s use PyTorch's default initialisation; their WRN-34-10 is Kaiming fan-out, as ours."""


def test_every_preset_is_covered_here():
    assert set(ALL) == {p.stem for p in (CONF / "experiment").glob("*.yaml")}


def preset(name: str, tmp_path: Path, *extra: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={name}", "device=cpu", "logger=none", *extra])
    return settings_from_config(cfg, tmp_path)


def agent_spec(s, dataset: str, total_steps: int = 1000) -> AgentSpec:
    size = 64 if dataset == "tiny-imagenet" else 32
    return AgentSpec(grid=s.env.grid, observation_shape=(128, 3, size, size), num_classes=CLASSES[dataset],
                     dataset=dataset, device=torch.device("cpu"), total_steps=total_steps,
                     steps_per_epoch=-(-TRAIN_IMAGES[dataset] // 128), seed=0,
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

    # The policy: ResNet-18, REINFORCE every k steps, one scalar per batch, SGD 1e-4, clip 1.
    # SPEC section 9: CIFAR-100's policy SGD has momentum 0.9 and weight decay 5e-4.
    agent = s.agent(agent_spec(s, dataset))
    assert isinstance(agent, ReinforceAgent)
    backbone = "resnet18_pool2" if dataset == "tiny-imagenet" else "resnet18"
    assert (s.env.reward_interval, agent.credit, agent.backbone) == (k, "paper", backbone)
    opt = agent.optimizer
    assert type(opt) is torch.optim.SGD
    group = opt.param_groups[0]
    momentum, decay = (0.9, 5e-4) if dataset == "cifar100" else (0.0, 0.0)
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (1e-4, momentum, decay)
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


def test_tiny_imagenet_is_run_as_the_authors_run_it(tmp_path):
    """SPEC section 9: k = 1 with the policy lr stepped every iteration (x0.1 at 99/110 and 104/110 of
    the run, as the target's), no augmentation, their PreActResNet-18 (no final BN-ReLU, 2x2 pool,
    head Linear(2048, 200)) and a strategy whose heads read 2048 features."""
    s = preset("tiny_imagenet_preact_resnet18_lasat", tmp_path)
    assert s.env.augment is False and s.env.reward_interval == 1
    assert s.env.optim.grad_clip == 10.0  # their clip_grad_norm_(target_model.parameters(), 10)
    target = build_model(s.env.model, 3, 200, init=s.env.model_init)
    assert isinstance(target.linear, nn.Linear) and (target.linear.in_features, target.linear.out_features) == (2048, 200)
    assert target.final_bn is None  # no final BN-ReLU before the pool
    assert target(torch.rand(2, 3, 64, 64)).shape == (2, 200)

    per_epoch = -(-100_000 // 128)
    total = 110 * per_epoch  # k = 1: one policy update per step
    agent = s.agent(agent_spec(s, "tiny-imagenet", total_steps=total))
    assert {h.in_features for h in agent.net.heads} == {2048}
    assert agent.net.backbone.features(torch.rand(2, 3, 64, 64)).shape == (2, 2048)
    m1, m2 = int(total * 99 / 110), int(total * 104 / 110)  # their MultiStepLR milestones, in updates
    lrs = [agent.lr_at(u) for u in (0, m1 - 1, m1 + 1, m2 - 1, m2 + 1, total - 1)]
    assert lrs == pytest.approx([1e-4, 1e-4, 1e-5, 1e-5, 1e-6, 1e-6])
    trainer = TargetTrainer(nn.Linear(1, 1), s.env.optim, total_steps=total)
    assert [trainer.lr_at(u) for u in (m1 - 1, m1 + 1, m2 + 1)] == pytest.approx([0.1, 0.01, 0.001])


@pytest.mark.parametrize("name", ALL)
def test_every_switch_of_section_9_is_the_authors_in_every_preset(name, tmp_path):
    s = preset(name, tmp_path)
    env, ev = s.env, s.eval
    # Early-stopping PGD in every evaluation PGD/C&W and, for a learned strategy, in the reward probe.
    assert ev.early_stop is True
    assert env.reward.probe_early_stop is (name in LEARNED)
    # Their threat-ball start, clipped into the image's ball only by the first step (TRADES: x + 0.001 N).
    assert (env.attack_start, env.attack_clip) in {("threat_ball", "first_step"), ("gaussian", "first_step")}
    # Initialisation: PyTorch's defaults for their ResNet-18s, Kaiming for their WRN; the strategy's always PyTorch's.
    assert env.model_init == ("pytorch" if env.model in PYTORCH_INIT else "kaiming")
    if name in LEARNED:
        assert s.config["agent"]["backbone_init"] == "pytorch"
        # One rule for every paper preset: the authors' reward flow (a scored sample, then a new one).
        assert (s.config["agent"]["reward_flow"], s.config["agent"]["bn_mode"]) == ("score_then_resample", "split")
        # LAS-TRADES' R1 is measured in train mode (their attack routine leaves the target there).
        assert env.reward.l1_forward == ("train" if "trades" in name else "eval")
    # AWP's script: reflect padding, a clean train-mode forward after each step, a proxy on plain CE.
    m = env.method
    assert env.augment_padding == ("reflect" if name in AWP else "zeros")
    assert (m.awp_clean_forward, m.awp_proxy_loss) == ((True, "unsmoothed") if name in AWP else (False, "step"))
    # AutoAttack on all 10,000 test images (the protocol's, RobustBench's); the clean/PGD table on all.
    assert ev.autoattack is True and ev.autoattack_n >= 10_000 and ev.final_n is None
    # The checkpoint protocol: ours unless asked (validation split; best-on-val and final reported).
    assert (s.selection.val_fraction, s.selection.select_on) == (0.1, "val")


def test_protocol_authors_trains_on_every_image_and_selects_on_test(tmp_path):
    s = preset("cifar10_resnet18_lasat_k20", tmp_path, "protocol=authors")
    assert (s.selection.val_fraction, s.selection.select_on) == (0.0, "test")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        plain = compose("config", overrides=["logger=none"])
    assert plain.selection.select_on == "val"  # the default protocol is ours, presets or not


@pytest.mark.parametrize("name", ALL)
def test_every_preset_header_cites_the_spec_sections_it_rests_on(name):
    header = [line for line in (CONF / "experiment" / f"{name}.yaml").read_text().splitlines() if line.startswith("#")]
    assert any("SPEC section" in line for line in header), name


def test_the_authors_block_lives_once_in_the_shared_base():
    for path in (CONF / "experiment").glob("*lasat*.yaml"):
        text = path.read_text()
        assert "/paper/authors_lasat" in text and "\nreward:" not in text, path.name
        assert "\n    label_smoothing:" not in text, path.name  # only the authors' spelling, true_class_prob
    for path in (CONF / "experiment").glob("*pgdat*.yaml"):
        assert "/paper/authors_training" in path.read_text(), path.name
