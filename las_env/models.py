"""Image classifiers used as target networks and as strategy-network backbones.

All models take images in ``[0, 1]`` (no normalisation layer: epsilons are in pixel
units) with any channel count and return logits ``(N, num_classes)``. They end in global
average pooling, so the same network runs on 8x8 digits, 32x32 CIFAR and 64x64
Tiny-ImageNet; the ``_pool2`` variants pool to a 2x2 map instead (the authors' Tiny-ImageNet
networks, SPEC section 9).

Every model exposes ``feature_dim`` (width of the pooled feature vector) and
``features(x) -> (N, feature_dim)``; ``forward(x)`` is the linear classifier on top. A
strategy network can reuse a backbone by calling ``features`` and adding its own heads.

Names for :func:`build_model` (:data:`MODEL_NAMES`; any ``wrn-DEPTH-WIDTH`` is accepted):

- ``resnet18``: the CIFAR variant of ResNet-18 (3x3 stem, no max-pool), ~11.2M parameters.
- ``preact_resnet18``: pre-activation ResNet-18, the usual adversarial-training baseline.
- ``preact_resnet18_pool2``: the authors' Tiny-ImageNet target (SPEC section 9): pre-activation
  ResNet-18 WITHOUT the final BN-ReLU, pooled to 2x2 (their ``avg_pool2d(out, 4)`` on the 8x8 map
  of a 64x64 image), so ``feature_dim = 2048`` and the head is ``Linear(2048, classes)``.
- ``resnet18_pool2``: ResNet-18 pooled to 2x2 (2048 features): the authors' Tiny-ImageNet
  strategy backbone.
- ``wrn-34-10`` etc.: the pre-activation Wide ResNet of the adversarial-robustness
  literature (WRN-34-10 ~46.2M parameters).
- ``small_cnn``: a two-conv network for 8x8 digits, seconds to train on a CPU.

Initialisation (``init=`` of :func:`build_model`): ``"kaiming"`` (ours; He-normal fan-out
convolutions, unit BatchNorm, zero Linear biases, as the ResNet/WRN papers and the authors' WRN)
or ``"pytorch"`` (PyTorch's own layer defaults, as the authors' ResNet-18 and PreAct ResNet-18).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODEL_NAMES: tuple[str, ...] = (
    "resnet18",
    "resnet18_pool2",
    "preact_resnet18",
    "preact_resnet18_pool2",
    "wrn-34-10",
    "wrn-34-20",
    "wrn-70-16",
    "small_cnn",
)
"""Common names :func:`build_model` accepts; any ``wrn-DEPTH-WIDTH`` with ``(DEPTH-4) % 6 == 0`` also works."""

INITS: tuple[str, ...] = ("kaiming", "pytorch")
"""Initialisations :func:`build_model` accepts: ours (He fan-out) or PyTorch's layer defaults."""


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv here feeds a BatchNorm, whose shift makes a bias redundant.
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def _init_weights(module: nn.Module) -> None:
    """He initialisation for convolutions (fan-out, as in the ResNet/WRN papers), unit BN."""
    if next(module.parameters()).is_meta:
        return  # shapes only (a name check): nothing to fill, and normal_ on "meta" imports torch._dynamo (1.5 s)
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


class _Classifier(nn.Module):
    """Shared tail: ``forward = linear(features(x))``.

    Attributes:
        feature_dim: Width of the vector ``features`` returns.
        num_classes: Width of the logits.
    """

    feature_dim: int
    num_classes: int
    linear: nn.Linear

    def features(self, x: Tensor) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.features(x))


# ----------------------------------------------------------------------------- ResNet-18


class BasicBlock(nn.Module):
    """Post-activation residual block: conv-BN-ReLU-conv-BN, plus shortcut, then ReLU.

    The shortcut is a strided 1x1 conv + BN when the block changes resolution or width.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016b): BN-ReLU-conv-BN-ReLU-(dropout)-conv, plus
    shortcut; PreAct-ResNet's block and, with ``drop_rate``, Wide-ResNet's.

    A projecting shortcut takes the already activated input (as in the reference WRN), so the
    identity path of every block carries the un-normalised signal only when shapes match.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.drop_rate = drop_rate
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = F.relu(self.bn1(x))
        skip = self.shortcut(act) if self.shortcut is not None else x
        out = F.relu(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + skip


class ResNet18(_Classifier):
    """CIFAR-style ResNet-18: 3x3 stride-1 stem, no max-pool, four stages of two blocks.

    Stage widths 64, 128, 256, 512, strides 1, 2, 2, 2; average pooling then a linear layer.
    ``preact=True`` gives PreAct-ResNet-18 (pre-activation blocks and a final BN-ReLU before
    pooling). ``pool=2`` (the authors' Tiny-ImageNet networks) pools to a 2x2 map, so the
    features are 4 x 512 = 2048 wide; with ``preact`` it also drops the final BN-ReLU, as their
    Tiny-ImageNet PreActResNet-18 does.

    Args:
        in_channels: Image channels.
        num_classes: Number of output logits.
        preact: Use pre-activation blocks.
        pool: Side of the pooled map: 1 (global pooling) or 2 (the authors' Tiny-ImageNet nets).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, preact: bool = False, pool: int = 1) -> None:
        super().__init__()
        if pool not in (1, 2):
            raise ValueError(f"ResNet18 pool must be 1 (global) or 2 (the authors' Tiny-ImageNet 2x2), got {pool}.")
        self.pool = pool
        block = PreActBlock if preact else BasicBlock
        self.preact = preact
        self.conv1 = _conv3x3(in_channels, 64)
        # Post-activation nets normalise the stem output; pre-activation blocks do it themselves.
        self.bn1: nn.Module = nn.Identity() if preact else nn.BatchNorm2d(64)
        layers: list[nn.Module] = []
        in_ch = 64
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [block(in_ch, width, stride), block(width, width, 1)]
            in_ch = width
        self.layers = nn.Sequential(*layers)
        # The authors' Tiny-ImageNet PreActResNet-18 pools the last block's raw sum (no BN-ReLU).
        self.final_bn: nn.Module | None = nn.BatchNorm2d(512) if preact and pool == 1 else None
        self.feature_dim = 512 * pool * pool
        self.num_classes = num_classes
        self.linear = nn.Linear(self.feature_dim, num_classes)
        _init_weights(self)

    def features(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        if not self.preact:
            out = F.relu(self.bn1(out))
        out = self.layers(out)
        if self.final_bn is not None:
            out = F.relu(self.final_bn(out))
        # pool=2 on a 64x64 image: the 8x8 map averaged in 4x4 windows, their avg_pool2d(out, 4).
        return torch.flatten(F.adaptive_avg_pool2d(out, self.pool), 1)


# ----------------------------------------------------------------------------- Wide ResNet


class WideResNet(_Classifier):
    """WRN-depth-widen_factor (Zagoruyko & Komodakis 2016), the adversarial-robustness variant.

    A 3x3 stem with 16 channels, then three groups of ``(depth - 4) / 6`` wide blocks with
    widths ``16k, 32k, 64k`` (``k = widen_factor``; :class:`PreActBlock` with dropout) and strides 1, 2, 2, then BN-ReLU,
    global average pooling and a linear layer. WRN-34-10 has ~46.2M parameters.

    Args:
        depth: Total depth; ``(depth - 4)`` must be a positive multiple of 6 (16, 22, 28, 34...).
        widen_factor: Width multiplier ``k >= 1``.
        in_channels: Image channels.
        num_classes: Number of output logits.
        drop_rate: Dropout between the two convs of each block (0 in the AT literature).
    """

    def __init__(
        self,
        depth: int = 34,
        widen_factor: int = 10,
        in_channels: int = 3,
        num_classes: int = 10,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(
                f"WideResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 34, 40, ..., 70), "
                f"got {depth}."
            )
        if widen_factor < 1:
            raise ValueError(f"WideResNet widen_factor must be >= 1, got {widen_factor}.")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.depth, self.widen_factor = depth, widen_factor
        self.conv1 = _conv3x3(in_channels, widths[0])
        groups: list[nn.Module] = []
        in_ch = widths[0]
        for width, stride in zip(widths[1:], (1, 2, 2)):
            blocks = [PreActBlock(in_ch if i == 0 else width, width, stride if i == 0 else 1, drop_rate)
                      for i in range(n)]
            groups.append(nn.Sequential(*blocks))
            in_ch = width
        self.groups = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(widths[3])
        self.feature_dim = widths[3]
        self.num_classes = num_classes
        self.linear = nn.Linear(widths[3], num_classes)
        _init_weights(self)

    def features(self, x: Tensor) -> Tensor:
        out = self.groups(self.conv1(x))
        out = F.relu(self.bn(out))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


# ----------------------------------------------------------------------------- small CNN


class SmallCNN(_Classifier):
    """A small network for 8x8 digits: two 3x3 conv-BN-ReLU layers (32, 64), 2x2 max-pool,
    a 128-unit hidden layer and the classifier (~0.15M parameters).

    An adaptive average pool to 4x4 after the max-pool lets the same network run on larger
    images (e.g. quick CIFAR smoke tests); on 8x8 inputs the map already is 4x4, where the pool
    would be an exact copy, so it is skipped (it cost about a fifth of each forward/backward).

    Args:
        in_channels: Image channels.
        num_classes: Number of output logits.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv3x3(in_channels, 32),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            _conv3x3(32, 64),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.hidden = nn.Linear(64 * 4 * 4, 128)
        self.feature_dim = 128
        self.num_classes = num_classes
        self.linear = nn.Linear(128, num_classes)
        _init_weights(self)

    def features(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        if h.shape[-2:] != (4, 4):
            h = F.adaptive_avg_pool2d(h, 4)
        return F.relu(self.hidden(torch.flatten(h, 1)))


# ----------------------------------------------------------------------------- factory

_WRN_PATTERN = re.compile(r"^(?:wrn|wideresnet|wide-resnet)-?(\d+)-(\d+)$")


def build_model(name: str, in_channels: int, num_classes: int, init: str = "kaiming") -> nn.Module:
    """Build a freshly initialised classifier.

    Args:
        name: ``"resnet18"``, ``"preact_resnet18"`` (each also ``..._pool2``),
            ``"wrn-DEPTH-WIDTH"`` (also ``"wideresnet-34-10"``, ``"wrn_34_10"``) or
            ``"small_cnn"``; case and ``-``/``_`` are interchangeable.
        in_channels: Channels of the input images.
        num_classes: Number of output logits.
        init: ``"kaiming"`` (ours) or ``"pytorch"`` (PyTorch's layer defaults: the authors'
            ResNet-18); see the module docstring.

    Returns:
        A model mapping ``(N, in_channels, H, W)`` images in ``[0, 1]`` to ``(N, num_classes)``
        logits, with ``features`` / ``feature_dim`` as described in the module docstring.

    Raises:
        ValueError: unknown name or init, or a WRN depth that is not ``6n + 4``.
    """
    if in_channels < 1 or num_classes < 1:
        raise ValueError(f"in_channels and num_classes must be >= 1, got {in_channels}, {num_classes}.")
    if init not in INITS:
        raise ValueError(f"Unknown init {init!r}: use 'kaiming' (ours) or 'pytorch' (PyTorch's defaults, the "
                         f"authors' ResNet-18).")
    model = _architecture(name.strip().lower().replace("_", "-"), in_channels, num_classes)
    if model is None:
        raise ValueError(
            f"Unknown model {name!r}; valid names are: {', '.join(MODEL_NAMES)} "
            "(or any 'wrn-DEPTH-WIDTH' with DEPTH = 6n + 4)."
        )
    if init == "pytorch":
        for m in model.modules():  # every layer back to its own reset_parameters()
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
                m.reset_parameters()
    return model


def _architecture(key: str, in_channels: int, num_classes: int) -> nn.Module | None:
    """The network a normalised name means (Kaiming-initialised), or None for an unknown name."""
    if key in ("resnet18", "resnet-18"):
        return ResNet18(in_channels, num_classes)
    if key in ("resnet18-pool2", "resnet-18-pool2"):
        return ResNet18(in_channels, num_classes, pool=2)
    if key in ("preact-resnet18", "preact-resnet-18", "preactresnet18"):
        return ResNet18(in_channels, num_classes, preact=True)
    if key in ("preact-resnet18-pool2", "preact-resnet-18-pool2"):
        return ResNet18(in_channels, num_classes, preact=True, pool=2)
    if key in ("small-cnn", "smallcnn"):
        return SmallCNN(in_channels, num_classes)
    match = _WRN_PATTERN.match(key)
    if match:
        depth, width = int(match.group(1)), int(match.group(2))
        return WideResNet(depth, width, in_channels, num_classes)
    return None

