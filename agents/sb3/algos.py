"""Which SB3 algorithm (``"ppo"``, ``"a2c"`` or an import path) and the policy settings a config names."""

from __future__ import annotations

from typing import Any

from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm

from agents.sb3.extractor import default_policy_kwargs
from las_env.imports import import_object


ALGOS = {"ppo": "stable_baselines3:PPO", "a2c": "stable_baselines3:A2C"}


def _import(path: str) -> Any:
    """``"pkg.module:Name"`` or ``"pkg.module.Name"`` -> the object (ValueError when it cannot be had)."""
    try:
        return import_object(path)
    except ImportError as exc:
        raise ValueError(f"cannot import {path!r}: {exc}.") from None


def resolve_algo(algo: str | type) -> type[OnPolicyAlgorithm]:
    """``"ppo"``, ``"a2c"``, ``"module:Class"`` (or a class) -> an SB3 on-policy algorithm class."""
    if isinstance(algo, str):
        path = ALGOS.get(algo.lower(), algo)
        if path is algo and ":" not in algo and "." not in algo:
            raise ValueError(
                f"Unknown SB3 algorithm {algo!r}: use one of {sorted(ALGOS)} or an import path "
                "'module:Class' of an on-policy algorithm (e.g. 'sb3_contrib:TRPO')."
            )
        cls = _import(path)
    else:
        cls = algo
    if not (isinstance(cls, type) and issubclass(cls, OnPolicyAlgorithm)):
        raise ValueError(
            f"{algo!r} is not a Stable-Baselines3 on-policy algorithm (OnPolicyAlgorithm subclass). "
            "SB3Agent drives rollout-buffer algorithms such as PPO and A2C; off-policy ones (DQN, SAC) "
            "do not take MultiDiscrete actions."
        )
    return cls


def _plain(value: Any) -> Any:
    """OmegaConf containers (Hydra passes them for nested keys) -> plain dicts and lists."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra, a dependency
        pass
    return value


_CLASS_KEYS = ("features_extractor_class", "activation_fn", "optimizer_class")


def _policy_kwargs(features_dim: int, user: dict | None) -> dict[str, Any]:
    pk = default_policy_kwargs(features_dim)
    for key, value in (_plain(user) or {}).items():
        if key in _CLASS_KEYS and isinstance(value, str):
            value = _import(value)  # configs name classes by import path
        pk[key] = value
    return pk
