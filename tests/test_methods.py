"""Training methods (issue 11): TRADES and AWP against their formulas, the 4th strategy column
end to end, and every agent playing every method on a short digits episode."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agents import AgentSpec, FixedAgent, RandomAgent, ReinforceAgent
from agents.sb3 import SB3Agent
from las_env import LASEnv
from las_env.attack import per_image_pgd
from las_env.methods import AWP, PGDAT, TRADES, MethodBatch, MethodConfig, build_method
from las_env.models import build_model
from las_env.optim import OptimConfig
from las_env.validate import SettingError

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from examples.custom_agent import EpsilonGreedyBandit  # noqa: E402

PLAIN = OptimConfig(lr=0.1, momentum=0.9, weight_decay=0.0, schedule="constant")
TRADES_GRID = {"step_sizes": [0.05], "iterations": [1, 3], "epsilons": [0.1, 0.2], "extra": {"trades_beta": [0, 1, 6]}}


class Scale(nn.Module):
    """logits = w * x: the inputs ARE the logits (times one trainable scalar)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.w * x


# ------------------------------------------------------------------------------ TRADES


def test_trades_loss_equals_the_formula_with_per_image_beta():
    g = torch.Generator().manual_seed(0)
    clean, adv = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    y = torch.randint(0, 5, (7,), generator=g)
    beta = torch.rand(7, generator=g) * 9
    out = TRADES(beta=99.0).loss(Scale(), MethodBatch(clean, adv, y, {"trades_beta": beta}), PLAIN, "fp32")
    # By hand in float64: CE_i = -log p_clean[y_i], KL_i = sum_j p_c,j * log(p_c,j / p_a,j).
    ce, kl = [], []
    for i in range(7):
        pc = torch.softmax(clean[i].double(), 0)
        pa = torch.softmax(adv[i].double(), 0)
        ce.append(-torch.log(pc[y[i]]))
        kl.append(sum(pc[j] * torch.log(pc[j] / pa[j]) for j in range(5)))
    ce, kl = torch.stack(ce), torch.stack(kl)
    expected_per_image = ce + beta.double() * kl
    torch.testing.assert_close(out.per_image.double(), expected_per_image, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), expected_per_image.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.correct, adv.argmax(1) == y)
    # Without the column, every image has the constant beta.
    const = TRADES(beta=6.0).loss(Scale(), MethodBatch(clean, adv, y), PLAIN, "fp32")
    torch.testing.assert_close(const.per_image.double(), ce + 6.0 * kl, rtol=1e-5, atol=1e-6)


def test_trades_clean_softmax_is_not_detached():
    clean, adv, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    model = Scale()
    TRADES(beta=6.0).loss(model, MethodBatch(clean, adv, y), PLAIN, "fp32").loss.backward()
    # d/dw of CE(w*clean) + 6*KL(w*clean || w*adv), by central finite differences.
    def value(w: float) -> float:
        lc, la = w * clean.double(), w * adv.double()
        pc = lc.softmax(1)
        kl = (pc * (lc.log_softmax(1) - la.log_softmax(1))).sum(1)
        return float(F.cross_entropy(lc, y) + 6.0 * kl.mean())
    h = 1e-5
    assert model.w.grad.item() == pytest.approx((value(1 + h) - value(1 - h)) / (2 * h), rel=1e-4)


def test_trades_attack_increases_the_kl_and_stays_in_each_ball(digits):
    torch.manual_seed(0)
    model = build_model("small_cnn", 1, 10)
    x, y = digits.x_train[:48], digits.y_train[:48]
    eps = torch.tensor([0.05, 0.1, 0.2, 0.3]).repeat(12)
    step = eps / 4
    iters = torch.tensor([0, 2, 5, 10]).repeat_interleave(12)
    loss, p_clean = TRADES().attack_objective(model, x, y, "fp32")
    start = 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    x_adv = per_image_pgd(model, x, p_clean, eps, step, iters, start=start, loss=loss)
    delta = (x_adv - x).flatten(1).abs().amax(1)
    assert bool((delta <= eps + 1e-6).all()) and x_adv.min() >= 0 and x_adv.max() <= 1
    model.eval()
    with torch.no_grad():
        kl_start = F.kl_div(model((x + start).clamp(0, 1)).log_softmax(1), p_clean, reduction="none").sum(1)
        kl_adv = F.kl_div(model(x_adv).log_softmax(1), p_clean, reduction="none").sum(1)
    attacked = iters > 0
    assert (kl_adv[attacked] > kl_start[attacked]).float().mean() >= 0.9
    assert kl_adv[attacked].mean() > 10 * kl_start[attacked].mean()


# --------------------------------------------------------------------------------- AWP


def _batch(digits, n=32):
    x, y = digits.x_train[:n], digits.y_train[:n]
    return MethodBatch(x, (x + 0.1 * torch.randn_like(x)).clamp(0, 1), y)


@pytest.mark.parametrize("base", ["pgd_at", "trades"])
def test_awp_step_equals_an_unperturbed_step_with_the_gradient_at_the_perturbed_point(digits, base):
    torch.manual_seed(0)
    model = build_model("small_cnn", 1, 10)
    batch = _batch(digits)
    base_method = TRADES() if base == "trades" else PGDAT()
    # Reference: the same perturbation, the gradient at w + v, a plain optimiser step from w.
    reference, at_v, plain = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    pairs = AWP(base_method, gamma=0.05).perturbation(copy.deepcopy(model), batch, PLAIN, "fp32")
    with torch.no_grad():
        for (_, v), (name, p) in zip(pairs, [(n, p) for n, p in at_v.named_parameters() if p.dim() >= 2]):
            p.add_(v)
    at_v.train()
    base_method.loss(at_v, batch, PLAIN, "fp32").loss.backward()
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for p, q in zip(reference.parameters(), at_v.parameters()):
        p.grad = q.grad.clone()
    opt.step()
    awp = AWP(base_method, gamma=0.05)
    awp.step(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), batch, PLAIN, "fp32")
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    # ...and not the step without the perturbation.
    base_method.step(plain, torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9), batch, PLAIN, "fp32")
    assert max(float((p - q).abs().max()) for p, q in zip(model.parameters(), plain.parameters())) > 1e-4
    assert gamma_norms_hold(pairs, 0.05)


def gamma_norms_hold(pairs, gamma) -> bool:
    norms = [(float(v.norm()), float(p.detach().norm())) for p, v in pairs]
    return all(abs(nv - gamma * nw) <= 1e-5 * nw for nv, nw in norms)


def test_awp_perturbs_each_weight_tensor_by_gamma_norm_and_leaves_bn_and_biases_alone(digits):
    torch.manual_seed(0)
    model = build_model("small_cnn", 1, 10)
    batch = _batch(digits)
    awp = AWP(PGDAT(), gamma=0.01)
    pairs = awp.perturbation(model, batch, PLAIN, "fp32")
    weights = [p for p in model.parameters() if p.dim() >= 2]
    assert [id(p) for p, _ in pairs] == [id(p) for p in weights] and len(weights) < len(list(model.parameters()))
    assert gamma_norms_hold(pairs, 0.01)
    assert all(float(v.abs().max()) > 0 for _, v in pairs)
    # A step with lr 0: weights come back (float tolerance), biases and BatchNorm are never touched.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    still = torch.optim.SGD(model.parameters(), lr=0.0)
    awp.step(model, still, batch, PLAIN, "fp32")
    for n, p in model.named_parameters():
        if p.dim() >= 2:
            torch.testing.assert_close(p, before[n], rtol=0, atol=1e-7)
        else:
            assert torch.equal(p, before[n]), n
    # One persistent proxy: the second step reuses it.
    proxy = awp._proxy
    awp.step(model, still, batch, PLAIN, "fp32")
    assert awp._proxy is proxy


def test_awp_warm_up_trains_unperturbed(digits):
    torch.manual_seed(0)
    model = build_model("small_cnn", 1, 10)
    twin = copy.deepcopy(model)
    batch = _batch(digits)
    AWP(PGDAT(), gamma=0.5, warmup_epochs=2).step(model, torch.optim.SGD(model.parameters(), lr=0.1), batch,
                                                  PLAIN, "fp32", epoch=1)
    PGDAT().step(twin, torch.optim.SGD(twin.parameters(), lr=0.1), batch, PLAIN, "fp32")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


# --------------------------------------------------------------------- the game and agents


def test_a_four_column_action_reaches_the_attack_and_the_loss(digits):
    env = LASEnv(data=digits, tensor_api=True, batch_size=6, epochs=1, max_steps_per_epoch=2, method="trades",
                 grid=TRADES_GRID, reward={"measure": "loss", "l1_forward": "train"}, reward_interval=1)
    assert env.action_space.shape == (6, 4) and env.space.columns[3] == "trades_beta"
    seen = {}
    loss = env.game.method.loss

    def spy(model, batch, optim, precision):
        seen["beta"] = batch.extras["trades_beta"].clone()
        return loss(model, batch, optim, precision)

    env.game.method.loss = spy
    env.reset(seed=0)
    action = torch.tensor([[0, 1, 1, b] for b in (0, 1, 2, 2, 1, 0)])
    _, _, _, _, info = env.step(action)
    torch.testing.assert_close(seen["beta"], torch.tensor([0.0, 1, 6, 6, 1, 0]))
    torch.testing.assert_close(info["epsilon"], torch.full((6,), 0.2))
    assert torch.isfinite(info["l1"]).all()


def test_a_trades_beta_column_without_trades_is_refused():
    with pytest.raises(SettingError, match="method=trades"):
        LASEnv(dataset="digits", grid=TRADES_GRID, method="pgd_at")
    with pytest.raises(SettingError, match="pgd_at"):
        MethodConfig(name="mart")
    assert isinstance(build_method(MethodConfig(name="awp", awp_base="trades")).base, TRADES)


def _spec(env: LASEnv) -> AgentSpec:
    g = env.game
    return AgentSpec(grid=env.space, observation_shape=env.observation_space.shape, num_classes=10, dataset="digits",
                     device=g.device, total_steps=g.total_steps, steps_per_epoch=g.steps_per_epoch, seed=0,
                     reward_interval=g.config.reward_interval)


AGENTS = {
    "reinforce": lambda s: ReinforceAgent(s, credit="per_image"),
    "fixed": lambda s: FixedAgent(s, extra={"trades_beta": 6.0} if len(s.grid.nvec) > 3 else None),
    "random": lambda s: RandomAgent(s),
    "ppo": lambda s: SB3Agent(s, algo="ppo", n_steps=2, batch_size=16, n_epochs=1),
    "custom": lambda s: EpsilonGreedyBandit(s),
}


@pytest.mark.parametrize("agent", sorted(AGENTS))
@pytest.mark.parametrize("method", ["trades", "awp"])
def test_every_agent_plays_every_method(digits, agent, method):
    # The example custom agent plays three columns: with it TRADES has one beta for every image.
    grid = TRADES_GRID if method == "trades" and agent != "custom" else None
    env = LASEnv(data=digits, tensor_api=True, batch_size=16, epochs=1, max_steps_per_epoch=4, method=method,
                 grid=grid, reward_interval=None if agent in ("fixed", "random") else 2)
    player = AGENTS[agent](_spec(env))
    obs, info = env.reset(seed=0)
    done = False
    while not done:
        action = player.act(obs, info)
        assert action.shape == env.action_space.shape
        obs, reward, done, _, info = env.step(action)
        player.learn(reward, info)
        assert torch.isfinite(info["train_loss"]).all()
    assert env.game.step_index == 4
