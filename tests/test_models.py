"""Tests for las_env.models: shapes, parameter counts, name parsing, trainability."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from las_env.datasets import load_dataset
from las_env.models import MODEL_NAMES, WideResNet, build_model


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["resnet18", "preact_resnet18", "wrn-16-2", "small_cnn"])
@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (2, 1, 8, 8)])
def test_forward_shapes(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(name, in_channels=shape[1], num_classes=7).eval()
    x = torch.rand(shape)
    with torch.no_grad():
        logits = model(x)
        feats = model.features(x)
    assert logits.shape == (2, 7)
    assert feats.shape == (2, model.feature_dim)
    assert torch.isfinite(logits).all()


def test_resnet18_runs_at_64x64_and_rejects_wrong_channels() -> None:
    model = build_model("resnet18", 3, 200).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 200)
    grey = build_model("resnet18", 1, 10).eval()
    with pytest.raises(RuntimeError):
        grey(torch.rand(1, 3, 32, 32))


@pytest.mark.parametrize(
    "name, low, high",
    [
        ("resnet18", 11.1e6, 11.3e6),  # 11,173,962 for 10 classes
        ("preact_resnet18", 11.1e6, 11.3e6),
        ("wrn-34-10", 46.0e6, 46.3e6),  # 46,160,474: the WRN-34-10 of the AT literature
        ("small_cnn", 0.05e6, 0.5e6),
    ],
)
def test_parameter_counts(name: str, low: float, high: float) -> None:
    assert low <= _n_params(build_model(name, 3, 10)) <= high


def test_wrn_width_and_depth_scale_as_expected() -> None:
    # Doubling the width roughly quadruples the conv parameters; more depth adds blocks.
    w2, w4 = _n_params(WideResNet(16, 2)), _n_params(WideResNet(16, 4))
    assert 3.5 < w4 / w2 < 4.1
    assert _n_params(WideResNet(22, 2)) > w2
    assert isinstance(build_model("WideResNet-16-2", 3, 10), WideResNet)
    assert isinstance(build_model("wrn_16_2", 3, 10), WideResNet)


@pytest.mark.parametrize("depth", [4, 33, 35])
def test_wrn_bad_depth(depth: int) -> None:
    with pytest.raises(ValueError, match="6n \\+ 4"):
        build_model(f"wrn-{depth}-2", 3, 10)


def test_unknown_model_name_lists_valid_ones() -> None:
    with pytest.raises(ValueError) as err:
        build_model("vgg16", 3, 10)
    for name in MODEL_NAMES:
        assert name in str(err.value)


def test_same_seed_same_weights() -> None:
    torch.manual_seed(1)
    a = build_model("preact_resnet18", 3, 10)
    torch.manual_seed(1)
    b = build_model("preact_resnet18", 3, 10)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("name", ["resnet18", "preact_resnet18", "wrn-16-2", "small_cnn"])
def test_input_gradient_exists(name: str) -> None:
    # PGD needs d loss / d input; an eval-mode model must provide a non-zero one.
    torch.manual_seed(0)
    model = build_model(name, 3, 10).eval()
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    F.cross_entropy(model(x), torch.tensor([1, 2])).backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_small_cnn_learns_digits_quickly() -> None:
    # 8 epochs of 11 batches: about 1 s on an idle 2-core CPU (no wall-clock assertion, since
    # a loaded machine would make it flaky; the epoch count is what bounds the cost).
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("small_cnn", data.channels, data.num_classes)
    # The target trainer's defaults (SGD 0.1, momentum 0.9, wd 5e-4, batch 128).
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        model.train()
        perm = torch.randperm(len(data.y_train), generator=g)
        for i in range(0, len(perm), 128):
            idx = perm[i:i + 128]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    assert acc > 0.95, f"clean test accuracy {acc:.3f} after 8 epochs"
