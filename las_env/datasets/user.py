"""Your own data: an ``.npz`` file or an image folder (``data=npz`` / ``data=folder`` with
``data.path``), read whole into an :class:`ImageData`, every problem reported before training.

- ``.npz``: keys ``x_train, y_train, x_test, y_test`` (images uint8 0..255 or float in [0, 1],
  as ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)``, C = 1 or 3; labels 0..K-1) and
  optionally ``class_names``.
- folder: ``train/<class>/*.png`` and ``test/<class>/*.png`` (any format Pillow reads); classes
  are the sorted ``train`` sub-folder names; all grey images -> 1 channel, else RGB.

Images may be non-square; every image of a data set has one size.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from las_env.data import DatasetNotFoundError, ImageData
from las_env.datasets.checks import fail, image_data, to_float_images, to_labels, to_nchw

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
GREY_MODES = ("1", "L", "LA", "I", "I;16")


def load_npz(path: Path, download: bool = False) -> ImageData:
    """An ``.npz`` with ``x_train, y_train, x_test, y_test`` (and optional ``class_names``)."""
    del download  # your own file: nothing to fetch
    if not path.is_file():
        raise DatasetNotFoundError(
            f"data.path={path}: no such file. data=npz reads one .npz file with the arrays x_train, y_train, "
            f"x_test, y_test (np.savez(FILE, x_train=..., y_train=..., x_test=..., y_test=...)); give its path."
        )
    source = f"data.path={path}"
    if path.stat().st_size == 0:
        raise fail(source, "is empty (0 bytes): an unfinished copy or save.",
                   "copy or write it again: np.savez(FILE, x_train=..., y_train=..., x_test=..., y_test=...).")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise fail(source, f"cannot be read as an .npz ({type(exc).__name__}: {exc}).",
                   "write it with np.savez(FILE, x_train=..., y_train=..., x_test=..., y_test=...) "
                   "(class_names as an array of str, not objects).") from None
    missing = [k for k in NPZ_KEYS if k not in arrays]
    if missing:
        raise fail(source, f"lacks the array(s) {missing} (it holds {sorted(arrays)}).",
                   "save x_train, y_train, x_test, y_test under exactly these names (optional: class_names).")
    splits = {}
    for split in ("train", "test"):
        x = to_nchw(source, f"x_{split}", np.asarray(arrays[f"x_{split}"]))
        images = to_float_images(source, f"x_{split}", x)
        splits[split] = images, to_labels(source, f"y_{split}", arrays[f"y_{split}"], images.shape[0])
    names = arrays.get("class_names")
    names = [str(n) for n in np.asarray(names).reshape(-1)] if names is not None else None
    (x_tr, y_tr), (x_te, y_te) = splits["train"], splits["test"]
    c, h, w = x_tr.shape[1:]
    return image_data("npz", source, x_tr, y_tr, x_te, y_te, names,
                      f"{path.name} (.npz, {len(y_tr)} train / {len(y_te)} test, {c}x{h}x{w})")


def load_folder(path: Path, download: bool = False) -> ImageData:
    """``train/<class>/*.png`` and ``test/<class>/*.png`` under ``path``."""
    del download
    source = f"data.path={path}"
    layout = "DIR/train/<class>/*.png and DIR/test/<class>/*.png (one sub-folder per class, same names in both)"
    if not path.is_dir():
        raise DatasetNotFoundError(f"{source}: no such folder. data=folder reads {layout}; give the folder's path.")
    missing = [s for s in ("train", "test") if not (path / s).is_dir()]
    if missing:
        raise DatasetNotFoundError(f"{source}: has no {' or '.join(missing)} sub-folder. data=folder reads {layout}.")
    classes = sorted(d.name for d in (path / "train").iterdir() if d.is_dir())
    extra = sorted(d.name for d in (path / "test").iterdir() if d.is_dir() and d.name not in classes)
    if extra:
        raise fail(source, f"test/ has class folder(s) {extra} that train/ lacks.",
                   f"use the same class folders in both splits ({layout}).")
    files = {s: [(f, i) for i, c in enumerate(classes) if (path / s / c).is_dir()
                 for f in sorted((path / s / c).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
             for s in ("train", "test")}
    for split, found in files.items():
        if not found:
            raise fail(source, f"{split}/ holds no images ({', '.join(IMAGE_SUFFIXES)}) in class sub-folders.",
                       f"put the images in {layout}.")
    pixels = _decode(source, [f for s in ("train", "test") for f, _ in files[s]])
    n_train = len(files["train"])
    x = to_float_images(source, "images", pixels)
    y = torch.tensor([i for s in ("train", "test") for _, i in files[s]], dtype=torch.int64)
    c, h, w = x.shape[1:]
    return image_data("folder", source, x[:n_train], y[:n_train], x[n_train:], y[n_train:], classes,
                      f"{path.name}/ (image folder, {n_train} train / {len(y) - n_train} test, {c}x{h}x{w})")


def _decode(source: str, paths: list[Path]) -> np.ndarray:
    """All images as one ``(N, C, H, W)`` uint8 array: grey when every file is grey, else RGB."""
    from PIL import Image  # noqa: PLC0415

    images = []
    for p in paths:
        try:
            with Image.open(p) as img:
                img.load()
                images.append(img.copy())
        except OSError as exc:
            raise fail(source, f"{p} cannot be read as an image ({exc}; {p.stat().st_size} bytes).",
                       f"replace it with a readable image, or move it out of {p.parent} (the loader reads every "
                       f"image file in the class folders).") from None
    grey = all(img.mode in GREY_MODES for img in images)
    size = images[0].size
    for p, img in zip(paths, images):
        if img.size != size:
            raise fail(source, f"{p} is {img.size[0]}x{img.size[1]} (width x height) but {paths[0]} is "
                       f"{size[0]}x{size[1]}.", "resize every image to one size (non-square is fine).")
    arrays = [np.asarray(img.convert("L" if grey else "RGB"), dtype=np.uint8) for img in images]
    out = np.stack(arrays)
    return out[:, None] if grey else out.transpose(0, 3, 1, 2)


def peek_size(kind: str, path: Path) -> tuple[int, int] | None:
    """``(height, width)`` of a user data set without loading it, or ``None`` when it cannot be
    told cheaply (the loader reports any problem later)."""
    try:
        if kind == "npz":
            with zipfile.ZipFile(path) as z, z.open("x_train.npy") as fh:
                major, _ = np.lib.format.read_magic(fh)
                read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape = read_header(fh)[0]  # the header only, not the pixels
            x = np.empty((1, *shape[1:]), dtype=np.uint8)
            h, w = to_nchw("", "", x).shape[2:]
            return int(h), int(w)
        if kind == "folder":
            from PIL import Image  # noqa: PLC0415

            first = next(f for d in sorted((path / "train").iterdir()) if d.is_dir()
                         for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES)
            with Image.open(first) as img:
                return img.size[1], img.size[0]
    except Exception:  # noqa: BLE001 - any problem: unknown now, reported by the loader
        return None
    return None
