"""Sanity checks of the evaluation itself against gradient masking (SPEC section 5)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from evaluation.records import AttackResult, Check
from evaluation.robust import evaluate_attack

HUGE_EPSILON = 1.0
"""Radius of the "huge eps" sanity check: 1.0 is the whole ``[0, 1]`` image box."""


def _binomial_tail(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2): how surprising k of n discordant images are."""
    if n == 0:
        return 1.0
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n


@dataclass(frozen=True)
class _Comparison:
    """Two attacks on their common first ``m`` images.

    ``strong_only``: images robust under the expected-stronger attack but broken by the other
    (what it missed); ``weak_only`` the reverse. ``p_value``: probability of at least
    ``strong_only`` misses among the discordant images if both attacks were equally strong
    (exact sign test, McNemar's test for paired flags).
    """

    strong: int
    weak: int
    m: int
    strong_only: int
    weak_only: int

    @property
    def p_value(self) -> float:
        return _binomial_tail(self.strong_only, self.strong_only + self.weak_only)


def _compare(strong: AttackResult, weak: AttackResult) -> _Comparison:
    assert strong.robust is not None and weak.robust is not None
    m = min(strong.n_images, weak.n_images)
    s, w = strong.robust[:m], weak.robust[:m]
    return _Comparison(int(s.sum()), int(w.sum()), m, int((s & ~w).sum()), int((w & ~s).sum()))


def _rise_is_real(c: _Comparison, tolerance: float, alpha: float) -> bool:
    # A rise counts only if it is both larger than the noise allowance (max(1 image,
    # tolerance * m)) and statistically significant: PGD returns its last iterate from a
    # random start, so on coarse data a longer run can end on a slightly better point for
    # the model without anything being wrong.
    allowance = max(1, math.ceil(tolerance * c.m))
    return c.strong - c.weak > allowance and c.p_value < alpha


def _describe(c: _Comparison, strong: str, weak: str) -> str:
    return (f"{strong} {c.strong}/{c.m} vs {weak} {c.weak}/{c.m} on the same {c.m} images "
            f"(robust only under {strong}: {c.strong_only}, only under {weak}: {c.weak_only}, "
            f"sign-test p={c.p_value:.2g})")


def sanity_checks(
    results: Sequence[AttackResult],
    model: nn.Module | None,
    x: Tensor | None,
    y: Tensor | None,
    eps: float,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    subset: int = 200,
    huge_eps: float = HUGE_EPSILON,
    huge_eps_max_accuracy: float = 0.02,
    tolerance: float = 0.01,
    alpha: float = 0.01,
    max_gap: float = 0.15,
    seed: int = 0,
) -> list[Check]:
    """Checks that the evaluation is not fooled by gradient masking (SPEC section 5).

    1. ``pgd_monotone``: robust accuracy does not rise with more PGD steps (every evaluated
       pair ``pgd<k1>``, ``pgd<k2>``, ``k1 < k2``, compared image by image).
    2. ``autoattack_strongest``: AutoAttack <= the best other attack on the same images.
    3. ``eps_zero_is_clean``: PGD-10 at eps = 0 gives exactly the clean accuracy (on the
       first ``subset`` images of ``x``); a difference means the model is randomised or the
       attack leaves the ball.
    4. ``huge_eps_breaks_all``: PGD-20 at ``huge_eps`` (default 1.0, the whole image box)
       leaves at most ``huge_eps_max_accuracy``; more means the gradients carry no signal
       (or the model ignores its input).
    5. ``pgd_autoattack_gap``: the strongest PGD/C&W row is at most ``max_gap`` above
       AutoAttack (and by at least 3 images); a larger gap is the classic sign of masked
       gradients: the gradient-free Square attack succeeds where PGD cannot.

    For 1 and 2 ("does not rise", "<="), a violation must exceed ``max(1 image,
    tolerance * n)`` AND be significant at ``alpha`` under an exact sign test on the images
    where the two attacks disagree. Checks 3 and 4 run a cheap PGD (pass ``model=None`` to
    skip them); 1, 2 and 5 are skipped when the rows they compare were not evaluated.
    ``eps`` is the evaluation radius (reported; the probes use 0 and ``huge_eps``).
    """
    checks: list[Check] = []
    flagged = [r for r in results if r.robust is not None]
    by_name = {r.name: r for r in flagged}

    # 1. more PGD steps never help the model
    pgds = sorted((r for r in flagged if re.fullmatch(r"pgd\d+", r.name)), key=lambda r: int(r.name[3:]))
    title = "Robust accuracy does not rise with more PGD steps"
    if len(pgds) < 2:
        checks.append(Check("pgd_monotone", title, None, "needs two PGD-k rows (e.g. pgd10 and pgd50)"))
    else:
        bad, parts = [], []
        for i, weak in enumerate(pgds):
            for strong in pgds[i + 1:]:
                c = _compare(strong, weak)
                parts.append(f"{weak.name} {c.weak}/{c.m} -> {strong.name} {c.strong}/{c.m}")
                if _rise_is_real(c, tolerance, alpha):
                    bad.append(_describe(c, strong.name, weak.name))
        checks.append(Check("pgd_monotone", title, not bad, "; ".join(bad) if bad else "; ".join(parts)))

    # 2. AutoAttack is the strongest attack
    aa = by_name.get("autoattack")
    others = [r for r in flagged if r.name not in ("autoattack", "clean")]

    def strongest(rows: Sequence[AttackResult]) -> tuple[AttackResult, _Comparison]:
        assert aa is not None
        best = min(rows, key=lambda r: _compare(aa, r).weak / _compare(aa, r).m)
        return best, _compare(aa, best)

    title = "AutoAttack <= the best other attack"
    if aa is None or not others:
        checks.append(Check("autoattack_strongest", title, None, "needs autoattack and another attack"))
    else:
        best, c = strongest(others)
        checks.append(Check("autoattack_strongest", title, not _rise_is_real(c, tolerance, alpha),
                            _describe(c, "autoattack", best.name)))

    # 5. (listed last) PGD not far above AutoAttack
    title = f"PGD/C&W at most {max_gap:.0%} above AutoAttack (gradient masking)"
    grads = [r for r in others if r.details.get("kind") == "pgd"]
    if aa is None or not grads:
        gap_check = Check("pgd_autoattack_gap", title, None, "needs autoattack and a PGD/C&W row")
    else:
        best, c = strongest(grads)
        gap = (c.weak - c.strong) / c.m
        ok = gap <= max_gap or c.weak - c.strong < 3  # 3 images: below that a gap is anecdotal
        gap_check = Check("pgd_autoattack_gap", title, ok,
                          f"{best.name} {c.weak}/{c.m} vs autoattack {c.strong}/{c.m}: gap {gap:.1%}"
                          + ("" if ok else "; PGD is far weaker than AutoAttack: suspect masked gradients"))

    # 3. and 4. cheap probes at eps = 0 and a huge eps
    zero_title, huge_title = "eps = 0 gives clean accuracy", f"eps = {huge_eps:g} (huge) gives ~0 accuracy"
    if model is None or x is None or y is None:
        checks.append(Check("eps_zero_is_clean", zero_title, None, "no model given"))
        checks.append(Check("huge_eps_breaks_all", huge_title, None, "no model given"))
    else:
        m = min(subset, x.shape[0])
        xs, ys = x[:m], y[:m]
        kw: dict[str, Any] = dict(batch_size=batch_size, device=device, seed=seed, progress=False)
        clean = evaluate_attack(model, xs, ys, "clean", 0.0, **kw)
        zero = evaluate_attack(model, xs, ys, "pgd10", 0.0, step=0.0, **kw)
        # No tolerance: at eps = 0 the attack cannot move, so any difference is a real fault.
        checks.append(Check("eps_zero_is_clean", zero_title, zero.correct == clean.correct,
                            f"PGD-10 at eps=0: {zero.correct}/{m}, clean: {clean.correct}/{m} (first {m} images)"))
        huge = evaluate_attack(model, xs, ys, "pgd20", huge_eps, step=huge_eps / 8, **kw)
        checks.append(Check(
            "huge_eps_breaks_all", huge_title, huge.accuracy <= huge_eps_max_accuracy,
            f"PGD-20 (step {huge_eps / 8:g}) at eps={huge_eps:g}: {huge.correct}/{m} = {huge.accuracy:.1%} "
            f"(limit {huge_eps_max_accuracy:.0%}, first {m} images)"))
    checks.append(gap_check)
    return checks


