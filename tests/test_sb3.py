"""The Stable-Baselines3 bridge: LASVecEnv (SB3 drives), SB3Agent (our loop drives),
the small-image features extractor."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.env_checker import check_env
from stable_baselines3.common.preprocessing import is_image_space, preprocess_obs
from stable_baselines3.common.vec_env import VecCheckNan, VecMonitor

from agents.base import Agent, AgentSpec
from agents.sb3 import LASVecEnv, SB3Agent, SingleImageEnv, SmallImageExtractor, default_policy_kwargs
from las_env import LASEnv
from las_env.datasets.registry import lookup

DIGITS_GRID = lookup("digits").grid

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    # These games are tiny (8x8 images, batches of 1..16): one thread is fastest, and on a
    # loaded 2-core machine a second OpenMP thread makes each small op wait milliseconds
    # for a core (measured: a batch-8 digits step took 3 s with 2 threads, 0.03 s with 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_env(digits, **kw):
    settings = dict(batch_size=8, epochs=1, max_steps_per_epoch=3)
    settings.update(kw)
    return LASEnv(data=digits, **settings)


def spec_for(b=16, shape=(1, 8, 8), total_steps=100, seed=0, k=1):
    return AgentSpec(
        grid=DIGITS_GRID,
        observation_shape=(b, *shape),
        num_classes=10,
        dataset="digits",
        device=torch.device("cpu"),
        total_steps=total_steps,
        steps_per_epoch=total_steps,
        seed=seed,
        reward_interval=k,
    )


# ------------------------------------------------------------------ extractor
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (3, 64, 64)])
def test_extractor_fits_small_and_large_images(shape):
    space = spaces.Box(0.0, 1.0, shape=shape, dtype=np.float32)
    ext = SmallImageExtractor(space, features_dim=24)
    out = ext(torch.rand(5, *shape))
    assert out.shape == (5, 24)
    assert ext.features_dim == 24


def test_float_observations_are_not_rescaled():
    # Our per-image space is float32 in [0, 1]: SB3 must not divide by 255 again.
    space = spaces.Box(0.0, 1.0, shape=(1, 8, 8), dtype=np.float32)
    assert not is_image_space(space)
    agent = SB3Agent(spec_for(b=4), algo="ppo", n_steps=2, batch_size=8)
    assert agent.model.policy.normalize_images is False
    assert isinstance(agent.model.policy.features_extractor, SmallImageExtractor)
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(preprocess_obs(x, agent.model.observation_space, normalize_images=False), x)
    torch.testing.assert_close(preprocess_obs(x, agent.model.observation_space, normalize_images=True), x)


# ------------------------------------------------------------------ LASVecEnv
def test_vecenv_spaces_shapes_and_one_step_episodes(digits):
    venv = LASVecEnv(small_env(digits))
    assert venv.num_envs == 8
    assert venv.observation_space == spaces.Box(0.0, 1.0, shape=(1, 8, 8), dtype=np.float32)
    assert isinstance(venv.action_space, spaces.MultiDiscrete)
    np.testing.assert_array_equal(venv.action_space.nvec, DIGITS_GRID.nvec)
    venv.seed(0)
    obs = venv.reset()
    assert obs.shape == (8, 1, 8, 8) and obs.dtype == np.float32
    assert all(venv.observation_space.contains(o) for o in obs)
    actions = np.stack([venv.action_space.sample() for _ in range(8)])
    new_obs, rewards, dones, infos = venv.step(actions)
    assert new_obs.shape == (8, 1, 8, 8)
    assert rewards.shape == (8,) and rewards.dtype == np.float32 and np.isfinite(rewards).all()
    assert dones.shape == (8,) and dones.all()
    assert len(infos) == 8
    for i in range(8):
        np.testing.assert_array_equal(infos[i]["terminal_observation"], obs[i])
        assert not infos[i]["game_over"]
    assert not np.array_equal(new_obs, obs)  # the next batch
    assert venv.get_attr("space") == [venv.las.space] * 8
    assert venv.env_is_wrapped(VecMonitor) == [False] * 8


def test_rewards_reach_the_right_sub_env(digits):
    # Same game, same actions: sub-env i gets exactly image i's reward from LASEnv's info.
    # The "loss" measure makes the per-image rewards continuous, hence identifiable.
    kw = dict(reward={"measure": "loss"})
    direct = small_env(digits, **kw)
    venv = LASVecEnv(small_env(digits, **kw))
    direct.reset(seed=3)
    venv.seed(3)
    venv.reset()
    rng = np.random.default_rng(0)
    for _ in range(2):
        actions = np.stack([rng.integers(0, DIGITS_GRID.nvec) for _ in range(8)])
        _, _, _, _, info = direct.step(actions)
        _, rewards, _, infos = venv.step(actions)
        assert len(np.unique(info["rewards"])) == 8  # distinct per image
        np.testing.assert_array_equal(rewards, info["rewards"].astype(np.float32))
        for i in range(8):
            assert infos[i]["l1"] == pytest.approx(float(info["l1"][i]))
            assert infos[i]["l2"] == pytest.approx(float(info["l2"][i]))


def test_vecenv_works_on_the_tensor_api_and_restarts_the_game(digits):
    venv = LASVecEnv(small_env(digits, tensor_api=True, max_steps_per_epoch=2))
    venv.reset()
    actions = np.zeros((8, 3), dtype=np.int64)
    _, _, _, infos = venv.step(actions)
    assert not infos[0]["game_over"] and venv.games == 0
    obs, rewards, _, infos = venv.step(actions)
    assert infos[0]["game_over"] and venv.games == 1
    assert isinstance(obs, np.ndarray) and isinstance(rewards, np.ndarray)
    venv.step(actions)  # the restarted game plays on
    assert venv.las.game.step_index == 1


def test_vecenv_refuses_reward_interval_above_one(digits):
    with pytest.raises(ValueError, match="reward_interval=1"):
        LASVecEnv(small_env(digits, reward_interval=4))


def test_single_image_view_passes_sb3_check_env(digits):
    env = SingleImageEnv(small_env(digits, batch_size=1, max_steps_per_epoch=50))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # advice about float images is expected: ours are in [0, 1]
        check_env(env, warn=True, skip_render_check=True)
    obs, _ = env.reset(seed=0)
    obs2, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert terminated and not truncated and np.isfinite(reward)
    with pytest.raises(ValueError, match="batch_size=1"):
        SingleImageEnv(small_env(digits))


@pytest.mark.parametrize("algo", [PPO, A2C])
def test_sb3_learns_directly_on_the_vecenv(digits, algo):
    venv = VecCheckNan(VecMonitor(LASVecEnv(small_env(digits, max_steps_per_epoch=3))), raise_exception=True)
    kw = dict(n_steps=2, batch_size=8, n_epochs=1) if algo is PPO else dict(n_steps=2)
    model = algo("CnnPolicy", venv, policy_kwargs=default_policy_kwargs(32), seed=0, device="cpu", **kw)
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(total_timesteps=32)  # 4 env steps: 2 updates, crossing the game's end
    assert model.num_timesteps == 32
    assert any(not torch.equal(a, b) for a, b in zip(before, model.policy.parameters()))
    assert len(model.ep_info_buffer) > 0 and all(ep["l"] == 1 for ep in model.ep_info_buffer)


# ------------------------------------------------------------------ SB3Agent
@pytest.mark.parametrize("algo", ["ppo", "a2c"])
def test_agent_in_a_plain_loop_learns_from_reward_steps_only(digits, algo):
    k = 2
    kw = dict(n_steps=2, batch_size=16, n_epochs=2) if algo == "ppo" else dict(n_steps=2)
    env = LASEnv(data=digits, tensor_api=True, batch_size=16, epochs=1, max_steps_per_epoch=8, reward_interval=k)
    spec = AgentSpec.from_game(env)
    agent = SB3Agent(spec, algo=algo, features_dim=32, **kw)
    assert isinstance(agent, Agent) and spec.reward_interval == k
    before = [p.detach().clone() for p in agent.model.policy.parameters()]
    obs, info = env.reset(seed=0)
    reward_steps, sb3_logs, done = 0, [], False
    while not done:
        action = agent.act(obs, info)
        assert action.shape == (16, 3) and action.dtype == torch.long
        fill = agent.buffer.pos
        obs, reward, done, _, info = env.step(action)
        metrics = agent.learn(reward, info)
        if info["reward_computed"]:
            reward_steps += 1
            assert "reward_mean" in metrics
        else:
            assert metrics == {} and agent.buffer.pos == fill  # nothing learnt from a 0
        if "sb3/train/value_loss" in metrics:
            sb3_logs.append(metrics)
    assert reward_steps == 4
    assert agent.buffer_additions == reward_steps
    assert agent.updates == len(sb3_logs) == reward_steps // 2
    assert agent.model.num_timesteps == reward_steps * 16
    assert any(not torch.equal(a, b) for a, b in zip(before, agent.model.policy.parameters()))
    sb3 = {k: v for k, v in sb3_logs[-1].items() if k.startswith("sb3/")}
    assert {"sb3/train/value_loss", "sb3/train/learning_rate", "sb3/rollout/reward_mean"} <= set(sb3)
    assert all(isinstance(v, float) and np.isfinite(v) for v in sb3.values())


def synthetic_steps(agent, n, seed, start_step=0):
    """Drive the agent with random images; the reward favours large epsilon indices."""
    g = torch.Generator().manual_seed(seed)
    b = agent.num_envs
    actions = []
    for s in range(start_step, start_step + n):
        rewarded = (s + 1) % agent.spec.reward_interval == 0
        a = agent.act(torch.rand(b, 1, 8, 8, generator=g), {"reward_next_step": rewarded})
        actions.append(a)
        r = a[:, 2].float() + 0.1 * torch.randn(b, generator=g)
        agent.learn(r.mean(), {"reward_computed": rewarded, "rewards": r, "step": s})
    return torch.stack(actions)


def test_agent_improves_on_a_bandit_it_can_solve():
    agent = SB3Agent(spec_for(b=16, total_steps=200), algo="ppo", n_steps=4, batch_size=32, n_epochs=4,
                     learning_rate=3e-3, features_dim=32)
    first = synthetic_steps(agent, 8, seed=1)[:, :, 2].float().mean()
    synthetic_steps(agent, 80, seed=2, start_step=8)
    last = synthetic_steps(agent, 8, seed=3, start_step=88)[:, :, 2].float().mean()
    assert last > first + 1.0, (first, last)  # the epsilon index (0..5) is pushed up


@pytest.mark.parametrize("algo", ["ppo", "a2c"])
def test_state_dict_round_trip_reproduces_the_continuation(algo, tmp_path):
    kw = dict(n_steps=3, batch_size=12, n_epochs=2) if algo == "ppo" else dict(n_steps=3)
    spec = spec_for(b=8, total_steps=40, k=2)
    a = SB3Agent(spec, algo=algo, features_dim=16, seed=1, **kw)
    synthetic_steps(a, 8, seed=5)  # 4 reward steps: one update, one step in the buffer
    assert a.updates == 1 and a.buffer.pos == 1
    torch.save(a.state_dict(), tmp_path / "agent.pt")
    state = torch.load(tmp_path / "agent.pt", weights_only=True)  # tensors and plain values only
    b = SB3Agent(spec, algo=algo, features_dim=16, seed=99, **kw)
    b.load_state_dict(state)
    cont_a = synthetic_steps(a, 10, seed=6, start_step=8)  # crosses the next update
    cont_b = synthetic_steps(b, 10, seed=6, start_step=8)
    assert a.updates == b.updates == 3  # 1 + (1 kept + 5 new reward steps) / n_steps
    torch.testing.assert_close(cont_a, cont_b, rtol=0, atol=0)
    for pa, pb in zip(a.model.policy.parameters(), b.model.policy.parameters()):
        torch.testing.assert_close(pa, pb)


def test_agent_leaves_the_global_rng_alone_and_seeds_itself():
    torch.manual_seed(123)
    np.random.seed(123)
    t_state, n_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    a = SB3Agent(spec_for(b=8), algo="ppo", n_steps=2, batch_size=8, features_dim=16, seed=4)
    b = SB3Agent(spec_for(b=8), algo="ppo", n_steps=2, batch_size=8, features_dim=16, seed=4)
    for pa, pb in zip(a.model.policy.parameters(), b.model.policy.parameters()):
        torch.testing.assert_close(pa, pb)
    synthetic_steps(a, 4, seed=0)  # includes updates (minibatch shuffling)
    assert a.updates == 2
    assert torch.equal(torch.get_rng_state(), t_state)
    np.testing.assert_array_equal(np.random.get_state()[1], n_state)


def test_unknown_algorithms_are_refused():
    with pytest.raises(ValueError, match="Unknown SB3 algorithm"):
        SB3Agent(spec_for(), algo="ppo2")
    with pytest.raises(ValueError, match="on-policy"):
        SB3Agent(spec_for(), algo="stable_baselines3:DQN")
    agent = SB3Agent(spec_for(b=4), algo="stable_baselines3:A2C", n_steps=2)
    assert isinstance(agent.model, A2C)


@pytest.mark.parametrize("name", ["ppo", "a2c"])
def test_agent_configs_build_through_the_runners_factory(name):
    from omegaconf import OmegaConf

    from experiments.config.settings import agent_factory

    cfg = OmegaConf.load(REPO / "experiments" / "conf" / "agent" / f"{name}.yaml")
    assert cfg._target_ == "agents.sb3.SB3Agent" and cfg.algo == name and cfg.name == name
    agent = agent_factory(cfg)(spec_for(b=64, k=cfg.k))  # k goes to the env, the agent reads its spec
    assert isinstance(agent.model, PPO if name == "ppo" else A2C)
    assert agent.model.n_steps == cfg.n_steps
    if name == "ppo":
        assert (agent.model.n_steps * 64) % agent.model.batch_size == 0
