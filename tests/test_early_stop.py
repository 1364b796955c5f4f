"""Early-stopping PGD (``las_env.attack``, ``early_stop=tau``): the authors' probe and evaluation
attacks (tau = 0) and FAT's (tau > 0, also one per image: the ``early_stop_tau`` strategy column),
against trajectories computed by hand, and its cost (``GradientCount``).

The hand model: one pixel ``x``, two classes, logits ``(0, 10 * (x - 0.5))``, label 0. The CE
gradient in ``x`` is always positive, so every step adds the step size: from ``x0`` the path is
``x0 + t * s``, misclassified once ``x > 0.5``. With tau the image takes tau more steps after the
first check that finds it misclassified, never more than its count, never outside its ball.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from evaluation import evaluate_attack
from las_env.attack import GradientCount, per_image_pgd, pgd
from las_env.models import build_model
from las_env.reward import RewardConfig, probe_updated_target


class Threshold(nn.Module):
    """Logits ``(0, 10 * (x - 0.5))`` of a one-pixel image; counts the rows it is run on."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = 0

    def forward(self, x):
        self.rows += x.shape[0]
        z = 10 * (x.flatten(1)[:, :1] - 0.5)
        return torch.cat([torch.zeros_like(z), z], dim=1)


def by_hand(x0: float, step: float, eps: float, count: int, tau: int | None) -> tuple[float, int]:
    """The final pixel and the forward rows of one image, step by step as the authors/FAT describe it."""
    x, patience, rows = x0, tau, 0
    for _ in range(count):
        rows += 1  # the check before the step is the step's own forward
        if tau is not None and x > 0.5:
            if patience == 0:
                return x, rows
            patience -= 1
        x = min(x + step, x0 + eps, 1.0)
    return x, rows


X0 = [0.31, 0.12, 0.46, 0.6, 0.05]  # 0.6 starts misclassified; 0.05 never gets there within its ball
COUNTS = [10, 10, 1, 4, 7]
STEP, EPS = 0.05, 0.42


@pytest.mark.parametrize("tau", [None, 0, 1, 2, 5])
def test_early_stop_follows_the_hand_computed_trajectory_and_pays_only_the_steps_it_runs(tau):
    model = Threshold()
    x = torch.tensor(X0).view(-1, 1, 1, 1)
    y = torch.zeros(len(X0), dtype=torch.long)
    n = len(X0)
    out = per_image_pgd(model, x, y, torch.full((n,), EPS), torch.full((n,), STEP), torch.tensor(COUNTS),
                        start=torch.zeros_like(x), early_stop=tau)
    expected = [by_hand(x0, STEP, EPS, c, tau) for x0, c in zip(X0, COUNTS)]
    torch.testing.assert_close(out.flatten(), torch.tensor([e[0] for e in expected]))
    if tau is not None:  # the sorted full-count path is costed in tests/test_attack.py
        assert model.rows == sum(e[1] for e in expected)


def test_a_per_image_tau_follows_each_images_own_hand_computed_trajectory_and_counts_its_gradients():
    taus = [0, 3, 1, 2, 5]
    model, count = Threshold(), GradientCount()
    x = torch.tensor(X0).view(-1, 1, 1, 1)
    n = len(X0)
    out = per_image_pgd(model, x, torch.zeros(n, dtype=torch.long), torch.full((n,), EPS), torch.full((n,), STEP),
                        torch.tensor(COUNTS), start=torch.zeros_like(x), early_stop=torch.tensor(taus), count=count)
    expected = [by_hand(x0, STEP, EPS, c, tau) for x0, c, tau in zip(X0, COUNTS, taus)]
    torch.testing.assert_close(out.flatten(), torch.tensor([e[0] for e in expected]))
    assert count.gradients == model.rows == sum(e[1] for e in expected)
    assert count.gradients < sum(COUNTS)  # the early stop saves gradient computations


def test_the_count_of_the_full_attack_is_the_sum_of_the_chosen_iterations():
    model, count = Threshold(), GradientCount()
    x = torch.tensor(X0).view(-1, 1, 1, 1)
    n = len(X0)
    per_image_pgd(model, x, torch.zeros(n, dtype=torch.long), torch.full((n,), EPS), torch.full((n,), STEP),
                  torch.tensor(COUNTS), start=torch.zeros_like(x), count=count)
    pgd(model, x, torch.zeros(n, dtype=torch.long), EPS, STEP, 3, count=count)
    assert count.gradients == model.rows == sum(COUNTS) + 3 * n


def test_tau_zero_stops_at_the_first_misclassified_check_and_a_larger_tau_goes_on():
    finals = {tau: by_hand(0.31, STEP, EPS, 10, tau)[0] for tau in (0, 1, 2)}
    # 0.31 + 4 * 0.05 = 0.51 is the first point past 0.5: tau = 0 stops there, each tau one step later.
    assert finals == pytest.approx({0: 0.51, 1: 0.56, 2: 0.61})
    assert by_hand(0.31, STEP, EPS, 10, None)[0] == pytest.approx(0.73)  # the ball's edge, 0.31 + 0.42


def test_early_stop_needs_labels_and_a_whole_tau():
    model, x = Threshold(), torch.rand(2, 1, 1, 1)
    ones = torch.ones(2)
    with pytest.raises(ValueError, match="labels"):
        per_image_pgd(model, x, torch.rand(2, 2).softmax(1), ones * 0.1, ones * 0.1, ones.long(), loss="kl", early_stop=0)
    with pytest.raises(ValueError, match="tau >= 0"):
        per_image_pgd(model, x, torch.zeros(2, dtype=torch.long), ones * 0.1, ones * 0.1, ones.long(), early_stop=-1)


@pytest.fixture()
def net_and_images(digits):
    torch.manual_seed(0)
    model = build_model("small_cnn", 1, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(40):  # plain training: a model that gets most digits right, so attacks have work to do
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(digits.x_train[:256]), digits.y_train[:256])
        loss.backward()
        opt.step()
    assert math.isfinite(loss.item())
    return model.eval(), digits.x_test[:200], digits.y_test[:200]


def test_evaluation_early_stop_counts_an_image_robust_only_if_every_iterate_of_the_full_path_is(net_and_images):
    model, x, y = net_and_images
    eps, step, k = 0.1, 0.1, 10  # a step as large as the ball: paths overshoot, a few images recover
    start = (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) - 1) * eps
    n = x.shape[0]
    full = lambda t: per_image_pgd(model, x, y, torch.full((n,), eps), torch.full((n,), step),  # noqa: E731
                                   torch.full((n,), t), start=start)
    with torch.no_grad():
        every_iterate = torch.stack([model(full(t)).argmax(1) == y for t in range(k + 1)]).all(0)
        stopped = model(per_image_pgd(model, x, y, torch.full((n,), eps), torch.full((n,), step),
                                      torch.full((n,), k), start=start, early_stop=0)).argmax(1) == y
        at_the_end = model(full(k)).argmax(1) == y
    assert torch.equal(stopped, every_iterate)
    assert (stopped <= at_the_end).all()  # never more robust than the full attack
    assert 0 < stopped.sum() < at_the_end.sum()  # and here strictly less: an image recovers later

    # The evaluator with early_stop reports the same rule (its own random starts, same seed both ways).
    on = evaluate_attack(model, x, y, "pgd10", 0.2, seed=3, progress=False, early_stop=True)
    off = evaluate_attack(model, x, y, "pgd10", 0.2, seed=3, progress=False)
    assert (on.robust <= off.robust).all() and on.details["early_stop"] and "early stop" in on.label


def test_a_per_image_tau_tensor_of_one_value_is_the_scalar_tau_exactly(net_and_images):
    model, x, y = net_and_images
    n = x.shape[0]
    start = (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) - 1) * 0.2
    iterations = torch.randint(1, 9, (n,), generator=torch.Generator().manual_seed(3))
    settings = (model, x, y, torch.full((n,), 0.2), torch.full((n,), 0.05), iterations)
    for tau in (0, 2):
        counts = GradientCount(), GradientCount()
        scalar = per_image_pgd(*settings, start=start, early_stop=tau, count=counts[0])
        tensor = per_image_pgd(*settings, start=start, early_stop=torch.full((n,), tau), count=counts[1])
        assert torch.equal(scalar, tensor) and counts[0] == counts[1]


def test_the_probe_early_stop_is_never_more_robust_than_the_full_probe(net_and_images):
    model, x, y = net_and_images
    probe = {}
    for stop in (False, True):
        cfg = RewardConfig(probe_early_stop=stop, probe_restarts=1)
        probe[stop] = probe_updated_target(model, x, y, cfg, 0.2, 0.05, generator=torch.Generator().manual_seed(5))
    assert (probe[True].probe_correct <= probe[False].probe_correct).all()
    assert torch.equal(probe[True].clean_correct, probe[False].clean_correct)
    # The same starts: pgd(early_stop=0) with the same generator is what the probe ran.
    again = pgd(model, x, y, 0.2, 0.05, 10, generator=torch.Generator().manual_seed(5), early_stop=0)
    with torch.no_grad():
        assert torch.equal(model(again).argmax(1) == y, probe[True].probe_correct)
