"""Result records of an evaluation: one attack's accuracy, one sanity check, per-image flags.

Per-image robust flags travel in JSON files as hex strings (:func:`pack_flags`), 8 images a byte.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from evaluation.attacks import format_eps


@dataclass
class AttackResult:
    """Accuracy of one model under one attack.

    Attributes:
        name: Registry name of the attack (``"pgd10"``).
        label: Human description with every setting (steps, step size, restarts...).
        accuracy: ``correct / n_images``, in ``[0, 1]``.
        correct: Images classified correctly on the clean input and under the attack.
        n_images: The number of images attacked: the first ``n_images`` of the set given.
        epsilon: L-inf radius in pixel units (0 for ``clean``).
        seconds: Wall-clock time of the attack (for a resumed AutoAttack: the compute time
            summed over every run that contributed).
        details: Attack settings and diagnostics (step size, iterations, restarts, seed,
            AutoAttack's per-component breakdown and warnings...), JSON-serialisable.
        robust: Per-image flags ``(n_images,)`` bool on the CPU, ``True`` = still correct.
    """

    name: str
    label: str
    accuracy: float
    correct: int
    n_images: int
    epsilon: float
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)
    robust: Tensor | None = field(default=None, repr=False)

    def summary(self, data: str = "") -> str:
        """One line stating data, images, attack, eps and the accuracy."""
        prefix = f"[{data}] " if data else ""
        return (
            f"{prefix}{self.label}: {self.accuracy:.2%} ({self.correct}/{self.n_images} images, "
            f"L-inf eps={format_eps(self.epsilon)}) in {self.seconds:.1f}s"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; the per-image flags are packed into a hex string."""
        out = {k: v for k, v in asdict(self).items() if k != "robust"}
        out["robust_flags"] = None if self.robust is None else pack_flags(self.robust)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AttackResult:
        """Inverse of :meth:`to_dict`."""
        flags = d.get("robust_flags")
        fields = {k: d[k] for k in ("name", "label", "accuracy", "correct", "n_images", "epsilon", "seconds")}
        robust = None if flags is None else unpack_flags(flags, int(d["n_images"]))
        return cls(**fields, details=dict(d.get("details", {})), robust=robust)


@dataclass
class Check:
    """Outcome of one sanity check of the evaluation.

    Attributes:
        name: Stable id (``"pgd_monotone"``...).
        title: What is checked, in words.
        passed: ``True``/``False``; ``None`` when it could not run (detail says why).
        detail: The numbers behind the verdict.
    """

    name: str
    title: str
    passed: bool | None
    detail: str

    @property
    def status(self) -> str:
        return {True: "PASS", False: "FAIL", None: "skipped"}[self.passed]


class CleanRobust(NamedTuple):
    """Clean and PGD accuracy on the same images (see :func:`robust_accuracy`)."""

    clean: float
    robust: float


def pack_flags(flags: Tensor) -> str:
    """Bool flags -> hex string (8 images a byte), for JSON files."""
    return np.packbits(flags.detach().cpu().numpy().astype(bool)).tobytes().hex()


def unpack_flags(hex_string: str, n: int) -> Tensor:
    """Inverse of :func:`pack_flags`."""
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(hex_string), dtype=np.uint8))[:n]
    return torch.from_numpy(bits.astype(bool))

