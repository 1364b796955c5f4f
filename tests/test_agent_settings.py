"""Agent settings are checked in one place each: k by the game's config (``las_env.validate.check_interval``,
before any data is loaded), the other numbers by the agent class itself when it is built; on the
command line either is one paragraph naming the ``agent.<key>`` and its range."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from experiments.config.errors import ConfigError
from experiments.training.loop import build_game
from experiments.config.settings import settings_from_config
from las_env.datasets import load_dataset
from las_env.imports import import_object

CONF = Path(__file__).resolve().parents[1] / "experiments" / "conf"


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _settings(tmp_path, digits, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "logger=none", "data.epochs=1", "data.max_steps_per_epoch=2"])
    settings = settings_from_config(cfg, tmp_path)
    build_game(settings, digits)  # the agent checks its own settings when it is built
    return settings


@pytest.mark.parametrize(("overrides", "expected"), [
    (["agent.k=0"], "agent.k=0: must be a whole number >= 1"),
    (["agent.k=2.5"], "agent.k=2.5: must be a whole number >= 1"),
    (["agent.lr=0"], "agent.lr=0: must be in (0, inf)"),
    (["agent.lr=-1e-3"], "agent.lr=-0.001: must be in (0, inf)"),
    (["agent.lr=nan"], "agent.lr=nan: must be a finite number"),
    (["agent.lr=fast"], "agent.lr='fast': must be a number"),
    (["agent.momentum=1.0"], "agent.momentum=1.0: must be in [0, 1)"),
    (["agent.baseline_momentum=-0.1"], "agent.baseline_momentum=-0.1: must be in [0, 1)"),
    (["agent.weight_decay=-1"], "agent.weight_decay=-1: must be in [0, inf)"),
    (["agent.entropy_coef=-0.5"], "agent.entropy_coef=-0.5: must be in [0, inf)"),
    (["agent.grad_clip=-1"], "agent.grad_clip=-1: must be in [0, inf)"),
    (["agent=ppo", "agent.k=0"], "agent.k=0: must be a whole number >= 1"),
    (["agent=ppo", "agent.learning_rate=0"], "agent.learning_rate=0: must be in (0, inf)"),
    (["agent=ppo", "agent.n_steps=0"], "agent.n_steps=0: must be a whole number >= 1"),
    (["agent=ppo", "agent.ent_coef=-1"], "agent.ent_coef=-1: must be in [0, inf)"),
    (["agent=ppo", "agent.clip_range=0"], "agent.clip_range=0: must be in (0, inf)"),
    (["agent=a2c", "agent.max_grad_norm=-1"], "agent.max_grad_norm=-1: must be in (0, inf)"),
])
def test_out_of_range_agent_settings_are_one_paragraph_naming_the_key(tmp_path, digits, overrides, expected):
    with pytest.raises(ConfigError) as info:
        _settings(tmp_path, digits, *overrides)
    assert str(info.value).startswith(expected), str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("overrides", [
    ["agent.k=1"], ["agent.k=40", "agent.lr=1e-4", "agent.optimizer=sgd", "agent.momentum=0.9"],
    ["agent.grad_clip=null"], ["agent.grad_clip=0"], ["agent.entropy_coef=0"], ["agent=ppo", "agent.ent_coef=0"],
])
def test_in_range_and_null_agent_settings_pass(tmp_path, digits, overrides):
    _settings(tmp_path, digits, *overrides)


@pytest.mark.parametrize(("agent", "k", "probe", "step_reward"), [
    (["agent=reinforce", "agent.k=3"], 3, True, True),  # credit=unbiased asks for the pre-update probe
    (["agent=reinforce", "agent.credit=paper", "agent.reward_flow=score_then_resample"], 5, False, False),
    (["agent=fixed"], None, False, True),  # never learns: no reward step at all
])
def test_the_env_is_built_with_what_the_agent_config_asks_for(tmp_path, digits, agent, k, probe, step_reward):
    settings = _settings(tmp_path, digits, *agent)
    cfg = settings.env
    assert (cfg.reward_interval, cfg.reward.pre_update_probe, cfg.step_reward) == (k, probe, step_reward)
    env, player, spec = build_game(settings, digits)
    assert env.config is cfg and spec.reward_interval == k
    if k is None:
        assert not any(env.game.is_reward_step(s) for s in range(env.game.total_steps))


def test_import_object_takes_both_spellings_and_fails_as_import_error():
    from agents.baselines import RandomAgent  # noqa: PLC0415

    assert import_object("agents.baselines.RandomAgent") is RandomAgent
    assert import_object("agents.baselines:RandomAgent") is RandomAgent
    assert import_object("las_env.validate:SettingError.describe") is not None
    for bad in ("RandomAgent", "agents.baselines.NoSuch", "no_such_module.X", "agents.baselines:"):
        with pytest.raises(ImportError):
            import_object(bad)
