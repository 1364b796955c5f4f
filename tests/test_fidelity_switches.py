"""Every ours-vs-the-authors' switch does what its name says, and ``LASGame.score`` changes nothing.

Switches: ``attack_start``, ``attack_clip``, ``last_batch``, ``augment_padding``, ``model_init``
(LASConfig); ``reward.l1_forward``, ``reward.l1_clamp_scope``, ``reward.probe_restarts``;
``agent.reward_flow``, ``agent.bn_mode``, ``agent.backbone_init``; ``method.awp_clean_forward``,
``method.awp_proxy_loss``. The early stops (``reward.probe_early_stop``, ``eval.early_stop``):
tests/test_early_stop.py.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agents import AgentSpec, ReinforceAgent
from las_env import LASEnv
from las_env.attack import GradientCount, per_image_pgd, pgd
from las_env.game_config import LASConfig
from las_env.game import LASGame
from las_env.datasets.registry import lookup
from las_env.reward import RewardConfig, probe_updated_target, reward_terms

CONF = Path(__file__).resolve().parents[1] / "experiments" / "conf"


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def game(digits, seed: int = 0, **kw) -> LASGame:
    settings = dict(batch_size=32, epochs=1, max_steps_per_epoch=6, reward_interval=1)
    settings.update(kw)
    g = LASGame(LASConfig(**settings), data=digits)
    g.reset(seed)
    return g


def actions(g: LASGame, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    b = g.config.batch_size
    return torch.stack([torch.randint(0, n, (b,), generator=gen) for n in g.space.nvec], dim=1)


class Flat(nn.Module):
    """A classifier whose input gradient is zero: PGD never moves, x_adv is the projected start."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(10))

    def forward(self, x):
        return (x * 0).flatten(1).sum(1, keepdim=True) + self.bias


# ----------------------------------------------------------------------------- attack start


@pytest.mark.parametrize("start", ["own_ball", "threat_ball"])
def test_attack_start_draws_in_the_own_or_the_threat_models_ball(digits, start):
    g = game(digits, attack_start=start)
    g.target = Flat()
    b, radius = 64, g.threat.epsilon  # digits: 0.2
    x = torch.full((b, 1, 8, 8), 0.5)  # no [0, 1] clipping anywhere
    y = torch.zeros(b, dtype=torch.long)
    eps = torch.tensor([0.05, 0.3] * (b // 2))
    ones = torch.ones(b)
    chosen = {"step_size": ones * 0.05, "iterations": ones.long(), "epsilon": eps}
    delta = (g._attack(x, y, chosen, g.rng, GradientCount()) - x).abs().flatten(1)
    small, large = delta[0::2], delta[1::2]
    assert (small <= 0.05 + 1e-6).all() and (large <= 0.3 + 1e-6).all()  # always the own ball
    at_surface = (small >= 0.05 - 1e-6).float().mean().item()
    if start == "own_ball":
        assert at_surface < 0.01 and large.max() > 0.25
    else:
        # U(-0.2, 0.2) clipped to +-0.05: P(|u| >= 0.05) = 0.75; a 0.3 ball is never filled beyond 0.2.
        assert abs(at_surface - 0.75) < 0.05 and large.max() <= radius + 1e-6


class Slope(nn.Module):
    """Logits ``(0, -x_0)``, label 0: the CE gradient in the first pixel is always negative."""

    def forward(self, x):
        z = -x.flatten(1)[:, :1]
        return torch.cat([torch.zeros_like(z), z], dim=1)


@pytest.mark.parametrize("clip_start, expected", [(True, 0.5 + 2 / 255), (False, 0.5 + 3 / 255)])
def test_attack_clip_before_or_after_the_first_step(clip_start, expected):
    # eps 3/255, start +7/255 (the threat ball's), a step of 1/255 downwards. Ours clips the start to
    # +3 first: 3 - 1 = 2. The authors' step from +7: 7 - 1 = 6, then the projection: 3.
    x = torch.full((1, 1, 1, 1), 0.5)
    out = per_image_pgd(Slope(), x, torch.zeros(1, dtype=torch.long), torch.tensor([3 / 255]), torch.tensor([1 / 255]),
                        torch.tensor([1]), start=torch.full_like(x, 7 / 255), clip_start=clip_start)
    assert out.item() == pytest.approx(expected, abs=1e-6)
    # With no step at all, both end in the ball.
    none = per_image_pgd(Slope(), x, torch.zeros(1, dtype=torch.long), torch.tensor([3 / 255]), torch.tensor([1 / 255]),
                         torch.tensor([0]), start=torch.full_like(x, 7 / 255), clip_start=clip_start)
    assert none.item() == pytest.approx(0.5 + 3 / 255, abs=1e-6)


def test_the_game_passes_the_clip_order_to_its_attack(digits, monkeypatch):
    import las_env.game as game_module  # noqa: PLC0415

    seen = []
    monkeypatch.setattr(game_module, "per_image_pgd", lambda *a, **kw: seen.append(kw["clip_start"]) or a[1])
    for clip in ("start", "first_step"):
        g = game(digits, attack_start="threat_ball", attack_clip=clip)
        g.play(actions(g))
    assert seen == [True, False]


# ----------------------------------------------------------------------------- padding, initialisation


def test_reflect_padding_crops_only_image_pixels_mirrored_at_the_border():
    from las_env.augment import augment_batch  # noqa: PLC0415

    x = torch.arange(1, 1 + 2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)  # every pixel unique, none 0
    out = augment_batch(x.repeat(16, 1, 1, 1), torch.Generator().manual_seed(0), padding=3, pad_mode="reflect")
    zeros = augment_batch(x.repeat(16, 1, 1, 1), torch.Generator().manual_seed(0), padding=3)
    assert (zeros == 0).any() and not (out == 0).any()

    def mirror(i: int, n: int) -> int:  # reflect without repeating the edge: -1 -> 1, n -> n - 2
        return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)

    for img, src in zip(out, x.repeat(16, 1, 1, 1)):  # some shift (dy, dx) and flip explains every pixel
        found = False
        for dy in range(-3, 4):
            for dx in range(-3, 4):
                for flip in (False, True):
                    rows = [mirror(i + dy, 6) for i in range(6)]
                    cols = [mirror(j + dx, 6) for j in range(6)]
                    cand = src[:, rows][:, :, cols]
                    found |= torch.equal(cand.flip(-1) if flip else cand, img)
        assert found


@pytest.mark.parametrize("name", ["resnet18", "small_cnn"])
def test_init_kaiming_fan_out_or_pytorchs_defaults(name):
    from las_env.models import build_model  # noqa: PLC0415

    for init in ("kaiming", "pytorch"):
        torch.manual_seed(0)
        net = build_model(name, 3, 10, init=init)
        conv = next(m for m in net.modules() if isinstance(m, nn.Conv2d) and m.weight.numel() > 10_000)
        out_ch, in_ch, k, _ = conv.weight.shape
        std = conv.weight.std().item()
        if init == "kaiming":  # He normal, fan-out: std sqrt(2 / (out * k * k)); zero Linear biases
            assert std == pytest.approx(math.sqrt(2 / (out_ch * k * k)), rel=0.05)
            assert all((m.bias == 0).all() for m in net.modules() if isinstance(m, nn.Linear))
        else:  # PyTorch: U(-b, b), b = 1/sqrt(fan_in): std b/sqrt(3); Linear biases drawn too
            assert std == pytest.approx(1 / math.sqrt(in_ch * k * k) / math.sqrt(3), rel=0.05)
            assert all((m.bias != 0).any() for m in net.modules() if isinstance(m, nn.Linear))


def test_model_init_reaches_the_target_and_backbone_init_the_strategy(digits):
    g = game(digits, model="resnet18", model_init="pytorch")
    assert any((m.bias != 0).any() for m in g.target.modules() if isinstance(m, nn.Linear))
    kaiming = ReinforceAgent(spec(), backbone="resnet18").net.backbone.conv1.weight.std().item()
    pytorch = ReinforceAgent(spec(), backbone="resnet18", backbone_init="pytorch").net.backbone.conv1.weight.std().item()
    assert kaiming == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.15)
    assert pytorch == pytest.approx(1 / math.sqrt(1 * 9) / math.sqrt(3), rel=0.15)


# ----------------------------------------------------------------------------- AWP


def test_awp_clean_forward_moves_batchnorm_statistics_after_the_real_step_only(digits):
    from las_env.lookahead import lookahead_step  # noqa: PLC0415
    from las_env.methods import MethodConfig  # noqa: PLC0415

    states = {}
    for clean in (False, True):
        g = game(digits, method=MethodConfig(name="awp", awp_clean_forward=clean))
        x, y = g.batch
        x_adv = (x + 0.1).clamp(0, 1)
        look_model, _ = lookahead_step(g.target, x_adv, y, g.config.optim, g.trainer.lr, method=g.method, x=x)
        g.trainer.train_step(x_adv, y, x=x)
        states[clean] = (copy.deepcopy(g.target), look_model, x)
    plain, plain_look, x = states[False]
    with_clean, clean_look, _ = states[True]
    for a, b in zip(plain_look.buffers(), clean_look.buffers()):  # the look-ahead copies: no clean forward
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        plain.train()(x)  # the switch = one more train-mode forward of the clean batch, nothing else
    for (name, a), b in zip(plain.state_dict().items(), with_clean.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_awp_proxy_unsmoothed_climbs_plain_ce_whatever_the_step_smooths(digits):
    from dataclasses import replace  # noqa: PLC0415

    from las_env.methods import AWP, PGDAT, MethodBatch  # noqa: PLC0415

    g = game(digits)
    x, y = g.batch
    batch = MethodBatch(x, (x + 0.1).clamp(0, 1), y)
    smooth = replace(g.config.optim, true_class_prob=0.7)
    plain = replace(g.config.optim, true_class_prob=None)

    def v(proxy_loss, optim):
        return [d for _, d in AWP(PGDAT(), proxy_loss=proxy_loss).perturbation(g.target, batch, optim, "fp32")]

    for a, b in zip(v("unsmoothed", smooth), v("step", plain)):
        torch.testing.assert_close(a, b)
    assert not all(torch.allclose(a, b) for a, b in zip(v("step", smooth), v("step", plain)))


# ----------------------------------------------------------------------------- last batch


def test_last_batch_wrap_fills_the_partial_batch_from_the_epochs_first_images(digits):
    from las_env.game_config import steps_per_epoch  # noqa: PLC0415

    n, b = digits.x_train.shape[0], 64  # 1347 = 21 * 64 + 3
    drop = game(digits, batch_size=b, max_steps_per_epoch=None)
    wrap = game(digits, batch_size=b, max_steps_per_epoch=None, last_batch="wrap")
    assert (drop.steps_per_epoch, wrap.steps_per_epoch) == (n // b, n // b + 1)
    assert steps_per_epoch(n, b, None, "wrap") == wrap.steps_per_epoch == wrap.total_steps
    order, seen = wrap.epoch_order, []
    for i in range(wrap.steps_per_epoch):
        wrap.step_index = i
        wrap._load_batch()
        x, y = wrap.batch
        assert x.shape[0] == b  # Gymnasium's fixed observation shape
        idx = order[i * b:(i + 1) * b]
        if i == wrap.steps_per_epoch - 1:
            idx = torch.cat([idx, order[: b - idx.shape[0]]])
            assert idx.shape[0] == b and (n % b) == 3
        torch.testing.assert_close(x, digits.x_train[idx])
        torch.testing.assert_close(y, digits.y_train[idx])
        seen.append(idx)
    assert torch.cat(seen).unique().numel() == n  # every image trains every epoch


# ----------------------------------------------------------------------------- L1


@pytest.mark.parametrize("forward", ["train", "eval"])
def test_l1_comes_from_the_train_or_the_eval_mode_forward_of_the_target_before_its_step(digits, forward, monkeypatch):
    reward = RewardConfig(measure="loss", use_l2=False, use_l3=False, l1_forward=forward)
    g = game(digits, reward=reward)
    monkeypatch.setattr(g, "_attack", lambda x, *args: x)  # x_adv = x: L1 is computable here
    x, y = g.batch
    before = copy.deepcopy(g.target)
    with torch.no_grad():
        train_ce = F.cross_entropy(copy.deepcopy(before).train()(x), y, reduction="none")
        eval_ce = F.cross_entropy(before.eval()(x), y, reduction="none")
    assert not torch.allclose(train_ce, eval_ce)  # BatchNorm: the two forwards differ
    out = g.play(actions(g))
    torch.testing.assert_close(out.terms["l1"], train_ce if forward == "train" else eval_ce)


def test_l1_clamp_per_image_or_on_the_batch_mean():
    ce = torch.tensor([2.0, 30.0, 4.0, 12.0])  # mean 12
    per_image = reward_terms(RewardConfig(l1_clamp=10.0), ce, None)[0]["l1"]
    torch.testing.assert_close(per_image, torch.tensor([2.0, 10.0, 4.0, 10.0]))
    batch = reward_terms(RewardConfig(l1_clamp=10.0, l1_clamp_scope="batch_mean"), ce, None)[0]["l1"]
    torch.testing.assert_close(batch.mean(), torch.tensor(10.0))  # the authors' clamp(mean CE, 0, 10)
    torch.testing.assert_close(batch / ce, torch.full((4,), 10.0 / 12.0))  # same factor for every image
    small = torch.tensor([1.0, 3.0])  # mean below the clamp: untouched
    torch.testing.assert_close(reward_terms(RewardConfig(l1_clamp_scope="batch_mean"), small, None)[0]["l1"], small)


# ----------------------------------------------------------------------------- probe restarts


def test_probe_restarts_keep_per_image_the_restart_with_the_highest_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x, y = torch.rand(64, 1, 4, 4), torch.randint(0, 4, (64,))
    cfg = RewardConfig(use_l3=False, probe_iterations=2, probe_restarts=3)
    got = probe_updated_target(model, x, y, cfg, 0.3, 0.05, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        runs = [model(pgd(model, x, y, 0.3, 0.05, 2, generator=g)) for _ in range(3)]
    losses = torch.stack([F.cross_entropy(z, y, reduction="none") for z in runs])
    best = losses.argmax(0)
    correct = torch.stack([z.argmax(1) == y for z in runs])
    torch.testing.assert_close(got.probe_loss, losses.max(0).values)
    assert torch.equal(got.probe_correct, correct[best, torch.arange(64)])
    assert not torch.equal(correct.all(0), correct[0])  # the restarts matter on this model
    one = probe_updated_target(model, x, y, RewardConfig(use_l3=False, probe_iterations=2), 0.3, 0.05,
                               generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(one.probe_loss, losses[0])


# ----------------------------------------------------------------------------- score


def _snapshot(g: LASGame) -> dict:
    return copy.deepcopy({"target": g.target.state_dict(), "optim": g.trainer.optimizer.state_dict(),
                          "step": g.step_index, "trainer_step": g.trainer.step_count, "batch": g.batch,
                          "rng": g.rng.get_state(), "order_rng": g.order_rng.get_state(), "order": g.epoch_order})


def _assert_same(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        for u, v in zip(a, b):
            _assert_same(u, v)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("w_hat", ["this_step", "deepcopy"])
def test_score_changes_nothing_and_leaves_the_training_stream_as_it_was(digits, w_hat):
    scored, plain = game(digits, reward=RewardConfig(w_hat=w_hat)), game(digits, reward=RewardConfig(w_hat=w_hat))
    for _ in range(2):  # momentum buffers exist
        a = actions(scored, seed=_)
        scored.play(a), plain.play(a)
    before = _snapshot(scored)
    out = scored.score(actions(scored, seed=5))
    _assert_same(before, _snapshot(scored))
    assert out.reward_computed and out.step == scored.step_index and torch.isfinite(out.reward)
    assert out.probe_correct is not None and out.rewards.shape == (32,)
    a = actions(scored, seed=6)
    o1, o2 = scored.play(a), plain.play(a)  # the same step as if score had never been called
    assert torch.equal(o1.rewards, o2.rewards) and torch.equal(o1.train_loss, o2.train_loss)
    _assert_same(scored.target.state_dict(), plain.target.state_dict())


def test_score_with_this_step_measures_exactly_the_target_the_real_step_produces(digits, monkeypatch):
    g = game(digits, reward=RewardConfig(measure="loss", use_l2=False, w_hat="this_step"))
    monkeypatch.setattr(g, "_attack", lambda x, *args: x)  # no random start: the same examples
    for s in range(3):
        g.play(actions(g, seed=s))  # non-zero momentum: the look-ahead must continue it
    a = actions(g, seed=9)
    look, real = g.score(a), g.play(a)
    torch.testing.assert_close(look.terms["l3"], real.terms["l3"])  # -CE(clean) of the updated target
    torch.testing.assert_close(look.terms["l1"], real.terms["l1"])


def test_env_score_returns_step_like_info(digits):
    env = LASEnv(batch_size=16, epochs=1, max_steps_per_epoch=3, data=digits)
    env.reset(seed=0)
    reward, info = env.score(env.action_space.sample())
    assert isinstance(reward, float) and info["reward_computed"] and info["step"] == 0
    assert info["rewards"].shape == (16,) and abs(info["rewards"].mean() - reward) < 1e-5
    with pytest.raises(ValueError, match="Action has shape"):
        env.score([[0, 0, 0]])


# ----------------------------------------------------------------------------- agent


def spec(batch: int = 16) -> AgentSpec:
    return AgentSpec(grid=lookup("digits").grid, observation_shape=(batch, 1, 8, 8), num_classes=10,
                     dataset="digits", device=torch.device("cpu"), total_steps=100, steps_per_epoch=10, reward_interval=2)


def test_score_then_resample_scores_learns_and_trains_on_a_new_sample(digits):
    agent = ReinforceAgent(spec(), credit="per_image", reward_flow="score_then_resample", lr=1e-2, optimizer="adam")
    assert agent.scores_actions
    env = LASEnv(batch_size=16, epochs=1, max_steps_per_epoch=4, reward_interval=2, step_reward=False,
                 data=digits, tensor_api=True)
    calls = []

    def scorer(a):
        calls.append(a.clone())
        return env.score(a)

    obs, info = env.reset(seed=0)
    with pytest.raises(RuntimeError, match="bind_scorer"):
        agent.act(obs, {**info, "reward_next_step": True})
    agent.bind_scorer(scorer)
    learned = []
    for step in range(4):
        params = [p.detach().clone() for p in agent.net.parameters()]
        a = agent.act(obs, info)
        moved = any(not torch.equal(p, q) for p, q in zip(params, agent.net.parameters()))
        assert moved == (step % 2 == 1)  # the policy learns inside act, before the real step
        if step % 2 == 1:
            assert not torch.equal(a, calls[-1])  # the target trains on a NEW sample
        obs, _, _, _, info = env.step(a)
        assert not info["reward_computed"]  # the env's own step pays nothing
        learned.append(agent.learn(torch.zeros(()), info))
    assert len(calls) == 2 and agent.updates == 2
    assert [bool(m) for m in learned] == [False, True, False, True] and "policy_loss" in learned[1]


def test_the_loop_binds_the_scorer_and_turns_off_the_steps_reward(tmp_path, digits):
    from hydra import compose, initialize_config_dir  # noqa: PLC0415

    from experiments.training.loop import build_game  # noqa: PLC0415
    from experiments.config.settings import settings_from_config  # noqa: PLC0415

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["agent.reward_flow=score_then_resample", "logger=none"])
    env, agent, _ = build_game(settings_from_config(cfg, tmp_path), digits)
    assert env.config.step_reward is False and agent._scorer == env.score


@pytest.mark.parametrize("mode", ["train", "split"])
def test_bn_mode_split_samples_training_actions_in_eval_mode(mode):
    agent = ReinforceAgent(spec(), credit="per_image", bn_mode=mode)
    seen = []
    agent.net.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    x = torch.rand(16, 1, 8, 8)
    agent.act(x, {"reward_next_step": True})  # scored (train_on_scored): learned from
    agent.act(x, {"reward_next_step": False})  # trained on, never scored
    assert seen == ([True, True] if mode == "train" else [True, False])
    assert agent.net.training  # the mode is restored


def test_bad_switch_values_name_both_choices():
    with pytest.raises(ValueError, match="'own_ball' \\(ours\\) or 'threat_ball'"):
        LASConfig(attack_start="authors")
    with pytest.raises(ValueError, match="'drop' \\(ours\\) or 'wrap'"):
        LASConfig(last_batch="keep")
    for key, bad, words in (("attack_clip", "late", "first_step"), ("augment_padding", "mirror", "reflect"),
                            ("model_init", "xavier", "pytorch")):
        with pytest.raises(ValueError, match=words):
            LASConfig(**{key: bad})
    with pytest.raises(ValueError, match="probe_restarts"):
        RewardConfig(probe_restarts=0)
    with pytest.raises(ValueError, match="l1_forward"):
        RewardConfig(l1_forward="test")
    with pytest.raises(ValueError, match="reward_flow"):
        ReinforceAgent(spec(), reward_flow="theirs")


# ----------------------------------------------------------------------------- end to end

AUTHORS = [  # every switch the authors' way, on the digits demo
    "attack_start=threat_ball", "attack_clip=first_step", "last_batch=wrap", "model.init=pytorch",
    "agent.backbone_init=pytorch", "reward.probe_early_stop=true", "eval.early_stop=true", "reward.l1_forward=eval", "reward.l1_clamp_scope=batch_mean",
    "reward.probe_restarts=2", "reward.w_hat=deepcopy", "data.optim.true_class_prob=0.8",
    "agent.reward_flow=score_then_resample", "agent.bn_mode=split", "agent.credit=paper", "agent.k=2",
]
TINY = ["data.epochs=2", "data.batch_size=32", "data.max_steps_per_epoch=4", "eval.test_subset=32", "eval.train_subset=32", "eval.final_n=64",
        "eval.final_attacks=[clean,pgd2]", "eval.pgd_iterations=2", "logger=none", "progress=false",
        "reward.probe_iterations=2", "data.grid.iterations=[1,2]"]  # cheap: what is tested is the plumbing


@pytest.mark.slow
def test_the_authors_switches_run_end_to_end_and_resume_exactly(tmp_path, digits):
    from hydra import compose, initialize_config_dir  # noqa: PLC0415

    from experiments.training.loop import train  # noqa: PLC0415
    from experiments.config.settings import settings_from_config  # noqa: PLC0415

    def settings(run_dir, **changes):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=TINY + AUTHORS)
        s = settings_from_config(cfg, run_dir)
        for k, v in changes.items():
            setattr(s, k, v)
        return s

    whole = train(settings(tmp_path / "whole"), data=digits)
    history = whole.history
    assert [h["steps"] for h in history] == [4, 8]
    assert "agent/policy_loss" in history[0]["train"]  # the policy learned from scored samples
    assert "reward/total" not in history[0]["train"]  # the env's own steps paid no reward
    train(settings(tmp_path / "stopped", stop_after_epochs=1), data=digits)
    resumed = train(settings(tmp_path / "stopped", resume=True), data=digits)
    assert (resumed.run_dir / "metrics.json").read_bytes() == (whole.run_dir / "metrics.json").read_bytes()


# ----------------------------------------------------------------------------- gradient clipping


@pytest.mark.parametrize("clip", [None, 0.05, 1e6])
def test_grad_clip_steps_along_the_gradient_with_its_norm_capped(clip):
    """``optim.grad_clip`` (the authors' Tiny-ImageNet clip_grad_norm_ of 10): plain SGD moves every
    parameter by -lr * g * min(1, clip / ||g||), ||g|| over all parameters (computed here by hand)."""
    from las_env.methods import MethodBatch, PGDAT  # noqa: PLC0415
    from las_env.optim import OptimConfig  # noqa: PLC0415

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x, y = torch.rand(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    optim = OptimConfig(lr=0.5, momentum=0.0, weight_decay=0.0, grad_clip=clip)
    before = [p.detach().clone() for p in model.parameters()]
    loss = torch.nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    scale = 1.0 if clip is None else min(1.0, clip / (norm.item() + 1e-6))
    opt = torch.optim.SGD(model.parameters(), lr=optim.lr)
    PGDAT().step(model, opt, MethodBatch(x=x, x_adv=x, y=y), optim, "fp32")
    for p, p0, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), p0 - optim.lr * scale * g)


def test_grad_clip_must_be_positive():
    from las_env.optim import OptimConfig  # noqa: PLC0415
    from las_env.validate import SettingError  # noqa: PLC0415

    with pytest.raises((SettingError, ValueError), match="grad_clip"):
        OptimConfig(grad_clip=0.0)
