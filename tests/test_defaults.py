"""Each default lives once: the YAML under experiments/conf/ is the command line's source, and the
typed configs' and classes' own defaults (for Python users) equal it, key by key.

The rule (README, "The main job", "Defaults live once"): a key's default value is written in ``experiments/conf/``;
the dataclass or ``__init__`` that reads it carries the same value, and this file fails when the
two drift. Two kinds of keys are not compared: a value computed from another key (an
interpolation such as ``${data.threads}``; the type's ``None`` then means "computed"), and the
option's own name (``name: wandb``). Agent presets that deliberately choose another value than
their class are listed in :data:`PRESET_CHOICES`, each with why; the list is checked both ways.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from experiments.selection import SelectionSettings
from experiments.settings import EvalSettings, LoggerSettings, RunSettings
from las_env.game import LASConfig
from las_env.methods import MethodConfig
from las_env.reward import RewardConfig

CONF = Path(__file__).resolve().parents[1] / "experiments" / "conf"

PRESET_CHOICES: dict[str, dict[str, str]] = {
    # option: {key: why its YAML value differs from the class's default}
    "reinforce": {
        # The class's optimiser defaults are the authors' (SPEC section 2) and its credit is the
        # command line's (unbiased); the command line's k and optimiser are tuned for the
        # three-minute digits demo (README, "Results").
        "k": "digits demo: frequent strategy updates (authors: 20)",
        "lr": "digits demo: Adam 1e-3 (authors: SGD 1e-4)",
        "optimizer": "digits demo: Adam (authors: SGD)",
    },
    # SB3's defaults suit long Atari/MuJoCo rollouts; the demo's bridge updates every 10 env steps.
    "ppo": {
        "reward_interval": "digits demo: the reward on the same steps as agent=reinforce (k=5)",
        "n_steps": "digits demo: 2 reward steps x batch images per rollout (SB3: 2048)",
        "n_epochs": "digits demo: 4 passes per rollout (SB3: 10)",
        "ent_coef": "digits demo: keeps exploring the attack settings (SB3: 0)",
    },
    "a2c": {
        "reward_interval": "digits demo: as agent=ppo",
        "n_steps": "digits demo: as agent=ppo (SB3's A2C: 5)",
        "ent_coef": "digits demo: as agent=ppo",
        "normalize_advantage": "rewards span ~0..16 with the accuracy measure (SB3's A2C: false)",
    },
}


def _raw(path: Path) -> dict[str, Any]:
    """The file's keys with interpolations left as text (so they can be recognised and skipped)."""
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # type: ignore[return-value]


def _computed(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def _same(yaml_value: Any, default: Any) -> bool:
    if isinstance(yaml_value, list):
        yaml_value = tuple(yaml_value)
    if isinstance(default, list):
        default = tuple(default)
    if isinstance(yaml_value, (int, float)) and isinstance(default, (int, float)) and not isinstance(default, bool):
        return float(yaml_value) == float(default)
    return yaml_value == default


def _dataclass_defaults(cls: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def _init_defaults(cls: type) -> dict[str, Any]:
    return {n: p.default for n, p in inspect.signature(cls).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _disagreements(node: Mapping[str, Any], defaults: Mapping[str, Any], *, skip=("name",)) -> dict[str, tuple]:
    """Keys of ``node`` whose value differs from ``defaults`` (keys the type lacks are errors too)."""
    out = {}
    for key, value in node.items():
        if key in skip or key.startswith("_") or _computed(value):
            continue
        if key not in defaults:
            out[key] = (value, "<no default in the type>")
        elif not _same(value, defaults[key]):
            out[key] = (value, defaults[key])
    return out


def test_eval_section_equals_eval_settings():
    assert _disagreements(_raw(CONF / "config.yaml")["eval"], _dataclass_defaults(EvalSettings)) == {}


def test_reward_section_equals_reward_config():
    assert _disagreements(_raw(CONF / "config.yaml")["reward"], _dataclass_defaults(RewardConfig)) == {}


def test_selection_section_equals_selection_settings():
    assert _disagreements(_raw(CONF / "config.yaml")["selection"], _dataclass_defaults(SelectionSettings)) == {}


def test_top_level_switches_equal_the_game_and_run_settings():
    top = {k: v for k, v in _raw(CONF / "config.yaml").items() if not isinstance(v, dict) and k != "defaults"}
    owners = {**_dataclass_defaults(LASConfig), **_dataclass_defaults(RunSettings)}
    compared = {k: v for k, v in top.items() if k in owners}
    # Keys no typed config reads (the run folder's place, the DDP timeout) are the YAML's alone.
    assert set(top) - set(compared) <= {"run_root", "ddp_timeout_s"}, set(top) - set(compared)
    assert _disagreements(compared, owners) == {}


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "logger").glob("*.yaml")))
def test_logger_options_equal_logger_settings(option):
    assert _disagreements(_raw(CONF / "logger" / f"{option}.yaml"), _dataclass_defaults(LoggerSettings)) == {}


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "method").glob("*.yaml")))
def test_method_options_equal_method_config(option):
    assert _disagreements(_raw(CONF / "method" / f"{option}.yaml"), _dataclass_defaults(MethodConfig)) == {}


AGENT_OPTIONS = sorted(p.stem for p in (CONF / "agent").glob("*.yaml") if p.stem != "custom")


@pytest.mark.parametrize("option", AGENT_OPTIONS)
def test_agent_options_equal_their_class_except_the_named_preset_choices(option):
    from las_env.imports import import_object  # noqa: PLC0415

    node = _raw(CONF / "agent" / f"{option}.yaml")
    cls = import_object(node["_target_"])
    defaults = _init_defaults(cls)
    if "algo" in node:  # SB3Agent passes the other keys to the SB3 algorithm: its defaults count
        from agents.sb3 import resolve_algo  # noqa: PLC0415

        defaults = {**_init_defaults(resolve_algo(node["algo"])), **defaults, "algo": node["algo"]}
    found = _disagreements(node, defaults)
    assert set(found) == set(PRESET_CHOICES.get(option, {})), (
        f"agent/{option}.yaml and {node['_target_']} disagree on {found}; make them equal, or name a "
        f"deliberate preset choice in PRESET_CHOICES")


def _flat(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "defaults":
            continue
        if isinstance(value, dict) and not (set(value) <= {"start", "stop", "scale"}):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _bases(node: Mapping[str, Any]) -> list[str]:
    """The ``/paper/...`` files a preset's defaults list includes, with what those include in turn."""
    out = []
    for entry in node.get("defaults", []):
        if isinstance(entry, str) and not entry.startswith("_"):
            name = entry.removeprefix("/paper/")
            out.append(name)
            out.extend(_bases(_raw(CONF / "paper" / f"{name}.yaml")))
    return out


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_paper_presets_do_not_restate_their_shared_base(preset):
    own = _raw(CONF / "experiment" / f"{preset}.yaml")
    bases = _bases(own)
    assert bases, f"experiment/{preset}.yaml includes no shared paper/ base"
    inherited: dict[str, Any] = {}
    for name in reversed(bases):
        inherited.update(_flat(_raw(CONF / "paper" / f"{name}.yaml")))
    repeated = {k: v for k, v in _flat(own).items() if k in inherited and _same(v, inherited[k])}
    assert repeated == {}, f"experiment/{preset}.yaml repeats {repeated}, already set by paper/{bases}"
