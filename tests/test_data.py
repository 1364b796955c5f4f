"""Tests for the built-in loaders (las_env.datasets.loaders), ImageData validation, and augment_batch."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from las_env.augment import augment_batch
from las_env.data import DatasetNotFoundError, ImageData
from las_env.datasets import load_dataset
from las_env.datasets import dataset_names
from las_env.datasets import loaders as data_mod

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PREPARE = SHARED_DATA / "prepare_cifar.py"
needs_shared = pytest.mark.skipif(
    not PREPARE.is_file(),
    reason=f"offline CIFAR copies not found at {SHARED_DATA} (only present on the development machines)",
)


# ----------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits() -> ImageData:
    return load_dataset("digits")


def test_digits_shapes_dtypes_ranges(digits: ImageData) -> None:
    assert digits.x_train.shape == (1347, 1, 8, 8)
    assert digits.x_test.shape == (450, 1, 8, 8)
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    assert digits.y_test.shape == (450,) and digits.y_test.dtype == torch.int64
    assert digits.channels == 1 and digits.image_size == 8
    assert digits.num_classes == 10 and digits.class_names == [str(i) for i in range(10)]
    both = torch.cat([digits.x_train, digits.x_test])
    assert float(both.min()) == 0.0 and float(both.max()) == 1.0
    # Pixel values are counts 0..16 divided by 16.
    assert torch.equal(both * 16, torch.round(both * 16))
    assert "1347 train / 450 test" in digits.description


def test_digits_split_is_stratified_and_complete(digits: ImageData) -> None:
    from sklearn.datasets import load_digits

    full = load_digits()
    total = np.bincount(full.target, minlength=10)
    test = np.bincount(digits.y_test.numpy(), minlength=10)
    train = np.bincount(digits.y_train.numpy(), minlength=10)
    np.testing.assert_array_equal(train + test, total)
    assert np.all(np.abs(test - 0.25 * total) <= 1.0)
    # The split is a partition of the original images (compare per-image pixel sums).
    sums = np.sort(np.concatenate([digits.x_train.sum((1, 2, 3)).numpy(), digits.x_test.sum((1, 2, 3)).numpy()]))
    np.testing.assert_allclose(sums, np.sort(full.images.sum((1, 2)) / 16.0), rtol=0, atol=1e-4)


def test_digits_stored_split_is_scikit_learns_split(digits: ImageData) -> None:
    """The loader reads sklearn's CSV and ``digits_split.txt`` without importing sklearn: it must be the
    same images, in the same order, as sklearn's own loader and ``train_test_split``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    full = load_digits()
    images = (full.images / 16.0).astype(np.float32)[:, None]
    x_tr, x_te, y_tr, y_te = train_test_split(images, full.target, test_size=0.25, random_state=0,
                                              stratify=full.target)
    for ours, theirs in ((digits.x_train, x_tr), (digits.x_test, x_te), (digits.y_train, y_tr), (digits.y_test, y_te)):
        assert torch.equal(ours, torch.from_numpy(theirs).to(ours.dtype))


def test_digits_is_deterministic(digits: ImageData) -> None:
    again = load_dataset("digits")
    assert torch.equal(again.x_train, digits.x_train) and torch.equal(again.y_test, digits.y_test)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError) as err:
        load_dataset("mnist")
    for name in dataset_names():
        assert name in str(err.value)


# ----------------------------------------------------------------------------- ImageData


def test_image_data_to_returns_new_object(digits: ImageData) -> None:
    moved = digits.to("cpu")
    assert moved is not digits
    assert torch.equal(moved.x_train, digits.x_train)
    assert moved.description == digits.description and moved.num_classes == 10


@pytest.mark.parametrize(
    "change, message",
    [
        ({"x_train": torch.zeros(4, 1, 8, 8, dtype=torch.float64)}, "float32"),
        ({"y_train": torch.zeros(4, dtype=torch.int32)}, "int64"),
        ({"y_train": torch.zeros(3, dtype=torch.int64)}, "3 labels"),
        ({"x_train": torch.full((4, 1, 8, 8), 2.0)}, "[0, 1]"),
        ({"y_test": torch.tensor([0, 10])}, "outside"),
        ({"x_test": torch.zeros(2, 3, 8, 8)}, "test images"),
        ({"class_names": ["a"]}, "class names"),
    ],
)
def test_image_data_validates(change: dict, message: str) -> None:
    fields = dict(
        name="toy",
        x_train=torch.zeros(4, 1, 8, 8),
        y_train=torch.zeros(4, dtype=torch.int64),
        x_test=torch.zeros(2, 1, 8, 8),
        y_test=torch.zeros(2, dtype=torch.int64),
        num_classes=10,
        class_names=[str(i) for i in range(10)],
        description="toy",
    )
    ImageData(**fields)  # the unchanged fields are valid
    fields.update(change)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ImageData(**fields)


# ----------------------------------------------------------------------------- CIFAR


@pytest.fixture(scope="module")
def exact_cifar10_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not PREPARE.is_file():
        pytest.skip(f"offline CIFAR copies not found at {SHARED_DATA}")
    root = tmp_path_factory.mktemp("cifar10")
    subprocess.run([sys.executable, str(PREPARE), str(root), "--exact-subset"], check=True, capture_output=True)
    return root


@needs_shared
def test_cifar10_exact_subset_matches_source_pixels(exact_cifar10_root: Path) -> None:
    ds = load_dataset("cifar10", root=exact_cifar10_root, download=False)
    src = np.load(SHARED_DATA / "cifar10-exact-subset.npz")
    assert ds.x_train.shape == (5170, 3, 32, 32) and ds.x_test.shape == (1017, 3, 32, 32)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    expected = torch.from_numpy(src["x_train"]).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(ds.x_train, expected)
    np.testing.assert_array_equal(ds.y_test.numpy(), src["y_test"].astype(np.int64))
    assert ds.num_classes == 10 and ds.class_names[0] == "airplane" and ds.class_names[9] == "truck"
    assert str(exact_cifar10_root / "cifar-10-batches-py") in ds.description
    assert "5170 train / 1017 test" in ds.description and "exact-pixel subset" in ds.description


@needs_shared
def test_cifar100_fine_labels(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(PREPARE), str(tmp_path), "--cifar100"], check=True, capture_output=True)
    ds = load_dataset("cifar100", root=tmp_path, download=False)
    src = np.load(SHARED_DATA / "cifar100-exact-subset.npz")
    assert ds.num_classes == 100 and len(ds.class_names) == 100 and ds.class_names[0] == "apple"
    np.testing.assert_array_equal(ds.y_train.numpy(), src["y_train"].astype(np.int64))
    assert ds.x_test.shape == (916, 3, 32, 32)
    assert torch.equal(ds.x_test[5], torch.from_numpy(src["x_test"][5]).permute(2, 0, 1).float() / 255)


def test_cifar10_reads_official_style_pickles(tmp_path: Path) -> None:
    # The official release is a Python 2 pickle: str keys once decoded, str file names.
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 3, 32, 32), dtype=np.uint8)
    labels = list(range(10)) + [3, 4]
    for i, idx in enumerate(np.array_split(np.arange(10), 5), start=1):
        batch = {"data": images[idx].reshape(len(idx), -1), "labels": [labels[j] for j in idx],
                 "filenames": [f"cat_s_{j:06d}.png" for j in idx]}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    test = {"data": images[10:].reshape(2, -1), "labels": labels[10:], "filenames": ["a.png", "b.png"]}
    (folder / "test_batch").write_bytes(pickle.dumps(test, protocol=2))
    meta = {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))

    ds = load_dataset("cifar10", root=tmp_path, download=False)
    assert torch.equal(ds.x_train, torch.from_numpy(images[:10]).float() / 255)
    assert ds.y_test.tolist() == [3, 4] and ds.class_names[2] == "class2"
    assert "prepare_cifar" not in ds.description  # official-style names: no provenance claim


def test_cifar_missing_folder_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data_mod, "_import_torchvision", lambda: None)
    for name, folder in (("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")):
        with pytest.raises(DatasetNotFoundError) as err:
            load_dataset(name, root=tmp_path, download=True)
        msg = str(err.value)
        assert isinstance(err.value, FileNotFoundError)
        assert str(tmp_path / folder) in msg
        assert "https://www.cs.toronto.edu/~kriz/cifar.html" in msg
        assert "prepare_cifar.py" in msg and "torchvision" in msg


def test_cifar_partial_folder_names_missing_files(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"")
    with pytest.raises(DatasetNotFoundError, match="lacks: data_batch_2"):
        load_dataset("cifar10", root=tmp_path, download=False)


# ----------------------------------------------------------------------------- SVHN, GTSRB


def test_svhn_reads_mat_files(tmp_path: Path) -> None:
    from scipy.io import savemat

    folder = tmp_path / "svhn"
    folder.mkdir()
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(32, 32, 3, 5), dtype=np.uint8)  # the release's (H, W, C, N)
    savemat(folder / "train_32x32.mat", {"X": x, "y": np.array([[10], [1], [2], [3], [9]], dtype=np.uint8)})
    savemat(folder / "test_32x32.mat", {"X": x[..., :2], "y": np.array([[10], [5]], dtype=np.uint8)})
    ds = load_dataset("svhn", root=tmp_path, download=False)
    assert ds.x_train.shape == (5, 3, 32, 32) and ds.y_train.tolist() == [0, 1, 2, 3, 9]
    assert float(ds.x_train[4, 2, 7, 11]) == pytest.approx(x[7, 11, 2, 4] / 255)


def test_svhn_and_gtsrb_missing_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data_mod, "_import_torchvision", lambda: None)
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("svhn", root=tmp_path)
    assert str(tmp_path / "svhn") in str(err.value) and "train_32x32.mat" in str(err.value)
    with pytest.raises(DatasetNotFoundError, match="torchvision"):
        load_dataset("gtsrb", root=tmp_path)


# ----------------------------------------------------------------------------- Tiny-ImageNet


def test_tiny_imagenet_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "tiny-imagenet-200"
    colours = {"n02": (250, 0, 0), "n01": (0, 0, 250)}  # n01 sorts first: label 0
    for wnid, colour in colours.items():
        (folder / "train" / wnid / "images").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (64, 64), colour).save(folder / "train" / wnid / "images" / f"{wnid}_{i}.JPEG")
    (folder / "val" / "images").mkdir(parents=True)
    Image.new("RGB", (64, 64), colours["n02"]).save(folder / "val" / "images" / "val_0.JPEG")
    Image.new("L", (64, 64), 128).save(folder / "val" / "images" / "val_1.JPEG")  # greyscale happens
    (folder / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn02\t0\t0\t63\t63\nval_1.JPEG\tn01\t1\t1\t9\t9\n")
    (folder / "words.txt").write_text("n01\tblue thing, azure\nn02\tred thing\nn99\tunused\n")

    ds = load_dataset("tiny-imagenet", root=tmp_path)
    assert ds.x_train.shape == (4, 3, 64, 64) and ds.image_size == 64
    assert ds.y_train.tolist() == [0, 0, 1, 1] and ds.y_test.tolist() == [1, 0]
    assert ds.class_names == ["blue thing", "red thing"]
    assert float(ds.x_train[0, 2].mean()) > 0.9 and float(ds.x_train[0, 0].mean()) < 0.1
    assert float(ds.x_test[0, 0].mean()) > 0.9
    assert torch.allclose(ds.x_test[1], torch.full((3, 64, 64), 128 / 255), atol=2 / 255)


def test_tiny_imagenet_missing_message(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("tiny-imagenet", root=tmp_path)
    assert str(tmp_path / "tiny-imagenet-200") in str(err.value)
    assert "val_annotations.txt" in str(err.value)


# ----------------------------------------------------------------------------- augmentation


def _reference_augment(x: torch.Tensor, seed: int, padding: int, flip: bool) -> torch.Tensor:
    """Slow per-image version drawing the same numbers in the documented order."""
    g = torch.Generator().manual_seed(seed)
    n, _, h, w = x.shape
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=g)
    flips = torch.rand(n, generator=g) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    out = torch.empty_like(x)
    for i in range(n):
        canvas = torch.zeros(x.shape[1], h + 2 * padding, w + 2 * padding)
        canvas[:, padding:padding + h, padding:padding + w] = x[i]
        crop = canvas[:, int(dy[i]):int(dy[i]) + h, int(dx[i]):int(dx[i]) + w]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out


def _as_shift_and_flip(img: torch.Tensor, src: torch.Tensor, padding: int) -> tuple[int, int, bool] | None:
    """Find the (dy, dx, flip) that turns ``src`` into ``img``, if any."""
    h, w = src.shape[-2:]
    canvas = torch.nn.functional.pad(src, (padding,) * 4)
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = canvas[:, dy:dy + h, dx:dx + w]
            for flipped in (False, True):
                if torch.equal(img, crop.flip(-1) if flipped else crop):
                    return dy, dx, flipped
    return None


@pytest.fixture
def images() -> torch.Tensor:
    # Strictly positive random pixels: a zero row/column can only come from the padding.
    return torch.rand(32, 3, 10, 10, generator=torch.Generator().manual_seed(5)) * 0.9 + 0.1


def test_augment_shape_and_input_untouched(images: torch.Tensor) -> None:
    before = images.clone()
    out = augment_batch(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == images.dtype
    assert torch.equal(images, before)
    assert out.data_ptr() != images.data_ptr()


def test_augment_deterministic_given_generator(images: torch.Tensor) -> None:
    a = augment_batch(images, torch.Generator().manual_seed(7))
    b = augment_batch(images, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(7)
    first, second = augment_batch(images, g), augment_batch(images, g)
    assert torch.equal(first, a) and not torch.equal(first, second)
    assert not torch.equal(a, augment_batch(images, torch.Generator().manual_seed(8)))


def test_augment_matches_slow_reference(images: torch.Tensor) -> None:
    for padding, flip in ((4, True), (2, False), (3, True)):
        got = augment_batch(images, torch.Generator().manual_seed(11), padding=padding, flip=flip)
        assert torch.equal(got, _reference_augment(images, 11, padding, flip))


def test_augment_outputs_are_real_shifts_and_flips(images: torch.Tensor) -> None:
    out = augment_batch(images, torch.Generator().manual_seed(3), padding=2)
    found = [_as_shift_and_flip(out[i], images[i], 2) for i in range(len(images))]
    assert all(f is not None for f in found)
    offsets = {(f[0], f[1]) for f in found if f}
    assert len(offsets) > 5  # crops actually move the images
    assert {f[2] for f in found if f} == {False, True}  # both flipped and unflipped occur


def test_augment_flip_only_and_identity(images: torch.Tensor) -> None:
    out = augment_batch(images, torch.Generator().manual_seed(0), padding=0, flip=True)
    same = (out == images).flatten(1).all(1)
    mirrored = (out == images.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and bool(mirrored.any()) and bool(same.any())
    plain = augment_batch(images, torch.Generator().manual_seed(0), padding=0, flip=False)
    assert torch.equal(plain, images) and plain.data_ptr() != images.data_ptr()
    with pytest.raises(ValueError):
        augment_batch(images[0], torch.Generator())
