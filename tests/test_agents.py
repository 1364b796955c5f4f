"""Agents: protocol conformance, actions, the REINFORCE update (checked against a manual
computation), clipping, exact resume, the non-learning baselines, one env episode, and
a learning sanity check on a synthetic bandit (per-image credit vs the paper's scalar)."""

from __future__ import annotations

from dataclasses import replace

import copy
import math

import pytest
import torch
from torch.distributions import Categorical

from agents import Agent, AgentSpec, FixedAgent, RandomAgent, ReinforceAgent, StrategyNet
from agents.strategy_net import sample_categoricals
from las_env import LASEnv
from las_env.datasets.registry import lookup

SHAPES = {"digits": (1, 8, 8), "cifar10": (3, 32, 32)}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _one_thread():
    # These networks are tiny: a second intra-op thread only adds synchronisation, which on a
    # shared, loaded CPU costs more than the work itself. Restored after each test.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_spec(dataset: str = "digits", batch: int = 16, device: str = "cpu", total_steps: int = 100, seed: int = 0,
              k: int | None = 1):
    return AgentSpec(
        grid=lookup(dataset).grid,
        observation_shape=(batch, *SHAPES[dataset]),
        num_classes=10,
        dataset=dataset,
        device=torch.device(device),
        total_steps=total_steps,
        steps_per_epoch=10,
        seed=seed,
        reward_interval=k,
    )


def images(spec: AgentSpec, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(spec.observation_shape, generator=g).to(spec.device)


def reward_info(rewards: torch.Tensor) -> dict:
    return {"reward_computed": True, "rewards": rewards, "reward_next_step": False}


LEARN = {"reward_next_step": True}
NO_LEARN = {"reward_next_step": False}


def flat_params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def all_agents(spec: AgentSpec):
    return [ReinforceAgent(replace(spec, reward_interval=3), credit="per_image"), FixedAgent(spec), RandomAgent(spec)]


# --------------------------------------------------------------------------- protocol


@pytest.mark.parametrize("device", DEVICES)
def test_agents_follow_the_protocol_and_return_valid_actions(device):
    spec = make_spec(device=device)
    x = images(spec)
    nvec = torch.tensor(spec.grid.nvec, device=device)
    for agent in all_agents(spec):
        assert isinstance(agent, Agent), type(agent).__name__
        for info in (NO_LEARN, LEARN):
            a = agent.act(x, info)
            assert a.shape == (16, 3) and a.dtype == torch.long and a.device.type == device
            assert not a.requires_grad
            assert ((a >= 0) & (a < nvec)).all()
        assert isinstance(agent.state_dict(), dict)


def test_reinforce_needs_reward_steps_and_takes_its_k_from_the_spec():
    with pytest.raises(ValueError, match="reward_interval=k"):
        ReinforceAgent(make_spec(k=None))
    agent = ReinforceAgent(make_spec(total_steps=70, k=7), lr_milestones=[0.5])
    assert agent.state_dict()["hparams"]["k"] == 7 and agent._lr_milestone_updates == [5]  # 70 // 7 = 10 updates


# ------------------------------------------------------------------------ StrategyNet


def test_strategy_net_heads_start_uniform_and_sample_consistently():
    spec = make_spec()
    torch.manual_seed(0)
    net = StrategyNet("small_cnn", 1, spec.grid.nvec)
    x = images(spec)
    logits = net(x)
    assert [z.shape for z in logits] == [(16, n) for n in spec.grid.nvec]
    for p, n in zip(net.probs(x), spec.grid.nvec):
        torch.testing.assert_close(p, torch.full_like(p, 1 / n))
    dists = net.distribution(x)
    assert all(isinstance(d, Categorical) for d in dists)
    actions, log_prob, entropy = net.sample(x, torch.Generator().manual_seed(0))
    expected_lp = sum(d.log_prob(actions[:, j]) for j, d in enumerate(dists))
    torch.testing.assert_close(log_prob, expected_lp)
    torch.testing.assert_close(entropy, torch.full((16,), sum(math.log(n) for n in spec.grid.nvec)))
    # Without zero heads the initial strategy is not uniform.
    net2 = StrategyNet("small_cnn", 1, spec.grid.nvec, zero_init_heads=False)
    assert not torch.allclose(net2.probs(x)[2], torch.full((16, 6), 1 / 6))


def test_strategy_net_sampling_follows_the_probabilities():
    # Gumbel-max must sample from softmax(logits): compare frequencies on fixed logits.
    logits = [torch.tensor([[2.0, 0.0, -1.0, 0.5]]).repeat(20000, 1)]
    a = sample_categoricals(logits, torch.Generator().manual_seed(0))
    freq = torch.bincount(a[:, 0], minlength=4).float() / 20000
    torch.testing.assert_close(freq, logits[0][0].softmax(0), atol=0.015, rtol=0)


def test_resnet18_strategy_for_cifar():
    spec = make_spec("cifar10", batch=2)
    agent = ReinforceAgent(spec, credit="per_image")
    assert agent.backbone == "resnet18" and agent.net.feature_dim == 512
    assert ReinforceAgent(make_spec()).backbone == "small_cnn"
    a = agent.act(images(spec), NO_LEARN)
    assert a.shape == (2, 3) and (a < torch.tensor(spec.grid.nvec)).all()


# ------------------------------------------------------------------- REINFORCE update


def test_non_learning_steps_keep_no_graph_and_learning_steps_do():
    spec = make_spec()
    agent = ReinforceAgent(replace(spec, reward_interval=2), credit="per_image")
    x = images(spec)
    agent.act(x, NO_LEARN)
    assert agent._pending is None
    agent.act(x, LEARN)
    assert agent._pending is not None
    assert agent._pending.log_prob.requires_grad and agent._pending.log_prob.shape == (16,)
    with torch.no_grad():  # a caller's no_grad does not stop the learning step's graph
        agent.act(x, LEARN)
    assert agent._pending.log_prob.requires_grad
    # A learning act followed by a non-learning act drops the graph.
    agent.act(x, NO_LEARN)
    assert agent._pending is None


def test_learn_ignores_steps_without_the_full_reward():
    spec = make_spec()
    agent = ReinforceAgent(replace(spec, reward_interval=2), credit="per_image", lr=0.1)
    x = images(spec)
    before = flat_params(agent.net)
    agent.act(x, LEARN)
    assert agent.learn(torch.tensor(0.0), {"reward_computed": False, "rewards": torch.ones(16)}) == {}
    assert agent._pending is None and agent.updates == 0
    # A reward step whose act kept nothing (an env other than the spec's): skipped.
    agent.act(x, NO_LEARN)
    assert agent.learn(torch.tensor(1.0), reward_info(torch.ones(16))) == {}
    torch.testing.assert_close(flat_params(agent.net), before, rtol=0, atol=0)


def _manual_update(agent: ReinforceAgent, x, actions, advantage, entropy_coef=0.0):
    """Parameters after one plain-SGD step (no momentum/clip) on the loss written out by hand."""
    net = copy.deepcopy(agent.net)
    logits = net(x)
    log_prob = sum(z.log_softmax(1).gather(1, actions[:, j : j + 1]).squeeze(1) for j, z in enumerate(logits))
    entropy = sum(-(z.softmax(1) * z.log_softmax(1)).sum(1) for z in logits).mean()
    policy_loss = (-advantage * log_prob).mean()
    (policy_loss - entropy_coef * entropy).backward()
    lr = agent.optimizer.param_groups[0]["lr"]
    new = torch.cat([(p - lr * p.grad).detach().flatten() for p in net.parameters()])
    return policy_loss.detach(), new


def _trained_agent(**kw) -> ReinforceAgent:
    # Non-zero heads, so the backbone's gradient is non-zero too and the check covers it.
    spec = make_spec()
    return ReinforceAgent(replace(spec, reward_interval=1), lr=0.05, grad_clip=0, zero_init_heads=False, **kw)


def test_paper_credit_matches_the_authors_loss():
    agent = _trained_agent(credit="paper")
    x = images(agent.spec)
    rewards = torch.linspace(0.5, 9.0, 16)
    actions = agent.act(x, LEARN)
    # The authors: sum over heads of mean(-log p_h * R), R the batch's mean reward.
    expected_loss, expected_params = _manual_update(agent, x, actions, rewards.mean().expand(16))
    net = copy.deepcopy(agent.net)
    heads_sum = sum(
        (-z.log_softmax(1).gather(1, actions[:, j : j + 1]).squeeze(1) * rewards.mean()).mean()
        for j, z in enumerate(net(x))
    )
    torch.testing.assert_close(heads_sum.detach(), expected_loss)
    m = agent.learn(rewards.mean(), reward_info(rewards))
    torch.testing.assert_close(m["policy_loss"], expected_loss)
    torch.testing.assert_close(flat_params(agent.net), expected_params)
    torch.testing.assert_close(m["reward_mean"], rewards.mean())
    torch.testing.assert_close(m["epsilon_idx"], actions[:, 2].float().mean())
    grid_eps = torch.tensor(agent.spec.grid.epsilons)
    torch.testing.assert_close(m["epsilon"], grid_eps[actions[:, 2]].mean())


@pytest.mark.parametrize("normalize", [True, False])
def test_per_image_credit_uses_a_running_baseline(normalize):
    agent = _trained_agent(credit="per_image", normalize_advantages=normalize, entropy_coef=0.05)
    x1, x2 = images(agent.spec, 1), images(agent.spec, 2)
    r1 = torch.linspace(1.0, 5.0, 16)
    r2 = torch.linspace(2.0, 10.0, 16).flip(0)

    # Update 1: the baseline starts at this batch's mean.
    a1 = agent.act(x1, LEARN)
    adv1 = r1 - r1.mean()
    sq = adv1.square().mean()
    if normalize:
        adv1 = adv1 / sq.sqrt()
    loss1, params1 = _manual_update(agent, x1, a1, adv1, entropy_coef=0.05)
    m1 = agent.learn(r1.mean(), reward_info(r1))
    torch.testing.assert_close(m1["baseline"], r1.mean())
    torch.testing.assert_close(m1["policy_loss"], loss1)
    torch.testing.assert_close(flat_params(agent.net), params1)

    # Update 2: the baseline used is the first batch's; it moves by the EMA afterwards.
    a2 = agent.act(x2, LEARN)
    adv2 = r2 - r1.mean()
    if normalize:
        sq = 0.9 * sq + 0.1 * adv2.square().mean()
        adv2 = adv2 / sq.sqrt()
    loss2, params2 = _manual_update(agent, x2, a2, adv2, entropy_coef=0.05)
    m2 = agent.learn(r2.mean(), reward_info(r2))
    torch.testing.assert_close(m2["baseline"], r1.mean())
    torch.testing.assert_close(m2["policy_loss"], loss2)
    torch.testing.assert_close(flat_params(agent.net), params2)
    torch.testing.assert_close(agent.baseline, 0.9 * r1.mean() + 0.1 * r2.mean())
    for name in ("policy_loss", "reward_mean", "baseline", "entropy", "grad_norm", "epsilon_idx"):
        assert isinstance(m2[name], torch.Tensor) and m2[name].dim() == 0 and not m2[name].requires_grad


def test_gradient_norm_is_clipped():
    spec = make_spec()
    agent = ReinforceAgent(replace(spec, reward_interval=1), credit="paper", lr=1.0, grad_clip=1e-3, zero_init_heads=False)
    x = images(spec)
    before = flat_params(agent.net)
    agent.act(x, LEARN)
    m = agent.learn(torch.tensor(50.0), reward_info(torch.full((16,), 50.0)))
    assert m["grad_norm"] > 1e-3  # the raw gradient is far larger than the clip...
    step = (flat_params(agent.net) - before).norm()
    assert step <= 1e-3 * (1 + 1e-4)  # ...but plain SGD at lr 1 moved exactly the clipped norm
    assert step >= 1e-3 * (1 - 1e-4)


def test_state_dict_round_trip_reproduces_the_run_exactly():
    spec = make_spec()

    def play(agent, steps, seed0):
        out = []
        for s in range(steps):
            x = images(spec, seed0 + s)
            info = LEARN if s % 2 else NO_LEARN
            a = agent.act(x, info)
            out.append(a)
            r = (a[:, 2] == 2).float() + 0.1 * a[:, 1].float()
            agent.learn(r.mean(), {**reward_info(r), "reward_computed": bool(s % 2)})
        return out

    a = ReinforceAgent(replace(spec, reward_interval=2), credit="per_image", optimizer="adam", lr=1e-2, seed=3)
    play(a, 6, 0)
    state = copy.deepcopy(a.state_dict())
    continued = play(a, 6, 100)

    b = ReinforceAgent(replace(spec, reward_interval=2), credit="per_image", optimizer="adam", lr=1e-2, seed=99)  # different init, overwritten
    b.load_state_dict(state)
    resumed = play(b, 6, 100)
    for x, y in zip(continued, resumed):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    torch.testing.assert_close(flat_params(a.net), flat_params(b.net), rtol=0, atol=0)
    torch.testing.assert_close(a.baseline, b.baseline, rtol=0, atol=0)
    assert a.updates == b.updates == 6


def test_seed_determines_the_agent_and_leaves_global_rng_alone():
    spec = make_spec()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a1 = ReinforceAgent(spec, credit="per_image", seed=5, zero_init_heads=False)
    assert torch.equal(torch.rand(3), expected)
    a2 = ReinforceAgent(spec, credit="per_image", seed=5, zero_init_heads=False)
    x = images(spec)
    assert torch.equal(a1.act(x, NO_LEARN), a2.act(x, NO_LEARN))
    assert torch.equal(flat_params(a1.net), flat_params(a2.net))


def test_bad_settings_raise():
    spec = make_spec()
    for kw in ({"credit": "batch"}, {"optimizer": "rmsprop"}, {"lr": 0}, {"baseline_momentum": 1.0}):
        with pytest.raises(ValueError):
            ReinforceAgent(spec, **kw)


# ------------------------------------------------------------------------- baselines


def test_fixed_agent_plays_pgd_at_of_the_threat_model_on_cifar():
    spec = make_spec("cifar10", batch=8)
    agent = FixedAgent(spec)
    threat = lookup("cifar10").threat
    a = agent.act(images(spec), NO_LEARN)
    grid = spec.grid
    assert torch.equal(a, a[:1].expand(8, 3))
    i_step, i_iter, i_eps = a[0].tolist()
    assert math.isclose(grid.step_sizes[i_step], threat.step_size) and math.isclose(threat.step_size, 2 / 255)
    assert grid.iterations[i_iter] == lookup("cifar10").fixed_iterations == 10
    assert math.isclose(grid.epsilons[i_eps], threat.epsilon) and math.isclose(threat.epsilon, 8 / 255)
    assert agent.act(images(spec), NO_LEARN) is a  # preallocated, no per-step allocation
    assert agent.learn(torch.tensor(0.0), reward_info(torch.ones(8))) == {}
    # Explicit values: on the grid they are played, off the grid they raise.
    assert FixedAgent(spec, epsilon=12 / 255, iterations=5).epsilon == pytest.approx(12 / 255)
    with pytest.raises(ValueError, match="not on the cifar10 strategy grid"):
        FixedAgent(spec, epsilon=7.5 / 255)


def test_fixed_agent_on_digits_defaults_or_warns():
    spec = make_spec("digits")
    threat = lookup("digits").threat
    if any(math.isclose(v, threat.step_size) for v in spec.grid.step_sizes):
        agent = FixedAgent(spec)
    else:  # the default step size is not on the digits grid: nearest value, said out loud
        with pytest.warns(UserWarning, match="not on the strategy grid"):
            agent = FixedAgent(spec)
    assert agent.epsilon == pytest.approx(threat.epsilon)
    assert agent.iterations == lookup("digits").fixed_iterations
    assert min(abs(v - threat.step_size) for v in spec.grid.step_sizes) == pytest.approx(
        abs(agent.step_size - threat.step_size)
    )


def test_random_agent_covers_the_grid_uniformly_and_resumes():
    spec = make_spec("cifar10", batch=4000)
    agent = RandomAgent(spec, seed=7)
    x = torch.empty(spec.observation_shape[0], 1)  # only the batch size is read
    a = agent.act(x, NO_LEARN)
    for col, n in enumerate(spec.grid.nvec):
        freq = torch.bincount(a[:, col], minlength=n).float() / a.shape[0]
        assert freq.shape == (n,) and (freq > 0).all()
        torch.testing.assert_close(freq, torch.full((n,), 1 / n), atol=0.03, rtol=0)
    state = copy.deepcopy(agent.state_dict())
    nxt = agent.act(x, NO_LEARN)
    other = RandomAgent(spec, seed=0)
    other.load_state_dict(state)
    assert torch.equal(other.act(x, NO_LEARN), nxt)
    assert not torch.equal(RandomAgent(spec, seed=8).act(x, NO_LEARN), a)


# ----------------------------------------------------------------------- integration


def test_reinforce_agent_drives_the_env(digits):
    k = 2
    env = LASEnv(data=digits, tensor_api=True, batch_size=32, epochs=1, max_steps_per_epoch=6, reward_interval=k)
    game = env.game
    spec = AgentSpec(
        grid=env.space,
        observation_shape=env.observation_space.shape,
        num_classes=digits.num_classes,
        dataset="digits",
        device=game.device,
        total_steps=game.total_steps,
        steps_per_epoch=game.steps_per_epoch,
        seed=0,
    )
    agent = ReinforceAgent(replace(spec, reward_interval=k), credit="per_image", lr=1e-2)
    before = {n: p.detach().clone() for n, p in agent.net.named_parameters()}
    obs, info = env.reset(seed=0)
    done, logged = False, []
    while not done:
        action = agent.act(obs, info)
        obs, reward, done, _, info = env.step(action)
        metrics = agent.learn(reward, info)
        assert bool(metrics) == info["reward_computed"]
        if metrics:
            logged.append(metrics)
    assert agent.updates == len(logged) == 3
    assert all(torch.isfinite(m["policy_loss"]) for m in logged)
    changed = [n for n, p in agent.net.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("heads") for n in changed) and any(n.startswith("backbone") for n in changed)


# ------------------------------------------------------------------ learning sanity


def _bandit(credit: str, updates: int, batch: int = 32, target: int = 3, seed: int = 0, stop_at: float = 2.0):
    """Per image: reward ``4 + 1[epsilon index == target] + 2 * N(0, 1)``, an offset and noise
    like the real reward's (accuracy measure: mean ~4-5, per-image std ~2). Returns the mean
    P(target) over a fixed batch after each update, stopping once it reaches ``stop_at``."""
    spec = make_spec(batch=batch, seed=seed)
    agent = ReinforceAgent(replace(spec, reward_interval=1), credit=credit, optimizer="adam", lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    x_eval = torch.rand((64, 1, 8, 8), generator=g)
    probs: list[float] = []
    for _ in range(updates):
        a = agent.act(torch.rand((batch, 1, 8, 8), generator=g), LEARN)
        r = 4.0 + (a[:, 2] == target).float() + 2.0 * torch.randn(batch, generator=g)
        agent.learn(r.mean(), reward_info(r))
        probs.append(agent.net.probs(x_eval)[2][:, target].mean().item())
        if probs[-1] >= stop_at:
            break
    return probs


def test_per_image_credit_learns_a_bandit_faster_than_the_paper_credit():
    per_image = _bandit("per_image", 100, stop_at=0.9)
    assert per_image[-1] >= 0.9, f"per-image REINFORCE did not reach P=0.9 in 100 updates: {per_image[-1]:.3f}"
    paper = _bandit("paper", len(per_image))
    # The paper's one scalar per batch credits each image with 1/B of its own reward, on top of
    # an uncentred offset: after as many updates it is still close to the uniform 1/6.
    assert paper[-1] < 0.5, (len(per_image), paper[-1])
