"""Checks of user-supplied arrays before they become an :class:`ImageData`.

Each problem is one :class:`las_env.data.DataError` paragraph: what is wrong, where, and a fix
that works. The checks run on the host before anything is moved or trained.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from las_env.data import DataError, ImageData

GREY_OR_COLOUR = (1, 3)
"""Channel counts accepted: grey or RGB."""
MIN_SIDE = {"small_cnn": 2}
"""Smallest image side (px) each architecture runs on; 1 for the others (resnet18, preact_resnet18,
wrn-*: padded 3x3 convolutions and adaptive pooling). small_cnn max-pools by 2 first."""


def fail(source: str, problem: str, fix: str) -> DataError:
    """The one-paragraph error: ``<source>: <problem> Fix: <fix>``."""
    return DataError(f"{source}: {problem} Fix: {fix}")


def to_nchw(source: str, key: str, x: np.ndarray) -> np.ndarray:
    """``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)`` with C in {1, 3} -> ``(N, C, H, W)``.

    The channel axis is the last one when it has 1 or 3 entries, else the second.
    """
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        if x.shape[3] in GREY_OR_COLOUR:
            return x.transpose(0, 3, 1, 2)
        if x.shape[1] in GREY_OR_COLOUR:
            return x
    raise fail(source, f"{key} has shape {x.shape}; images must be (N, H, W) grey, (N, H, W, C) or (N, C, H, W) "
               "with C = 1 (grey) or 3 (colour).", f"reshape {key} to (N, H, W, C), e.g. x.reshape(n, h, w, 3).")


def to_float_images(source: str, key: str, x: np.ndarray) -> torch.Tensor:
    """uint8 (0..255) or float in [0, 1] -> float32 tensor in [0, 1]; anything else is an error."""
    if x.shape[0] == 0:
        raise fail(source, f"{key} is empty (0 images).", "give at least one image per split (and batch_size "
                   "of them in the training split).")
    if x.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32).div_(255.0)
    if not np.issubdtype(x.dtype, np.floating):
        raise fail(source, f"{key} has dtype {x.dtype}; images must be uint8 (0..255) or float in [0, 1].",
                   f"convert it: {key}.astype(np.uint8) for 0..255 values, or {key} / 255.0 as float32.")
    bad = ~np.isfinite(x)
    if bad.any():
        first = np.argwhere(bad)[0]
        raise fail(source, f"{key} holds {int(bad.sum())} NaN or infinite pixel values (the first in image "
                   f"{int(first[0])}).", "replace or drop those images, e.g. np.nan_to_num(x, nan=0.0) or a mask.")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        hint = (f"{key} / 255.0 (the values look like 0..255)" if hi <= 255 and lo >= 0
                else f"np.clip({key}, 0, 1) or rescale to [0, 1] (no normalisation: epsilons are in pixel units)")
        raise fail(source, f"{key} values span [{lo:.4g}, {hi:.4g}]; float images must lie in [0, 1].", hint + ".")
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def to_labels(source: str, key: str, y: np.ndarray, n_images: int) -> torch.Tensor:
    """Whole-number labels, one per image, as an int64 tensor."""
    y = np.asarray(y)
    if y.ndim == 2 and 1 in y.shape:
        y = y.reshape(-1)
    if y.ndim != 1:
        raise fail(source, f"{key} has shape {y.shape}; labels must be one whole number per image, shape (N,).",
                   f"give class indices, e.g. {key}.argmax(1) for one-hot labels.")
    if y.shape[0] != n_images:
        raise fail(source, f"{key} holds {y.shape[0]} labels but the images {n_images}.",
                   "give exactly one label per image, in the same order.")
    if y.dtype == bool or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise fail(source, f"{key} has dtype {y.dtype}; labels must be class indices 0..K-1.",
                   "map class names to indices, e.g. np.unique(names, return_inverse=True)[1].")
    if np.issubdtype(y.dtype, np.floating) and (not np.isfinite(y).all() or (y != np.round(y)).any()):
        raise fail(source, f"{key} holds non-whole or non-finite values; labels must be class indices 0..K-1.",
                   f"give whole numbers: {key}.astype(np.int64) after fixing the odd entries.")
    return torch.from_numpy(y.astype(np.int64))


def image_data(name: str, source: str, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
               y_test: torch.Tensor, class_names: Sequence[str] | None, description: str) -> ImageData:
    """The :class:`ImageData` of checked splits; labels, classes and shapes are checked together."""
    if x_train.shape[1:] != x_test.shape[1:]:
        raise fail(source, f"train images are (C, H, W) = {tuple(x_train.shape[1:])} but test images "
                   f"{tuple(x_test.shape[1:])}.", "give both splits the same size and channels.")
    if min(x_train.shape[2:]) < 1:
        raise fail(source, f"the images are {x_train.shape[3]}x{x_train.shape[2]} px (width x height): they hold no "
                   "pixels.", "give images of at least 2x2 px (every model accepts those).")
    lo = min(int(y_train.min()), int(y_test.min()))
    hi = max(int(y_train.max()), int(y_test.max()))
    k = len(class_names) if class_names is not None else hi + 1
    if lo < 0 or hi >= k:
        named = f"the {k} class_names" if class_names is not None else "classes"
        raise fail(source, f"labels span [{lo}, {hi}], outside [0, {k}) ({named}).",
                   "labels must be class indices 0..K-1; give class_names with one name per class, or renumber.")
    if class_names is None:  # the class count comes from the labels: they must use every index below it
        used = torch.unique(torch.cat([y_train, y_test]))
        if used.numel() < k:
            absent = sorted(set(range(k)) - set(used.tolist()))
            top = int(used[-1])
            raise fail(source, f"the labels use {used.numel()} distinct values but reach {top}, so they would make "
                       f"{k} classes, {len(absent)} of them without a single image (e.g. {_few(absent)}): one "
                       f"outlier label (here the largest is {top}) would build a {k}-class model.",
                       "renumber the labels to 0..K-1 (np.unique(y, return_inverse=True)[1]), or, if some classes "
                       "really have no images, declare every class by saving class_names with one name per class.")
    if k < 2:
        raise fail(source, f"there is only {k} class.", "give at least two classes.")
    names = [str(n) for n in class_names] if class_names is not None else [str(i) for i in range(k)]
    return ImageData(name=name, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                     num_classes=k, class_names=names, description=description)


def _few(values: Sequence[int], shown: int = 5) -> str:
    return ", ".join(map(str, values[:shown])) + (f" and {len(values) - shown} more" if len(values) > shown else "")


def check_image_size(data: ImageData, models: dict[str, str]) -> None:
    """Refuse images smaller than an architecture needs (:data:`MIN_SIDE`), before anything is built.

    Args:
        models: role -> architecture name, e.g. ``{"model.name": "small_cnn"}``.
    """
    side = min(data.height, data.width)
    for role, name in models.items():
        need = MIN_SIDE.get(str(name).strip().lower().replace("-", "_"), 1)
        if side < need:
            sizes = ", ".join(f"{m} {n}x{n} px" for m, n in MIN_SIDE.items())
            raise DataError(f"{data.name}: its images are {data.width}x{data.height} px, smaller than {name} "
                            f"({role}) needs: at least {need}x{need} px ({sizes}; resnet18, preact_resnet18 and "
                            f"wrn-* 1x1 px). Fix: give larger images, or choose another architecture for {role} "
                            f"(e.g. {role}=resnet18).")


def classes_missing_from_train(data: ImageData) -> str | None:
    """A warning naming the classes the test split has and the train split lacks (``None`` if none):
    the model is scored on classes it never saw."""
    missing = sorted(set(data.y_test.unique().tolist()) - set(data.y_train.unique().tolist()))
    if not missing:
        return None
    names = [f"{c} ({data.class_names[c]})" if data.class_names[c] != str(c) else str(c) for c in missing]
    return (f"WARNING: {data.name}'s training split has no image of class(es) {', '.join(names[:10])}"
            f"{' and more' if len(names) > 10 else ''}, which its test split has: the model is scored on classes "
            f"it never trains on. Add training images of those classes, or drop them from the test split.")
