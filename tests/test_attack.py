"""Per-image PGD: correctness against a plain reference, and cost = sum of iterations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from las_env.attack import masked_pgd, per_image_pgd, pgd, random_start
from las_env.models import build_model


def reference_pgd(model, x, y, eps, step, iters, start):
    """Textbook L-inf PGD for one setting, written independently of las_env.attack."""
    model.eval()
    x_adv = torch.clamp(x + start.clamp(-eps, eps), 0, 1)
    x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
    for _ in range(iters):
        x_adv = x_adv.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (g,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + step * g.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


@pytest.fixture()
def model_and_batch():
    torch.manual_seed(0)
    model = build_model("small_cnn", 1, 10).double()
    # Non-trivial BatchNorm statistics so eval mode matters.
    model.train()
    with torch.no_grad():
        model(torch.rand(128, 1, 8, 8, dtype=torch.float64))
    x = torch.rand(12, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (12,))
    eps = torch.tensor([0.05, 0.1, 0.2, 0.3] * 3, dtype=torch.float64)
    step = torch.tensor([0.01, 0.05, 0.02] * 4, dtype=torch.float64)
    iters = torch.tensor([3, 0, 7, 1, 5, 5, 2, 8, 1, 4, 6, 3])
    start = random_start(x, eps, torch.Generator().manual_seed(1))
    return model, x, y, eps, step, iters, start


def test_each_image_equals_plain_pgd_on_that_image_alone(model_and_batch):
    model, x, y, eps, step, iters, start = model_and_batch
    out = per_image_pgd(model, x, y, eps, step, iters, start=start)
    for i in range(x.shape[0]):
        ref = reference_pgd(model, x[i : i + 1], y[i : i + 1], eps[i], step[i], int(iters[i]), start[i : i + 1])
        torch.testing.assert_close(out[i : i + 1], ref, rtol=0, atol=1e-12, msg=f"image {i}")


def test_matches_the_authors_masked_loop(model_and_batch):
    model, x, y, eps, step, iters, start = model_and_batch
    ours = per_image_pgd(model, x, y, eps, step, iters, start=start)
    theirs = masked_pgd(model, x, y, eps, step, iters, start=start)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


def test_stays_in_each_ball_and_in_pixel_range(model_and_batch):
    model, x, y, eps, step, iters, _ = model_and_batch
    out = per_image_pgd(model, x, y, eps, step, iters, generator=torch.Generator().manual_seed(0))
    dist = (out - x).abs().flatten(1).amax(1)
    assert torch.all(dist <= eps + 1e-12)
    assert out.min() >= 0 and out.max() <= 1
    # The attack moved the images that had iterations (it is not a no-op).
    assert torch.all(dist[iters > 0] > 0)


def test_forward_work_is_the_sum_of_chosen_iterations(model_and_batch):
    model, x, y, eps, step, iters, start = model_and_batch
    seen: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape[0]))
    per_image_pgd(model, x, y, eps, step, iters, start=start)
    handle.remove()
    assert sum(seen) == int(iters.sum())
    assert len(seen) == int(iters.max())
    # The authors' loop pays batch x max for the same result.
    seen.clear()
    handle = model.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape[0]))
    masked_pgd(model, x, y, eps, step, iters, start=start)
    handle.remove()
    assert sum(seen) == x.shape[0] * int(iters.max())


def test_restores_mode_and_leaves_no_parameter_gradients(model_and_batch):
    model, x, y, eps, step, iters, start = model_and_batch
    model.train()
    per_image_pgd(model, x, y, eps, step, iters, start=start)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    per_image_pgd(model, x, y, eps, step, iters, start=start)
    assert not model.training


def test_attack_runs_in_eval_mode():
    modes = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            modes.append(self.training)
            return self.lin(x.flatten(1))

    m = Probe().train()
    x = torch.rand(2, 1, 2, 2)
    per_image_pgd(m, x, torch.tensor([0, 1]), torch.full((2,), 0.1), torch.full((2,), 0.02), torch.tensor([2, 1]))
    assert modes and not any(modes)


def test_zero_iterations_returns_the_projected_start(model_and_batch):
    model, x, y, eps, step, _, start = model_and_batch
    out = per_image_pgd(model, x, y, eps, step, torch.zeros(12, dtype=torch.long), start=start)
    expected = (x + start).clamp(0, 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_uniform_pgd_without_random_start_is_deterministic_and_lowers_accuracy(digits):
    torch.manual_seed(0)
    model = build_model("small_cnn", 1, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        for i in range(0, 1024, 64):
            loss = F.cross_entropy(model(digits.x_train[i : i + 64]), digits.y_train[i : i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    x, y = digits.x_test[:200], digits.y_test[:200]
    a = pgd(model, x, y, 0.2, 0.05, 10, random_start=False)
    b = pgd(model, x, y, 0.2, 0.05, 10, random_start=False)
    assert torch.equal(a, b)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean()
        robust = (model(a).argmax(1) == y).float().mean()
    assert clean > 0.8
    assert robust < clean - 0.3


def test_bad_shapes_are_rejected(model_and_batch):
    model, x, y, eps, step, iters, _ = model_and_batch
    with pytest.raises(ValueError, match="epsilon"):
        per_image_pgd(model, x, y, eps[:3], step, iters)
    with pytest.raises(ValueError, match="start"):
        per_image_pgd(model, x, y, eps, step, iters, start=torch.zeros(1))
