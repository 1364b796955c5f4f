"""The policy's features extractor for small images and the per-image spaces (see ``agents.sb3``)."""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import Tensor, nn


# --------------------------------------------------------------------------- features
class SmallImageExtractor(BaseFeaturesExtractor):
    """A CNN features extractor for small images in ``[0, 1]`` (8x8 digits, 32x32 CIFAR, ...).

    ``conv3x3(C -> c1) -> conv3x3(c1 -> c2, stride 2 if H >= 8) -> conv3x3(c2 -> c2,
    stride 2 if H >= 32) -> AdaptiveAvgPool(pool) -> Linear(c2*pool*pool -> features_dim)``,
    ReLU after each. 8x8 -> 8 -> 4 -> 4; 32x32 -> 32 -> 16 -> 8 -> pooled 4; 64x64 ->
    pooled 4. Inputs are used as they come (no /255): build the policy with
    ``normalize_images=False``.

    Args:
        observation_space: ``Box`` of shape ``(C, H, W)``.
        features_dim: size of the output features.
        channels: ``(c1, c2)``, the convolutions' widths.
        pool: side of the pooled map.
    """

    def __init__(
        self,
        observation_space: spaces.Box,
        features_dim: int = 128,
        channels: tuple[int, int] = (32, 64),
        pool: int = 4,
    ) -> None:
        if not isinstance(observation_space, spaces.Box) or len(observation_space.shape) != 3:
            raise ValueError(
                f"SmallImageExtractor needs a Box observation space of shape (C, H, W), got {observation_space}."
            )
        super().__init__(observation_space, features_dim)
        c, h, w = observation_space.shape
        c1, c2 = (int(v) for v in channels)
        side = min(h, w)
        self.cnn = nn.Sequential(
            nn.Conv2d(c, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, stride=2 if side >= 8 else 1, padding=1),
            nn.ReLU(),
            nn.Conv2d(c2, c2, 3, stride=2 if side >= 32 else 1, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(pool),
            nn.Flatten(),
        )
        self.linear = nn.Sequential(nn.Linear(c2 * pool * pool, features_dim), nn.ReLU())

    def forward(self, observations: Tensor) -> Tensor:
        return self.linear(self.cnn(observations))


def default_policy_kwargs(features_dim: int = 128) -> dict[str, Any]:
    """The policy settings both drivers use unless told otherwise."""
    return {
        "features_extractor_class": SmallImageExtractor,
        "features_extractor_kwargs": {"features_dim": int(features_dim)},
        "normalize_images": False,  # observations are already in [0, 1]
        "net_arch": {"pi": [64], "vf": [64]},
    }


def per_image_spaces(observation_shape, nvec) -> tuple[spaces.Box, spaces.MultiDiscrete]:
    """The observation and action space of ONE image (one SB3 sub-environment)."""
    c, h, w = (int(v) for v in observation_shape[-3:])
    obs = spaces.Box(0.0, 1.0, shape=(c, h, w), dtype=np.float32)
    act = spaces.MultiDiscrete(np.asarray(nvec, dtype=np.int64))
    return obs, act
