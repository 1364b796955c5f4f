"""The in-memory image data set every part of the game reads: :class:`ImageData`.

Every data set is loaded once into an :class:`ImageData`: ``float32`` images in ``[0, 1]``,
layout ``NCHW``, ``int64`` labels. There is no input normalisation anywhere (epsilons are in
pixel units, as in the authors' setting). Which data sets exist, how they load and what their
defaults are is the registry's business (:mod:`las_env.datasets`, which also loads them:
:func:`las_env.datasets.load_dataset`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor


class DatasetNotFoundError(FileNotFoundError):
    """A data set's files are not where its loader looks, and it could not fetch them.

    The message names the folder expected and the ways to obtain the data.
    """


class DataError(ValueError):
    """A data set's content is unusable (NaN pixels, labels out of range, an empty split...).

    The message is one paragraph naming the problem and a fix; the command line shows it as
    ``las-at: error: ...`` before any training.
    """


@dataclass
class ImageData:
    """A whole image-classification data set held as tensors.

    Attributes:
        name: Data set name as registered (``"digits"``, ``"cifar10"``, ``"npz"``...).
        x_train: Training images, ``(N, C, H, W)`` ``float32`` in ``[0, 1]``.
        y_train: Training labels, ``(N,)`` ``int64`` in ``[0, num_classes)``.
        x_test: Test images, same ``C, H, W`` as ``x_train`` (``H != W`` is allowed).
        y_test: Test labels, ``(M,)`` ``int64``.
        num_classes: Number of classes (the width of a classifier's output).
        class_names: Human-readable name of each class, index = label.
        description: Honest provenance for reports, e.g. where the files were read from and
            how many images each split holds.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    class_names: list[str]
    description: str

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            self._check_split(split)
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(
                f"{self.name}: train images are {tuple(self.x_train.shape[1:])} but test images "
                f"{tuple(self.x_test.shape[1:])}; both splits need one (C, H, W)."
            )
        if len(self.class_names) != self.num_classes:
            raise DataError(f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes.")

    def _check_split(self, split: str) -> None:
        x: Tensor = getattr(self, f"x_{split}")
        y: Tensor = getattr(self, f"y_{split}")
        if not isinstance(x, Tensor) or x.dim() != 4 or x.dtype != torch.float32:
            raise DataError(
                f"{self.name}: x_{split} must be a float32 tensor of shape (N, C, H, W), got "
                f"{type(x).__name__} {getattr(x, 'dtype', None)} {tuple(getattr(x, 'shape', ()))}."
            )
        if not isinstance(y, Tensor) or y.dim() != 1 or y.dtype != torch.int64:
            raise DataError(
                f"{self.name}: y_{split} must be an int64 tensor of shape (N,), got "
                f"{type(y).__name__} {getattr(y, 'dtype', None)} {tuple(getattr(y, 'shape', ()))}."
            )
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{self.name}: x_{split} holds {x.shape[0]} images but y_{split} {y.shape[0]} labels.")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise DataError(
                f"{self.name}: y_{split} has labels in [{int(y.min())}, {int(y.max())}], outside [0, {self.num_classes})."
            )
        if x.numel():
            # NaN pixels pass here (they compare False): the file loaders refuse them
            # (las_env/datasets/checks.py); data built in code may hold them on purpose
            # (on_nonfinite=skip drops their batches).
            lo, hi = (float(v) for v in torch.aminmax(x))
            if lo < 0.0 or hi > 1.0:
                raise DataError(
                    f"{self.name}: x_{split} values span [{lo:.4g}, {hi:.4g}]; images must be in [0, 1] "
                    "(no normalisation)."
                )

    @property
    def channels(self) -> int:
        """Number of image channels ``C`` (1 for digits, 3 for the colour sets)."""
        return int(self.x_train.shape[1])

    @property
    def height(self) -> int:
        """Image height ``H`` in pixels."""
        return int(self.x_train.shape[2])

    @property
    def width(self) -> int:
        """Image width ``W`` in pixels."""
        return int(self.x_train.shape[3])

    @property
    def image_size(self) -> int:
        """The shorter side ``min(H, W)`` (the side length for square images); size rules such as
        "augment from 32 px" read it."""
        return min(self.height, self.width)

    def to(self, device: torch.device | str) -> ImageData:
        """A new :class:`ImageData` whose four tensors live on ``device`` (self is unchanged)."""
        return dataclasses.replace(
            self,
            x_train=self.x_train.to(device),
            y_train=self.y_train.to(device),
            x_test=self.x_test.to(device),
            y_test=self.y_test.to(device),
            class_names=list(self.class_names),
        )


__all__ = ["DataError", "DatasetNotFoundError", "ImageData"]
