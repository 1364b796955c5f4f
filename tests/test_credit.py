"""The credit estimators against the exact gradient of J, computed by enumeration.

The synthetic game: 3 images, 3 actions each (epsilon 0, 0.5, 1), a softmax policy with one
logit vector per image. L1_i depends on a_i only (plus noise); the batch terms depend on the
batch's MEAN epsilon through a shared "update" (plus a small own-action share and noise), as
LAS-AT's L2/L3 do through the one target update. With 27 joint actions, J(theta) and its
gradient are exact; each estimator's mean over many sampled batches must match it within its
standard error (unbiased), and per_image must not.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from agents.credit import leave_one_out_mean, paper_advantages, per_image_advantages, unbiased_advantages
from las_env.reward import spread_over_batch

B, N_ACTIONS = 3, 3
EPS = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
L1_TABLE = torch.tensor([[0.2, 0.9, 1.4], [0.5, 0.8, 1.1], [0.1, 1.0, 1.6]], dtype=torch.float64)
OWN_SHARE = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
SIGMA_L1, SIGMA_G = 0.3, 0.3


def batch_terms(actions: torch.Tensor) -> torch.Tensor:
    """Per-image alpha*L2 + beta*L3 (noise-free): a concave function of the batch's mean epsilon
    (the shared update), plus a small share of the image's own epsilon. ``actions``: (..., B)."""
    m = EPS[actions].mean(-1, keepdim=True)
    shared = 4.0 * (1.0 - 3.0 * (m - 0.35) ** 2)
    return shared + OWN_SHARE * EPS[actions]


def exact_gradient(theta: torch.Tensor) -> torch.Tensor:
    """grad J by enumerating the 27 joint actions; J = E[mean_i L1_i + mean_i g_i]."""
    theta = theta.clone().requires_grad_(True)
    logp = torch.log_softmax(theta, -1)
    joint = torch.tensor(list(itertools.product(range(N_ACTIONS), repeat=B)))  # (27, B)
    logp_joint = logp[torch.arange(B), joint].sum(-1)
    value = L1_TABLE[torch.arange(B), joint].mean(-1) + batch_terms(joint).mean(-1)
    j = (logp_joint.exp() * value).sum()
    (grad,) = torch.autograd.grad(j, theta)
    return grad


def sample_estimates(theta: torch.Tensor, n: int, credit: str, seed: int = 0) -> torch.Tensor:
    """``n`` independent estimates of the gradient (n, B, N_ACTIONS): the gradient of
    ``mean_j(A_j log p(a_j))`` (the agent's loss with the sign flipped) for each sampled batch."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(theta, -1)
    actions = torch.multinomial(probs, n, replacement=True, generator=g).T  # (n, B)
    l1 = L1_TABLE[torch.arange(B), actions] + SIGMA_L1 * torch.randn(n, B, generator=g, dtype=torch.float64)
    terms = batch_terms(actions) + SIGMA_G * torch.randn(n, 1, generator=g, dtype=torch.float64)
    rewards = l1 + terms
    if credit == "paper":
        adv = paper_advantages(rewards)
    elif credit == "per_image":
        adv = per_image_advantages(rewards, 3.0)  # a constant baseline: its bias is not the baseline's
    else:
        # The pre-update measurement: the batch terms at the policy's expected mean epsilon (a
        # function of theta only, as G(w) is of the target before the update), with its own noise.
        expected_m = (probs * EPS).sum(-1).mean()
        m_before = expected_m.expand(n, 1)
        before = 4.0 * (1.0 - 3.0 * (m_before - 0.35) ** 2) + SIGMA_G * torch.randn(n, 1, generator=g, dtype=torch.float64)
        before = before.expand(n, B)
        if credit.startswith("unbiased_subset"):
            # reward.probe_fraction: both probes measure the same fresh random subset of m images,
            # drawn independently of the actions, each spread over the batch with weight B / m.
            m = int(credit.rsplit("_", 1)[1])
            probed = torch.zeros(n, B, dtype=torch.float64).scatter_(
                1, torch.rand(n, B, generator=g).argsort(1)[:, :m], B / m)
            terms, before = terms * probed, before * probed
        adv = unbiased_advantages(l1, terms, before)
    # grad_theta_j log p(a_j) = onehot(a_j) - p_j, in row j only.
    score = torch.nn.functional.one_hot(actions, N_ACTIONS).double() - probs
    return adv.unsqueeze(-1) * score / B  # (n, B, N_ACTIONS): row j = (1/B) A_j grad log p(a_j)


THETA = torch.tensor([[0.3, -0.2, 0.1], [-0.5, 0.4, 0.0], [0.2, 0.2, -0.6]], dtype=torch.float64)
N = 200_000


def _mean_and_se(est: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return est.mean(0), est.std(0) / est.shape[0] ** 0.5


def test_unbiased_credit_matches_exact_gradient_within_standard_error():
    exact = exact_gradient(THETA)
    mean, se = _mean_and_se(sample_estimates(THETA, N, "unbiased"))
    z = (mean - exact).abs() / se
    assert z.max() < 4.0, f"unbiased credit: |mean - exact| / SE = {z}"


@pytest.mark.parametrize("m", [1, 2])
def test_unbiased_credit_with_a_subset_probe_matches_exact_gradient_within_standard_error(m):
    exact = exact_gradient(THETA)
    estimates = sample_estimates(THETA, N, f"unbiased_subset_{m}")
    mean, se = _mean_and_se(estimates)
    z = (mean - exact).abs() / se
    assert z.max() < 4.0, f"unbiased credit, probe on {m} of {B} images: |mean - exact| / SE = {z}"
    # The price: more variance than the whole-batch probe.
    assert estimates.var(0).sum() > sample_estimates(THETA, N, "unbiased").var(0).sum()


@pytest.mark.parametrize("m", [1, 2])
def test_subset_probe_averages_to_the_whole_batch_credit_exactly(m):
    """For every joint action (and noise draw), the mean over all C(B, m) subsets of the credit
    computed from the subset-probed terms (the game's own spreading, ``spread_over_batch``) equals
    the whole-batch credit exactly: with the subset drawn independently of the actions,
    E[A_j grad log p(a_j)] is unchanged, so the estimator above stays unbiased for grad J."""
    g = torch.Generator().manual_seed(0)
    zeros = torch.zeros(B, dtype=torch.float64)
    subsets = [torch.tensor(c) for c in itertools.combinations(range(B), m)]
    for actions in itertools.product(range(N_ACTIONS), repeat=B):
        a = torch.tensor(actions)
        l1 = L1_TABLE[torch.arange(B), a] + SIGMA_L1 * torch.randn(B, generator=g, dtype=torch.float64)
        terms = batch_terms(a) + SIGMA_G * torch.randn(B, generator=g, dtype=torch.float64)
        before = 4.0 * torch.rand(B, generator=g, dtype=torch.float64)
        whole = unbiased_advantages(l1, terms, before)
        spread = [(spread_over_batch(terms[s], s, zeros), spread_over_batch(before[s], s, zeros)) for s in subsets]
        by_subset = torch.stack([unbiased_advantages(l1, t, b) for t, b in spread])
        torch.testing.assert_close(by_subset.mean(0), whole, rtol=0, atol=1e-12)
        torch.testing.assert_close(torch.stack([t for t, _ in spread]).mean(0), terms, rtol=0, atol=1e-12)
        assert not torch.allclose(by_subset[0], whole)  # one subset alone is not the whole batch


def test_paper_credit_is_unbiased_for_grad_j_over_b_with_larger_variance():
    exact = exact_gradient(THETA)
    paper = sample_estimates(THETA, N, "paper") * B  # the paper's credit estimates grad J / B
    mean, se = _mean_and_se(paper)
    z = (mean - exact).abs() / se
    assert z.max() < 4.0, f"paper credit (x B): |mean - exact| / SE = {z}"
    unbiased = sample_estimates(THETA, N, "unbiased")
    var_paper = paper.var(0).sum().item()
    var_unbiased = unbiased.var(0).sum().item()
    # Same target (grad J), so the variances are comparable: the baselines must help.
    assert var_unbiased < var_paper, (var_unbiased, var_paper)


def test_per_image_credit_is_biased_for_grad_j():
    exact = exact_gradient(THETA)
    mean, se = _mean_and_se(sample_estimates(THETA, N, "per_image"))
    z = (mean - exact).abs() / se
    # Not a statistical fluke: many standard errors away, and a large relative error.
    assert z.max() > 20.0, f"per_image unexpectedly matches: z = {z}"
    assert (mean - exact).norm() > 0.3 * exact.norm()


def test_leave_one_out_mean_excludes_own_value():
    v = torch.tensor([[1.0, 2.0, 6.0]])
    assert torch.allclose(leave_one_out_mean(v), torch.tensor([[4.0, 3.5, 1.5]]))
    assert torch.equal(leave_one_out_mean(torch.tensor([5.0])), torch.tensor([0.0]))


@pytest.mark.parametrize("credit", ["unbiased", "paper", "per_image"])
def test_estimates_are_not_all_zero(credit):
    # Guards the comparison above against a degenerate game (all gradients zero match trivially).
    assert exact_gradient(THETA).abs().max() > 0.05
    assert sample_estimates(THETA, 1000, credit).abs().mean() > 1e-3


# ------------------------------------------------------------- the agent and the env's seam

import copy  # noqa: E402

from agents import AgentSpec, ReinforceAgent  # noqa: E402
from las_env.game_config import LASConfig  # noqa: E402
from las_env.game import LASGame  # noqa: E402
from las_env.datasets.registry import lookup  # noqa: E402
from las_env.reward import RewardConfig  # noqa: E402

LEARN = {"reward_next_step": True}


def _spec(batch: int = 16, device: str = "cpu") -> AgentSpec:
    return AgentSpec(grid=lookup("digits").grid, observation_shape=(batch, 1, 8, 8), num_classes=10, dataset="digits",
                     device=torch.device(device), total_steps=100, steps_per_epoch=10, seed=0, reward_interval=1)


def _manual_params(agent: ReinforceAgent, x, actions, advantage) -> torch.Tensor:
    """Parameters after one plain-SGD step on ``-mean(A * log p(a))``, written out by hand."""
    net = copy.deepcopy(agent.net)
    logits = net(x)
    log_prob = sum(z.log_softmax(1).gather(1, actions[:, j : j + 1]).squeeze(1) for j, z in enumerate(logits))
    (-advantage * log_prob).mean().backward()
    lr = agent.optimizer.param_groups[0]["lr"]
    return torch.cat([(p - lr * p.grad).detach().flatten() for p in net.parameters()])


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_agent_unbiased_update_uses_the_credit_and_a_past_only_scale():
    torch.set_num_threads(1)
    agent = ReinforceAgent(_spec(), credit="unbiased", lr=0.05, grad_clip=0, zero_init_heads=False)
    g = torch.Generator().manual_seed(0)
    sq_past = None
    for update in range(2):
        x = torch.rand((16, 1, 8, 8), generator=g)
        l1 = torch.rand(16, generator=g) * 3
        terms = 4 * (torch.rand(16, generator=g) > 0.5).float() + 2 * (torch.rand(16, generator=g) > 0.3).float()
        before = 4 * (torch.rand(16, generator=g) > 0.6).float()
        actions = agent.act(x, LEARN)
        adv = unbiased_advantages(l1, terms, before)
        scale = torch.tensor(1.0) if sq_past is None else sq_past.sqrt()  # past updates only
        expected = _manual_params(agent, x, actions, adv / scale)
        info = {"reward_computed": True, "rewards": l1 + terms, "l1": l1, "batch_terms_before": before}
        m = agent.learn((l1 + terms).mean(), info)
        torch.testing.assert_close(_flat(agent.net), expected)
        torch.testing.assert_close(m["advantage_scale"], scale)
        sq = adv.square().mean()
        sq_past = sq if sq_past is None else 0.9 * sq_past + 0.1 * sq


def test_agent_unbiased_without_the_pre_update_probe_says_how_to_fix_it():
    agent = ReinforceAgent(_spec(), credit="unbiased")
    agent.act(torch.rand(16, 1, 8, 8), LEARN)
    info = {"reward_computed": True, "rewards": torch.ones(16), "l1": torch.ones(16)}
    with pytest.raises(ValueError, match="pre_update_probe=True"):
        agent.learn(torch.tensor(1.0), info)


def test_game_measures_the_pre_update_target_before_the_attack(digits):
    torch.set_num_threads(1)
    cfg = LASConfig(batch_size=32, epochs=1, max_steps_per_epoch=4, reward_interval=2,
                    reward=RewardConfig(pre_update_probe=True))
    game = LASGame(cfg, digits)
    game.reset(0)
    action = torch.zeros((32, 3), dtype=torch.long)
    action[:, 2] = 3
    first = game.play(action)
    assert not first.reward_computed and first.terms_before is None
    # The same measurement by hand on a copy of the game as it stands before the reward step.
    twin = copy.deepcopy(game)
    x, y = twin.batch
    probe = twin._probe(twin.target, x, y, twin.rng)  # the stream play() measures it with
    expected = 4.0 * probe.probe_correct.float() + 2.0 * probe.clean_correct.float()
    second = game.play(action)
    assert second.reward_computed
    torch.testing.assert_close(second.terms_before, expected)
    # ...and the reward itself is measured on the updated target, not the one before.
    assert not torch.equal(_flat(game.target), _flat(twin.target))


def test_probe_fraction_probes_a_fresh_subset_and_spreads_it_over_the_batch(digits):
    torch.set_num_threads(1)
    cfg = LASConfig(batch_size=32, epochs=1, max_steps_per_epoch=4,
                    reward=RewardConfig(pre_update_probe=True, probe_fraction=0.25))
    game = LASGame(cfg, digits)
    game.reset(0)
    action = torch.zeros((32, 3), dtype=torch.long)
    probed_rows = []
    for _ in range(3):
        twin = copy.deepcopy(game)
        rows = twin._probe_rows(twin.rng)  # the stream play() draws the subset from, first
        x, y = twin.batch
        before = twin._probe(twin.target, x, y, twin.rng, rows)
        record = game.play(action)
        assert rows.shape == (8,) and record.clean_correct.shape == (8,)
        probed_rows.append(rows.tolist())
        measured = torch.zeros(32, dtype=torch.bool)
        measured[rows] = True
        for name in ("l2", "l3"):  # 4 x the 0/1 accuracy on the probed images, 0 elsewhere
            assert set(record.terms[name][measured].tolist()) <= {0.0, 4.0}
            assert not record.terms[name][~measured].any()
        torch.testing.assert_close(record.terms["l3"][rows] / 4, record.clean_correct.float())
        expected_before = 4 * (4.0 * before.probe_correct.float() + 2.0 * before.clean_correct.float())
        torch.testing.assert_close(record.terms_before[rows], expected_before)
        assert not record.terms_before[~measured].any()
    assert len({tuple(r) for r in probed_rows}) == 3  # drawn fresh each reward step


def test_the_command_line_asks_the_env_for_the_probe_when_the_credit_needs_it(digits, tmp_path):
    from hydra import compose, initialize_config_dir

    from experiments.training.loop import build_game
    from experiments.config.settings import settings_from_config

    def settings(credit):
        with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "experiments" / "conf"),
                                   version_base="1.3"):
            cfg = compose("config", overrides=["logger=none", "agent.k=2", f"agent.credit={credit}", "data.batch_size=32",
                                               "data.epochs=1", "data.max_steps_per_epoch=4"])
        return settings_from_config(cfg, tmp_path)

    for credit, wanted in (("unbiased", True), ("per_image", False)):
        assert settings(credit).env.reward.pre_update_probe is wanted
    # The unbiased agent plays a short episode end to end and learns on every reward step.
    env, agent, _ = build_game(settings("unbiased"), digits)
    obs, info = env.reset(seed=0)
    done, updates = False, 0
    while not done:
        obs, reward, done, _, info = env.step(agent.act(obs, info))
        assert ("batch_terms_before" in info) == info["reward_computed"]
        m = agent.learn(reward, info)
        if m:
            updates += 1
            assert torch.isfinite(m["policy_loss"])
    assert updates == 2


def test_unbiased_run_resumes_exactly(tmp_path, digits):
    from dataclasses import replace as dc_replace

    from hydra import compose, initialize_config_dir

    from experiments.training.loop import train
    from experiments.runfolder.rundir import settings_hash
    from experiments.config.settings import settings_from_config

    conf = Path(__file__).resolve().parents[1] / "experiments" / "conf"
    overrides = ["data.epochs=2", "data.max_steps_per_epoch=4", "data.batch_size=32", "eval.test_subset=32",
                 "eval.train_subset=32", "eval.final_n=32", "eval.final_attacks=[clean,pgd2]", "eval.pgd_iterations=2",
                 "agent.k=2", "agent.credit=unbiased", "logger=none", "progress=false", "threads=1"]
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=overrides)

    def settings(run_dir, **changes):
        return dc_replace(settings_from_config(cfg, run_dir, settings_hash=settings_hash(cfg)), **changes)

    whole = train(settings(tmp_path / "whole"), data=digits)
    train(settings(tmp_path / "split", stop_after_epochs=1), data=digits)
    resumed = train(settings(tmp_path / "split", resume=True), data=digits)
    assert (resumed.run_dir / "metrics.json").read_bytes() == (whole.run_dir / "metrics.json").read_bytes()
    assert whole.history[-1]["train"]["agent/advantage_scale"] > 0
