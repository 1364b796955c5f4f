"""An agent config node (``conf/agent/*.yaml`` plus overrides) into a factory whose class is imported and
keys checked before any data is loaded (the values are the class's to check)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from agents.base import Agent, AgentSpec
from experiments.config.errors import ConfigError
from las_env.imports import import_object

AgentFactory = Callable[[AgentSpec], Agent]
"""Anything that builds an agent from the game's :class:`AgentSpec`."""

AGENT_META_KEYS = ("name", "k", "needs_columns")  # display name; the env's k; grid columns the env must have


def agent_factory(node: Mapping[str, Any] | DictConfig) -> AgentFactory:
    """A factory for the agent of ``_target_`` and its keyword arguments, built once the spec is known."""
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

    def build(spec: AgentSpec) -> Agent:
        # Hydra builds nested _target_ nodes (a policy class); the spec goes in as is (Hydra would make it a node).
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
