"""The built-in data sets' loaders: files on disk (or scikit-learn) -> :class:`ImageData`.

Each loader takes ``(root, download)`` (:data:`las_env.datasets.registry.Loader`); the records
that name them are in :mod:`las_env.datasets.builtin`.

- ``digits``: scikit-learn's 8x8 handwritten digits, shipped inside its wheel (offline), read without importing it.
- ``cifar10`` / ``cifar100``: the standard "python version" pickles under
  ``root/cifar-10-batches-py`` / ``root/cifar-100-python``, read directly (no md5 check,
  so folders written by ``shared/data/prepare_cifar.py`` are accepted).
- ``svhn``: ``root/svhn/{train,test}_32x32.mat`` (the cropped-digits release).
- ``gtsrb``: through ``torchvision.datasets.GTSRB``, resized to 32x32.
- ``tiny-imagenet``: the image-folder layout of ``tiny-imagenet-200.zip``.

Downloads go through torchvision only when it imports and ``download=True``; otherwise a
missing data set raises :class:`DatasetNotFoundError` naming the exact folder expected and
how to obtain it.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from las_env.data import DataError, DatasetNotFoundError, ImageData
from las_env.datasets.safe_pickle import load_data_pickle

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
GTSRB_URL = "https://benchmark.ini.rub.de/gtsrb_dataset.html"
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
DIGITS_SPLIT = Path(__file__).with_name("digits_split.txt")  # sklearn train_test_split row indices


def _images_from_uint8(x: np.ndarray) -> Tensor:
    """``(N, C, H, W)`` uint8 -> float32 in [0, 1], in one conversion."""
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32).div_(255.0)


def _labels(y: Sequence[int] | np.ndarray) -> Tensor:
    return torch.from_numpy(np.asarray(y, dtype=np.int64).copy())


def _import_torchvision() -> ModuleType | None:
    """torchvision if it imports cleanly, else None.

    Any exception counts as absent: a torchvision built against another torch fails with
    RuntimeError/OSError rather than ImportError, and we only ever need it for downloads.
    """
    try:
        import torchvision  # noqa: PLC0415

        return torchvision
    except Exception:  # noqa: BLE001
        return None


def _digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's stratified 75/25 split of its 8x8 digits, from the CSV inside its wheel and the split's row
    indices in ``digits_split.txt``: importing scikit-learn (and the pandas it pulls in) cost each process 1 s."""
    spec = importlib.util.find_spec("sklearn")
    folders = spec.submodule_search_locations if spec is not None else None
    csv = Path(folders[0]) / "datasets" / "data" / "digits.csv.gz" if folders else None
    if csv is not None and csv.is_file():
        table = np.loadtxt(csv, delimiter=",")
        pixels, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    else:  # a scikit-learn that keeps the file elsewhere
        from sklearn.datasets import load_digits  # noqa: PLC0415

        bunch = load_digits()
        pixels, target = bunch.images, bunch.target
    # The pixels are counts of set cells in 4x4 blocks, 0..16.
    images = (pixels / 16.0).astype(np.float32)[:, None, :, :]
    labels = target.astype(np.int64)
    split = dict(line.split(" ", 1) for line in DIGITS_SPLIT.read_text().splitlines() if not line.startswith("#"))
    train, test = (np.array(split[part].split(), dtype=np.int64) for part in ("train", "test"))
    return images[train], labels[train], images[test], labels[test]


def _load_digits() -> ImageData:
    x_tr, y_tr, x_te, y_te = _digits_split()
    return ImageData(
        name="digits",
        x_train=torch.from_numpy(np.ascontiguousarray(x_tr)),
        y_train=torch.from_numpy(np.ascontiguousarray(y_tr)),
        x_test=torch.from_numpy(np.ascontiguousarray(x_te)),
        y_test=torch.from_numpy(np.ascontiguousarray(y_te)),
        num_classes=10,
        class_names=[str(d) for d in range(10)],
        description=f"digits (scikit-learn 8x8, {len(y_tr)} train / {len(y_te)} test)",
    )


def _unpickle(path: Path) -> dict[str, Any]:
    """Read a CIFAR pickle (builtin values and numpy arrays only: :mod:`las_env.datasets.safe_pickle`)
    into a dict with ``str`` keys and ``str`` string values.

    The official files are Python 2 pickles (``latin1`` decodes their str keys to str);
    folders written under Python 3 carry ``bytes`` keys; accept both.
    """
    raw = load_data_pickle(path)
    if not isinstance(raw, dict):
        raise DataError(f"{path} holds a {type(raw).__name__}, not the dict of a CIFAR batch. Replace the folder "
                        f"{path.parent} with the official release or with what shared/data/prepare_cifar.py writes.")

    def _s(v: Any) -> Any:
        return v.decode("latin1") if isinstance(v, bytes) else v

    out: dict[str, Any] = {}
    for k, v in raw.items():
        if isinstance(v, list) and v and isinstance(v[0], bytes):
            v = [_s(e) for e in v]
        out[_s(k)] = _s(v)
    return out


# Folders written by shared/data/prepare_cifar.py name images "train_<j>.png"/"test_<j>.png";
# the official release uses names like "bufo_bufo_s_002202.png".
_SYNTHETIC_NAME = re.compile(r"^(train|test)_\d+\.png$")


def _cifar_missing_message(title: str, folder: Path, files: Sequence[str], flag: str) -> str:
    root = folder.parent
    return (
        f"{title} not found: expected the folder {folder} holding {', '.join(files)} "
        f"(the 'python version' layout). Ways to get it: (1) download the python version from "
        f"{CIFAR_URL} and extract it into {root}; (2) offline, from the shared copies: "
        f"`python ../shared/data/prepare_cifar.py {root}{flag}` (run from the project root; "
        f"see its --help); (3) `pip install torchvision` and call load_dataset(..., download=True)."
    )


def _load_cifar(root: Path, download: bool, *, cifar100: bool) -> ImageData:
    if cifar100:
        title, folder_name = "CIFAR-100", "cifar-100-python"
        train_files, test_files, meta_file = ["train"], ["test"], "meta"
        label_key, names_key, flag = "fine_labels", "fine_label_names", " --cifar100"
    else:
        title, folder_name = "CIFAR-10", "cifar-10-batches-py"
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files, meta_file = ["test_batch"], "batches.meta"
        label_key, names_key, flag = "labels", "label_names", " [--exact-subset]"
    folder = root / folder_name
    needed = [*train_files, *test_files, meta_file]

    def _missing() -> list[str]:
        return [f for f in needed if not (folder / f).is_file()]

    if _missing() and download:
        tv = _import_torchvision()
        if tv is not None:
            cls = tv.datasets.CIFAR100 if cifar100 else tv.datasets.CIFAR10
            cls(root=str(root), train=True, download=True)
    missing = _missing()
    if missing:
        msg = _cifar_missing_message(title, folder, needed, flag)
        if folder.is_dir():
            msg += f" The folder exists but lacks: {', '.join(missing)}."
        raise DatasetNotFoundError(msg)

    def _read(files: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        parts = [_unpickle(folder / f) for f in files]
        rows = np.concatenate([np.asarray(p["data"], dtype=np.uint8) for p in parts])
        labels = np.concatenate([np.asarray(p[label_key], dtype=np.int64) for p in parts])
        names = [n for p in parts for n in p.get("filenames", [])]
        # Each row is 3072 bytes: the 1024 R, then G, then B values, row-major: already CHW.
        return rows.reshape(-1, 3, 32, 32), labels, names

    x_tr, y_tr, names_tr = _read(train_files)
    x_te, y_te, names_te = _read(test_files)
    class_names = [str(n) for n in _unpickle(folder / meta_file)[names_key]]

    description = f"{title} from {folder} ({len(y_tr)} train / {len(y_te)} test"
    all_names = names_tr + names_te
    if all_names and all(_SYNTHETIC_NAME.match(n) for n in all_names):
        full = (len(y_tr), len(y_te)) == (50000, 10000)
        kind = "the JPEG-q75 copy, not the exact pixels" if full and not cifar100 else "an exact-pixel subset"
        description += f"; file names as shared/data/prepare_cifar.py writes them: {kind}"
    description += ")"
    return ImageData(
        name="cifar100" if cifar100 else "cifar10",
        x_train=_images_from_uint8(x_tr),
        y_train=_labels(y_tr),
        x_test=_images_from_uint8(x_te),
        y_test=_labels(y_te),
        num_classes=len(class_names),
        class_names=class_names,
        description=description,
    )


def _load_svhn(root: Path, download: bool) -> ImageData:
    folder = root / "svhn"
    files = {"train": folder / "train_32x32.mat", "test": folder / "test_32x32.mat"}
    missing = [p for p in files.values() if not p.is_file()]
    if missing and download:
        tv = _import_torchvision()
        if tv is not None:
            # torchvision stores the .mat files directly in the root it is given.
            for split in ("train", "test"):
                tv.datasets.SVHN(root=str(folder), split=split, download=True)
            missing = [p for p in files.values() if not p.is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"SVHN not found: expected the folder {folder} holding train_32x32.mat and "
            f"test_32x32.mat (missing: {', '.join(p.name for p in missing)}). Download them "
            f"(the 'cropped digits' format) from {SVHN_URL} into {folder}, or `pip install "
            f"torchvision` and call load_dataset('svhn', ..., download=True)."
        )
    from scipy.io import loadmat  # noqa: PLC0415

    out: dict[str, tuple[Tensor, Tensor]] = {}
    for split, path in files.items():
        mat = loadmat(path)
        x = np.asarray(mat["X"], dtype=np.uint8).transpose(3, 2, 0, 1)  # (H, W, C, N) -> NCHW
        y = np.asarray(mat["y"], dtype=np.int64).reshape(-1)
        y[y == 10] = 0  # the release labels the digit 0 as class 10
        out[split] = (_images_from_uint8(x), _labels(y))
    n_train, n_test = len(out["train"][1]), len(out["test"][1])
    return _numbered_classes("svhn", out, 10, f"SVHN cropped digits from {folder} ({n_train} train / {n_test} test; "
                                              f"'extra' not used)")


def _numbered_classes(name: str, splits: dict[str, tuple[Tensor, Tensor]], classes: int,
                      description: str) -> ImageData:
    """The :class:`ImageData` of ``{"train": (x, y), "test": (x, y)}`` whose classes are named by number."""
    return ImageData(name=name, x_train=splits["train"][0], y_train=splits["train"][1], x_test=splits["test"][0],
                     y_test=splits["test"][1], num_classes=classes, class_names=[str(c) for c in range(classes)],
                     description=description)


GTSRB_SIZE = 32
"""GTSRB images come in many sizes; they are resized (bilinear) to this side length."""


def _load_gtsrb(root: Path, download: bool) -> ImageData:
    tv = _import_torchvision()
    if tv is None:
        raise DatasetNotFoundError(
            f"GTSRB is read through torchvision.datasets.GTSRB (folder {root / 'gtsrb'}), and "
            f"torchvision does not import here. `pip install torchvision` (it then downloads the "
            f"data into {root / 'gtsrb'} with download=True); the data set itself is described at "
            f"{GTSRB_URL}."
        )
    from PIL import Image  # noqa: PLC0415

    out: dict[str, tuple[Tensor, Tensor]] = {}
    for split in ("train", "test"):
        try:
            ds = tv.datasets.GTSRB(root=str(root), split=split, download=download)
        except RuntimeError as err:  # torchvision's "Dataset not found" when download=False
            raise DatasetNotFoundError(
                f"GTSRB not found under {root / 'gtsrb'} ({err}). Call load_dataset('gtsrb', "
                f"..., download=True) to let torchvision fetch it; see {GTSRB_URL}."
            ) from err
        n = len(ds)
        x = np.empty((n, GTSRB_SIZE, GTSRB_SIZE, 3), dtype=np.uint8)
        y = np.empty(n, dtype=np.int64)
        for i in range(n):  # decoding is per file anyway; only the conversion is vectorised
            img, label = ds[i]
            x[i] = np.asarray(img.convert("RGB").resize((GTSRB_SIZE, GTSRB_SIZE), Image.BILINEAR))
            y[i] = label
        out[split] = (_images_from_uint8(x.transpose(0, 3, 1, 2)), _labels(y))
    n_train, n_test = len(out["train"][1]), len(out["test"][1])
    return _numbered_classes("gtsrb", out, 43, f"GTSRB from {root / 'gtsrb'} via torchvision, resized to "
                                               f"{GTSRB_SIZE}x{GTSRB_SIZE} ({n_train} train / {n_test} test)")


TINY_IMAGENET_SIZE = 64


def _decode_images(paths: Sequence[Path], size: int) -> np.ndarray:
    """Decode image files into one ``(N, 3, size, size)`` uint8 array.

    Threads, because Pillow releases the GIL while decoding JPEGs.
    """
    from PIL import Image  # noqa: PLC0415

    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)

    def _one(i: int) -> None:
        with Image.open(paths[i]) as img:
            arr = np.asarray(img.convert("RGB"))  # a few Tiny-ImageNet images are greyscale
        if arr.shape != (size, size, 3):
            raise ValueError(f"{paths[i]} is {arr.shape[1]}x{arr.shape[0]}, expected {size}x{size}.")
        out[i] = arr

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(_one, range(len(paths))))
    return out.transpose(0, 3, 1, 2)


def _load_tiny_imagenet(root: Path, download: bool) -> ImageData:
    del download  # torchvision has no Tiny-ImageNet; nothing to fetch it with
    folder = root / "tiny-imagenet-200"
    train_dir, val_dir = folder / "train", folder / "val"
    annotations = val_dir / "val_annotations.txt"
    val_flat = (val_dir / "images").is_dir() and annotations.is_file()
    if not train_dir.is_dir() or not (val_flat or val_dir.is_dir()):
        raise DatasetNotFoundError(
            f"Tiny-ImageNet not found: expected the folder {folder} with "
            f"train/<wnid>/images/*.JPEG and val/images/*.JPEG + val/val_annotations.txt "
            f"(the layout of {TINY_IMAGENET_URL}). Download that zip and unzip it into {root}."
        )
    # Sorted folder names give the class order torchvision's ImageFolder (the authors') uses.
    wnids = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    index = {w: i for i, w in enumerate(wnids)}
    train_paths: list[Path] = []
    train_labels: list[int] = []
    for w in wnids:
        sub = train_dir / w / "images"
        files = sorted(f for f in (sub if sub.is_dir() else train_dir / w).iterdir() if f.is_file()
                       and f.suffix.lower() in (".jpeg", ".jpg", ".png"))
        train_paths += files
        train_labels += [index[w]] * len(files)

    test_paths: list[Path] = []
    test_labels: list[int] = []
    if val_flat:
        for line in annotations.read_text().splitlines():
            fields = line.split("\t")
            if len(fields) < 2:
                continue
            if fields[1] not in index:
                raise ValueError(f"{annotations}: class {fields[1]!r} has no train folder.")
            test_paths.append(val_dir / "images" / fields[0])
            test_labels.append(index[fields[1]])
    else:  # val already sorted into val/<wnid>/[images/]*.JPEG by some preparation script
        for w in wnids:
            sub = val_dir / w / "images" if (val_dir / w / "images").is_dir() else val_dir / w
            if sub.is_dir():
                files = sorted(f for f in sub.iterdir() if f.is_file())
                test_paths += files
                test_labels += [index[w]] * len(files)

    if not train_paths or not test_paths:
        empty = "train" if not train_paths else "val"
        raise DatasetNotFoundError(
            f"Tiny-ImageNet at {folder} has no {empty} images: expected train/<wnid>/images/*.JPEG "
            f"and val/images/*.JPEG listed in val/val_annotations.txt (the layout of "
            f"{TINY_IMAGENET_URL}); re-extract the zip into {root}."
        )
    names = dict.fromkeys(wnids, "")
    words = folder / "words.txt"
    if words.is_file():
        for line in words.read_text().splitlines():
            wnid, _, text = line.partition("\t")
            if wnid in names:
                names[wnid] = text.split(",")[0].strip()
    class_names = [names[w] or w for w in wnids]

    return ImageData(
        name="tiny-imagenet",
        x_train=_images_from_uint8(_decode_images(train_paths, TINY_IMAGENET_SIZE)),
        y_train=_labels(train_labels),
        x_test=_images_from_uint8(_decode_images(test_paths, TINY_IMAGENET_SIZE)),
        y_test=_labels(test_labels),
        num_classes=len(wnids),
        class_names=class_names,
        description=(
            f"Tiny-ImageNet from {folder} ({len(train_labels)} train / {len(test_labels)} test; "
            "test = the labelled val split)"
        ),
    )
