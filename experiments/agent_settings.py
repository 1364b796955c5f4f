"""From an agent config node (``conf/agent/*.yaml`` plus overrides) to a checked agent factory.

Everything about the agent that can be checked before any data is loaded is checked here: the
class can be imported and accepts the given keys, and the numeric settings agents share by name
(learning rates, momenta, coefficients, the update interval k, ...) are in their meaningful range
(:data:`AGENT_RANGES`). Each failure is one paragraph (:class:`experiments.errors.ConfigError`)
naming the ``agent.<key>`` the user types.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from agents.base import Agent, AgentSpec
from experiments.errors import ConfigError
from las_env.imports import import_object
from las_env.validate import SettingError, check_interval, check_number, check_whole

AgentFactory = Callable[[AgentSpec], Agent]
"""Anything that builds an agent from the game's :class:`AgentSpec`."""

AGENT_META_KEYS = ("name",)
"""Keys of an agent config that describe it rather than being constructor arguments."""


@dataclass(frozen=True)
class Range:
    """The meaningful values of a numeric agent setting (see :func:`las_env.validate.check_number`)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    whole: bool = False
    meaning: str = ""

    interval: bool = False

    def check(self, key: str, value: Any) -> None:
        if self.interval:
            check_interval(key, value)
        elif self.whole:
            check_whole(key, value, int(self.low or 0))
        else:
            check_number(key, value, self.low, self.high, low_open=self.low_open, high_open=self.high_open,
                         meaning=self.meaning)


_INTERVAL = Range(interval=True)
_STEP = Range(0, low_open=True, meaning="(a step size; e.g. 1e-3 with Adam, the authors' 1e-4 with SGD)")
_COEF = Range(0, meaning="(a loss weight; 0 switches the term off)")
_MOMENTUM = Range(0, 1, high_open=True, meaning="(a moving average's keep factor)")
_FRACTION = Range(0, 1, low_open=True)
_POSITIVE = Range(0, low_open=True)
_COUNT = Range(1, whole=True)

AGENT_RANGES: dict[str, Range] = {
    "k": _INTERVAL, "reward_interval": _INTERVAL,
    "lr": _STEP, "learning_rate": _STEP, "lr_gamma": _FRACTION,
    "momentum": _MOMENTUM, "baseline_momentum": _MOMENTUM,
    "weight_decay": Range(0, meaning="(L2 penalty of the optimiser)"),
    "entropy_coef": _COEF, "ent_coef": _COEF, "vf_coef": _COEF,
    "grad_clip": Range(0, low_open=True, meaning="(gradient norm clip; null: no clipping)"),
    "max_grad_norm": Range(0, low_open=True, meaning="(gradient norm clip)"),
    "clip_range": _POSITIVE, "gamma": Range(0, 1), "gae_lambda": Range(0, 1),
    "n_steps": _COUNT, "n_epochs": _COUNT, "batch_size": _COUNT, "features_dim": _COUNT,
}
"""Numeric agent settings checked by name, whichever agent has them (a class of your own too).
``null`` is always let through: the agent gives it its meaning (no clipping, the run's seed...)."""

def check_agent_numbers(kwargs: Mapping[str, Any]) -> None:
    """:data:`AGENT_RANGES` on the given agent settings; one paragraph naming ``agent.<key>``."""
    for key, rule in AGENT_RANGES.items():
        value = kwargs.get(key)
        if value is None or isinstance(value, (Mapping, list, tuple)):
            continue  # null: the agent's own meaning; a node: a schedule or class Hydra builds
        try:
            rule.check(key, value)
        except SettingError as exc:
            raise ConfigError(exc.describe("agent.")) from None


def agent_factory(node: Mapping[str, Any] | DictConfig) -> AgentFactory:
    """A factory for the agent an agent config describes: ``_target_`` plus its keyword
    arguments (``name`` is dropped). The class is imported, its signature and the numeric
    settings checked now, so a typo or a bad value fails before any data is loaded; the agent
    itself is built once the spec is known.
    """
    cfg = OmegaConf.create(node) if not isinstance(node, DictConfig) else node
    try:
        target = cfg._target_
    except MissingMandatoryValue:
        target = None
    if not target:
        raise ConfigError(
            "agent=custom needs the class to build: add agent._target_=my_module.MyAgent (a class "
            "implementing agents.base.Agent, importable from the current directory or PYTHONPATH)."
        )
    try:
        cls = import_object(str(target))
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's to fix
        raise ConfigError(
            f"agent._target_={target} cannot be imported ({type(exc).__name__}: {exc}). Give a "
            f"dotted path module.Class; the module must be importable from the current directory "
            f"or PYTHONPATH."
        ) from None
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
              if not k.startswith("_") and k not in AGENT_META_KEYS}
    _check_signature(cls, str(target), kwargs)
    check_agent_numbers(kwargs)

    def build(spec: AgentSpec) -> Agent:
        # Nested nodes with their own _target_ (e.g. a policy class) are built by Hydra; the spec
        # is passed directly (Hydra would turn a dataclass argument into a config node).
        from hydra.utils import instantiate  # noqa: PLC0415

        return cls(spec=spec, **instantiate(OmegaConf.create(kwargs), _convert_="all"))

    build.target = str(target)  # type: ignore[attr-defined]  # for records and messages
    return build


def _check_signature(cls: Any, target: str, kwargs: Mapping[str, Any]) -> None:
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return  # not introspectable (C extension...): let the call itself complain
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    if "spec" not in params:
        raise ConfigError(
            f"agent._target_={target} does not take a `spec` argument: an agent is built as "
            f"Class(spec=AgentSpec(...), **agent settings) (see agents/base.py)."
        )
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        accepted = sorted(n for n in params if n != "spec" and params[n].kind is not inspect.Parameter.VAR_POSITIONAL)
        raise ConfigError(
            f"agent._target_={target} does not accept the setting(s) {unknown} (it accepts "
            f"{accepted or 'none besides spec'}). A class of your own takes the keys of "
            f"agent=custom (plus +agent.KEY=VALUE), not those of another agent's config."
        )
