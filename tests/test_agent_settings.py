"""Agent settings are checked where they are read (experiments/agent_settings.py), before any data
is loaded: one paragraph naming the ``agent.<key>`` and its range."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from experiments.agent_settings import AGENT_RANGES, agent_factory, check_agent_numbers
from experiments.errors import ConfigError
from experiments.settings import settings_from_config
from las_env.imports import import_object

CONF = Path(__file__).resolve().parents[1] / "experiments" / "conf"


def _settings(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "logger=none"])
    return settings_from_config(cfg, tmp_path)


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
    (["agent.grad_clip=0"], "agent.grad_clip=0: must be in (0, inf)"),
    (["agent=ppo", "agent.reward_interval=0"], "agent.reward_interval=0: must be a whole number >= 1"),
    (["agent=ppo", "agent.learning_rate=0"], "agent.learning_rate=0: must be in (0, inf)"),
    (["agent=ppo", "agent.n_steps=0"], "agent.n_steps=0: must be a whole number >= 1"),
    (["agent=ppo", "agent.ent_coef=-1"], "agent.ent_coef=-1: must be in [0, inf)"),
    (["agent=ppo", "agent.clip_range=0"], "agent.clip_range=0: must be in (0, inf)"),
    (["agent=a2c", "agent.max_grad_norm=-1"], "agent.max_grad_norm=-1: must be in (0, inf)"),
])
def test_out_of_range_agent_settings_are_one_paragraph_naming_the_key(tmp_path, overrides, expected):
    with pytest.raises(ConfigError) as info:
        _settings(tmp_path, *overrides)
    assert str(info.value).startswith(expected), str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("overrides", [
    ["agent.k=1"], ["agent.k=40", "agent.lr=1e-4", "agent.optimizer=sgd", "agent.momentum=0.9"],
    ["agent.grad_clip=null"], ["agent.entropy_coef=0"], ["agent=ppo", "agent.ent_coef=0"],
])
def test_in_range_and_null_agent_settings_pass(tmp_path, overrides):
    _settings(tmp_path, *overrides)


def test_a_custom_agent_with_a_shared_key_name_gets_the_same_check():
    node = {"_target_": "agents.baselines.RandomAgent", "name": "x", "seed": None}
    agent_factory(node)  # fine
    with pytest.raises(ConfigError, match=r"agent\.lr=-1"):
        check_agent_numbers({"lr": -1})
    assert {"k", "lr", "momentum", "entropy_coef", "grad_clip"} <= set(AGENT_RANGES)


def test_import_object_takes_both_spellings_and_fails_as_import_error():
    from agents.baselines import RandomAgent  # noqa: PLC0415

    assert import_object("agents.baselines.RandomAgent") is RandomAgent
    assert import_object("agents.baselines:RandomAgent") is RandomAgent
    assert import_object("las_env.validate:SettingError.describe") is not None
    for bad in ("RandomAgent", "agents.baselines.NoSuch", "no_such_module.X", "agents.baselines:"):
        with pytest.raises(ImportError):
            import_object(bad)
