"""Attack names and what they mean: the registry every evaluation row is labelled from.

- ``clean``: no attack.
- ``fgsm``: one signed-gradient step of size ``eps`` from the clean image (no random start).
- ``pgd<k>`` (``pgd10``, ``pgd20``, ``pgd50``, any ``k``): PGD on the cross-entropy, ``k``
  steps of size ``eps / 4`` (2/255 at 8/255), uniform random start inside the ball.
- ``cw`` (``cw<k>``): C&W-inf, i.e. PGD on the margin loss ``max_{j != y} z_j - z_y``;
  ``cw`` is 20 steps, the same schedule as PGD-20, so the two differ only in the loss.
- ``autoattack``: AutoAttack "standard" (APGD-CE, APGD-T, FAB-T, Square), official package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from las_env.attack import Loss

AttackKind = Literal["clean", "fgsm", "pgd", "autoattack"]


@dataclass(frozen=True)
class AttackSpec:
    """What an attack name means.

    Attributes:
        name: The key users type (``"pgd10"``, ``"cw"``...).
        kind: ``"clean"``, ``"fgsm"``, ``"pgd"`` (any loss) or ``"autoattack"``.
        iterations: PGD steps (``pgd`` only; FGSM is one step of size eps).
        loss: The loss the attack ascends: ``"ce"`` or ``"margin"`` (C&W).
    """

    name: str
    kind: AttackKind
    iterations: int = 0
    loss: Loss = "ce"

    def label(self, eps: float, step: float | None = None, restarts: int = 1) -> str:
        """Human description naming every setting, e.g. ``PGD-10 (CE, step 2/255, random start)``."""
        if self.kind == "clean":
            return "Clean (no attack)"
        if self.kind == "fgsm":
            return f"FGSM (1 step of size eps={format_eps(eps)}, no random start)"
        if self.kind == "autoattack":
            return "AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square; official pyautoattack)"
        step = default_step(eps) if step is None else step
        head = f"PGD-{self.iterations}" if self.loss == "ce" else f"C&W-inf (PGD-{self.iterations} on margin loss"
        inner = f"step {format_eps(step)}, random start"
        if restarts > 1:
            inner += f", {restarts} restarts, per-image worst case"
        return f"{head} (CE, {inner})" if self.loss == "ce" else f"{head}, {inner})"


ATTACKS: dict[str, AttackSpec] = {
    "clean": AttackSpec("clean", "clean"),
    "fgsm": AttackSpec("fgsm", "fgsm", iterations=1),
    "pgd10": AttackSpec("pgd10", "pgd", iterations=10),
    "pgd20": AttackSpec("pgd20", "pgd", iterations=20),
    "pgd50": AttackSpec("pgd50", "pgd", iterations=50),
    # 20 steps: the same schedule as PGD-20, so cw vs pgd20 isolates the effect of the loss.
    "cw": AttackSpec("cw", "pgd", iterations=20, loss="margin"),
    "autoattack": AttackSpec("autoattack", "autoattack"),
}
"""The named attacks. ``pgd<k>`` and ``cw<k>`` for other step counts are accepted too."""

DEFAULT_ATTACKS: tuple[str, ...] = tuple(ATTACKS)

_PATTERN = re.compile(r"^(pgd|cw)(\d+)$")


def attack_spec(name: str) -> AttackSpec:
    """The :class:`AttackSpec` of ``name``; ``pgd<k>``/``cw<k>`` for any ``k >= 1``.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    key = str(name).strip().lower()
    if key in ATTACKS:
        return ATTACKS[key]
    match = _PATTERN.match(key)
    if match and int(match.group(2)) >= 1:
        family, k = match.group(1), int(match.group(2))
        return AttackSpec(key, "pgd", iterations=k, loss="ce" if family == "pgd" else "margin")
    raise ValueError(
        f"Unknown attack {name!r}. Valid attacks: {', '.join(ATTACKS)}, or pgd<k> / cw<k> for "
        f"k PGD steps on the cross-entropy / margin loss (e.g. pgd100, cw50)."
    )


def attack_order(name: str) -> tuple[int, int, str]:
    """Sort key, weakest to strongest as a reader expects: clean, FGSM, PGD by steps, C&W by steps, then a name
    this project does not know (another tool's results), AutoAttack."""
    try:
        spec = attack_spec(name)
    except ValueError:
        return 4, 0, str(name)
    rank = {"clean": 0, "fgsm": 1, "pgd": 2 if spec.loss == "ce" else 3, "autoattack": 5}[spec.kind]
    return rank, spec.iterations, spec.name


def default_step(eps: float) -> float:
    """PGD step size of the evaluation: ``eps / 4`` (2/255 for 8/255, 0.05 for digits' 0.2)."""
    return eps / 4


def format_eps(eps: float) -> str:
    """``8/255`` for small multiples of 1/255 (the CIFAR convention), else ``0.2``-style."""
    k = eps * 255
    if eps > 0 and abs(k - round(k)) < 1e-6 and round(k) <= 32:
        return f"{round(k)}/255"
    return f"{eps:.4g}"


