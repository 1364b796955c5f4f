"""Robustness evaluation a reviewer can trust: clean, FGSM, PGD-k, C&W-inf, official AutoAttack.

Every number this module produces is the accuracy of a classifier on the first ``n`` images
of a test set under one named attack at one L-inf radius ``eps`` (pixels in ``[0, 1]``):

- ``clean``: no attack.
- ``fgsm``: one signed-gradient step of size ``eps`` from the clean image (no random start).
- ``pgd<k>`` (``pgd10``, ``pgd20``, ``pgd50``, any ``k``): PGD on the cross-entropy, ``k``
  steps of size ``eps / 4`` (2/255 at 8/255), uniform random start inside the ball.
- ``cw`` (``cw<k>``): C&W-inf, i.e. PGD on the margin loss ``max_{j != y} z_j - z_y``;
  ``cw`` is 20 steps, the same schedule as PGD-20, so the two differ only in the loss.
- ``autoattack``: AutoAttack "standard" (APGD-CE, APGD-T, FAB-T, Square) from the official
  implementation (the ``pyautoattack`` package), run in chunks whose results are saved to a
  JSON state file so an interrupted evaluation resumes where it stopped.

An image counts as robust only if it is classified correctly on the clean input AND under
every attack run (every restart): the clean image is itself a point of the eps-ball, so a
misclassified clean image has no robustness to report. This is also AutoAttack's rule, so all
rows of a table are comparable, and per-image flags are kept to compare attacks on the same
images.

:func:`sanity_checks` tests the evaluation itself against gradient masking (SPEC section 5).
The PGD machinery is :func:`las_env.attack.pgd`; nothing here reimplements it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from las_env import files
from las_env.attack import Loss, eval_mode, pgd

AttackKind = Literal["clean", "fgsm", "pgd", "autoattack"]

AUTOATTACK_COMPONENTS: tuple[str, ...] = ("apgd-ce", "apgd-t", "fab-t", "square")
"""The attacks of AutoAttack's "standard" version for L-inf, in the order it runs them."""

AUTOATTACK_STATE_FORMAT = "las-at/autoattack-state/v1"
HUGE_EPSILON = 1.0
"""Radius of the "huge eps" sanity check: 1.0 is the whole ``[0, 1]`` image box."""


# ----------------------------------------------------------------------------- registry


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


def default_step(eps: float) -> float:
    """PGD step size of the evaluation: ``eps / 4`` (2/255 for 8/255, 0.05 for digits' 0.2)."""
    return eps / 4


def format_eps(eps: float) -> str:
    """``8/255`` for small multiples of 1/255 (the CIFAR convention), else ``0.2``-style."""
    k = eps * 255
    if eps > 0 and abs(k - round(k)) < 1e-6 and round(k) <= 32:
        return f"{round(k)}/255"
    return f"{eps:.4g}"


# ----------------------------------------------------------------------------- results


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


# ----------------------------------------------------------------------------- helpers


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _slices(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def _generator(device: torch.device, seed: int, salt: str = "") -> torch.Generator:
    # One generator per attack, seeded from (seed, attack name): an attack's result does not
    # depend on which other attacks ran before it, and the global RNG is left alone.
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + zlib.crc32(salt.encode())) % (2**63))
    return g


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor) -> Tensor:
    with eval_mode(model):
        return model(x).argmax(1)


def _check_inputs(x: Tensor, y: Tensor, eps: float) -> None:
    if x.dim() != 4 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"Expected images (N, C, H, W) and labels (N,), got {tuple(x.shape)} and {tuple(y.shape)}.")
    if x.shape[0] == 0:
        raise ValueError("No images to evaluate (n = 0).")
    if not eps >= 0 or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}.")
    if float(x.min()) < 0 or float(x.max()) > 1:
        # Epsilons are in pixel units of [0, 1] images; normalised inputs would make them meaningless.
        raise ValueError(f"Images must lie in [0, 1] (no normalisation), got values in [{float(x.min()):.3g}, "
                         f"{float(x.max()):.3g}].")


def state_fingerprint(module_or_tensors: nn.Module | Sequence[Tensor]) -> str:
    """SHA-256 (first 16 hex digits) of a model's state_dict or of tensors' bytes.

    Used to tie saved results and AutoAttack state files to the exact weights and images.
    """
    h = hashlib.sha256()
    if isinstance(module_or_tensors, nn.Module):
        items: list[tuple[str, Tensor]] = list(module_or_tensors.state_dict().items())
    else:
        items = [(str(i), t) for i, t in enumerate(module_or_tensors)]
    for key, t in items:
        h.update(key.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically with the usual permissions (:func:`las_env.files.atomic_write_text`)."""
    files.atomic_write_text(path, text)


# ----------------------------------------------------------------------------- attacks


def _pgd_robust(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    step: float,
    iterations: int,
    loss: Loss,
    random_start: bool,
    restarts: int,
    generator: torch.Generator | None,
) -> Tensor:
    """Per-image robust flags of one batch under PGD with restarts (worst case over restarts).

    Each restart only attacks the images that survived every earlier one: an image already
    broken stays broken, so attacking it again could not change the result.
    """
    robust = _predict(model, x) == y
    for _ in range(restarts):
        idx = robust.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        x_adv = pgd(model, x[idx], y[idx], eps, step, iterations, random_start=random_start, loss=loss, generator=generator)
        robust[idx] = _predict(model, x_adv) == y[idx]
    return robust


def robust_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    step: float,
    iterations: int,
    *,
    batch_size: int = 512,
    loss: Loss = "ce",
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> CleanRobust:
    """Clean and PGD-``iterations`` accuracy of ``model`` on ``(x, y)``: the cheap per-epoch probe.

    Batched, one PGD run per batch, no per-image Python, no progress bar. The model is in eval
    mode during the call and its mode is restored after. Random starts come from ``generator``
    (default: a fresh one seeded with ``seed``, so successive epochs are probed alike and the
    global RNG is untouched). Robust = correct on the clean image and on the PGD image.

    Returns:
        ``CleanRobust(clean, robust)``, fractions in ``[0, 1]`` over ``len(x)`` images.
    """
    _check_inputs(x, y, eps)
    device = _model_device(model)
    gen = generator if generator is not None else _generator(device, seed, "robust_accuracy")
    clean = robust = 0
    for s in _slices(x.shape[0], batch_size):
        xb, yb = x[s].to(device), y[s].to(device)
        ok = _predict(model, xb) == yb
        x_adv = pgd(model, xb, yb, eps, step, iterations, loss=loss, generator=gen)
        clean += int(ok.sum())
        robust += int((ok & (_predict(model, x_adv) == yb)).sum())
    n = x.shape[0]
    return CleanRobust(clean / n, robust / n)


def evaluate_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: str,
    eps: float,
    *,
    step: float | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    restarts: int = 1,
    seed: int = 0,
    generator: torch.Generator | None = None,
    progress: bool = True,
    state_path: str | Path | None = None,
) -> AttackResult:
    """Accuracy of ``model`` on ``(x, y)`` under one attack.

    Args:
        model: A classifier returning logits for images in ``[0, 1]``; evaluated in eval mode
            (its mode is restored after). It must already live on ``device``.
        x, y: Images ``(N, C, H, W)`` in ``[0, 1]`` and labels ``(N,)``, on any device;
            moved to ``device`` one batch at a time.
        attack: A name of :data:`ATTACKS`, or ``pgd<k>`` / ``cw<k>``.
        eps: L-inf radius in pixel units (ignored by ``clean``).
        step: PGD/C&W step size; default ``eps / 4``. FGSM always steps by ``eps``.
        batch_size: Images per forward/backward pass (and per AutoAttack chunk).
        device: Where to compute; default the model's device.
        restarts: PGD/C&W random restarts; an image is robust only if it survives all.
        seed: Seeds the random starts (and AutoAttack) when ``generator`` is not given.
        generator: Random source for PGD starts, on ``device``.
        progress: Show a tqdm progress bar (stderr).
        state_path: AutoAttack only: JSON file where finished chunks are saved; a rerun with
            the same model, images, eps and seed skips them (``None``: no state).

    Returns:
        An :class:`AttackResult` with per-image flags.
    """
    spec = attack_spec(attack)
    _check_inputs(x, y, eps)
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    device = torch.device(device) if device is not None else _model_device(model)
    if spec.kind == "autoattack":
        return _autoattack(model, x, y, eps, batch_size=batch_size, device=device, seed=seed,
                           progress=progress, state_path=None if state_path is None else Path(state_path))

    eps_used = 0.0 if spec.kind == "clean" else float(eps)
    step = default_step(eps_used) if step is None else float(step)
    gen = generator if generator is not None else _generator(device, seed, spec.name)
    n = x.shape[0]
    robust = torch.zeros(n, dtype=torch.bool)
    label = spec.label(eps_used, step, restarts)
    start = time.perf_counter()
    with eval_mode(model), tqdm(total=n, desc=spec.name, unit="img", disable=not progress, leave=False) as bar:
        for s in _slices(n, batch_size):
            xb, yb = x[s].to(device), y[s].to(device)
            if spec.kind == "clean":
                flags = _predict(model, xb) == yb
            elif spec.kind == "fgsm":
                # One signed-gradient step of size eps from the clean image: PGD-1, no start.
                flags = _pgd_robust(model, xb, yb, eps=eps_used, step=eps_used, iterations=1, loss="ce",
                                    random_start=False, restarts=1, generator=gen)
            else:
                flags = _pgd_robust(model, xb, yb, eps=eps_used, step=step, iterations=spec.iterations,
                                    loss=spec.loss, random_start=True, restarts=restarts, generator=gen)
            robust[s] = flags.cpu()
            bar.update(s.stop - s.start)
            bar.set_postfix(acc=f"{float(robust[: s.stop].float().mean()):.3f}")
    seconds = time.perf_counter() - start
    details: dict[str, Any] = {"kind": spec.kind}
    if spec.kind == "fgsm":
        details.update(step=eps_used, iterations=1, random_start=False)
    elif spec.kind == "pgd":
        details.update(step=step, iterations=spec.iterations, loss=spec.loss, random_start=True,
                       restarts=restarts, seed=seed)
    correct = int(robust.sum())
    return AttackResult(spec.name, label, correct / n, correct, n, eps_used, seconds, details, robust)


# ----------------------------------------------------------------------------- AutoAttack


def import_autoattack() -> tuple[type, str]:
    """The official AutoAttack class (package ``pyautoattack``) and its version.

    Only this packaging is supported: its API (``batch_size=``, logging through the
    ``auto-attack`` logger) is what :func:`_autoattack` relies on.

    Raises:
        ImportError: the package is missing; nothing weaker is ever run in its place.
    """
    try:
        import pyautoattack  # noqa: PLC0415
    except ImportError as exc:
        raise ImportError(
            "AutoAttack needs the official implementation: `pip install pyautoattack` (the "
            "packaged fra31/auto-attack; it needs only torch and numpy). No substitute is run in its place."
        ) from exc
    return pyautoattack.AutoAttack, str(getattr(pyautoattack, "__version__", "unknown"))


class _AutoAttackLog(logging.Handler):
    """Collects the 'auto-attack' logger's messages: per-component robust accuracy and warnings."""

    _AFTER = re.compile(r"robust accuracy after ([A-Z\-]+): ([\d.]+)%")
    _INITIAL = re.compile(r"initial accuracy: ([\d.]+)%")

    def __init__(self, on_running: Callable[[str], None]) -> None:
        super().__init__(level=logging.DEBUG)
        self.on_running = on_running
        self.after: dict[str, float] = {}
        self.initial: float | None = None
        self.warnings: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            self.warnings.append(msg)
        elif msg.startswith("running "):
            self.on_running(msg[len("running "):])
        elif m := self._AFTER.search(msg):
            self.after[m.group(1).lower()] = float(m.group(2))
        elif m := self._INITIAL.search(msg):
            self.initial = float(m.group(1))


@contextmanager
def _captured_autoattack_log(on_running: Callable[[str], None]) -> Iterator[_AutoAttackLog]:
    # AutoAttack reports through logging (INFO/DEBUG chatter, WARNINGs about suspicious
    # defenses). Capture it instead of letting it reach the root logger, and re-report the
    # warnings ourselves in the result.
    logger = logging.getLogger("auto-attack")
    handler = _AutoAttackLog(on_running)
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


def _chunk_breakdown(log: _AutoAttackLog, size: int) -> dict[str, int]:
    """Robust images after each AutoAttack component in one chunk (cumulative).

    AutoAttack logs percentages with two decimals of the chunk, which pins the count exactly
    for chunks up to 10,000 images. Components skipped because nothing was left robust keep
    the previous count (zero).
    """
    out: dict[str, int] = {}
    if log.initial is None:
        return out
    out["clean"] = previous = round(log.initial / 100 * size)
    for comp in AUTOATTACK_COMPONENTS:
        if comp in log.after:
            previous = round(log.after[comp] / 100 * size)
        out[comp] = previous
    return out


def _load_state(path: Path | None, fingerprint: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Saved AutoAttack chunks matching ``fingerprint`` (else a fresh state) and a note."""
    fresh = {"format": AUTOATTACK_STATE_FORMAT, "fingerprint": fingerprint, "chunks": {}}
    if path is None or not path.exists():
        return fresh, None
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return fresh, f"ignored unreadable AutoAttack state {path} ({exc}); starting over"
    if state.get("format") != AUTOATTACK_STATE_FORMAT or state.get("fingerprint") != fingerprint:
        return fresh, (f"AutoAttack state {path} belongs to another evaluation (different model, "
                       f"images, eps, seed or chunking); starting over and replacing it")
    return state, None


def _autoattack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    batch_size: int,
    device: torch.device,
    seed: int,
    progress: bool,
    state_path: Path | None,
) -> AttackResult:
    """AutoAttack standard, L-inf, from the official package, resumable chunk by chunk.

    The images are split into chunks of ``batch_size``; each chunk is a complete
    ``run_standard_evaluation`` call. AutoAttack's attacks are per-image (per-image step sizes,
    restarts and targets), so the chunking does not change what any image faces. After each
    chunk the state file is rewritten atomically; a rerun skips the chunks it lists.

    Why not the package's own ``state_path``: in pyautoattack 0.2.0 restoring a state whose
    clean pass is done leaves ``y_adv`` unset and the next broken image raises
    ``UnboundLocalError``; its file is also written in place (a crash can tear it) and is not
    tied to the model or the images.
    """
    AutoAttack, version = import_autoattack()
    n = x.shape[0]
    with torch.no_grad(), eval_mode(model):
        n_classes = model(x[:1].to(device)).shape[1]
    if n_classes < 10:
        raise ValueError(
            f"AutoAttack standard attacks 9 target classes (APGD-T, FAB-T); this model has only "
            f"{n_classes} classes, so the standard version does not apply."
        )
    fingerprint = {
        "model": state_fingerprint(model),
        "images": state_fingerprint([x, y]),
        "n_images": n,
        "eps": float(eps),
        "seed": int(seed),
        "chunk_size": int(batch_size),
        "version": "standard",
        "norm": "Linf",
        "pyautoattack": version,
    }
    state, note = _load_state(state_path, fingerprint)
    notes = [note] if note else []
    chunks: dict[str, Any] = state["chunks"]
    resumed = len(chunks)

    bar = tqdm(total=n, desc="autoattack", unit="img", disable=not progress, leave=False)
    with eval_mode(model):
        for i, s in enumerate(_slices(n, batch_size)):
            if str(i) in chunks:
                bar.update(s.stop - s.start)
                continue
            xc, yc = x[s].to(device), y[s].to(device)
            t0 = time.perf_counter()
            with _captured_autoattack_log(lambda comp: bar.set_postfix(chunk=i, running=comp)) as log:
                adversary = AutoAttack(model, norm="Linf", eps=float(eps), version="standard",
                                       seed=int(seed), device=device)
                trace = sys.gettrace()  # AutoAttack's dynamic-defense check resets sys.settrace
                # AutoAttack reseeds the global RNGs; fork them so the caller's streams survive.
                cuda = [device.index or 0] if device.type == "cuda" else []
                with torch.random.fork_rng(devices=cuda):
                    x_adv, y_adv = adversary.run_standard_evaluation(xc, yc, batch_size=batch_size)
                sys.settrace(trace)
            robust = (y_adv.to(yc.device) == yc).cpu()
            linf = float((x_adv - xc).abs().flatten(1).amax(1).max()) if len(xc) else 0.0
            chunks[str(i)] = {
                "start": s.start,
                "stop": s.stop,
                "robust_flags": pack_flags(robust),
                "seconds": time.perf_counter() - t0,
                "breakdown": _chunk_breakdown(log, s.stop - s.start),
                "warnings": sorted(set(log.warnings)),
                "max_linf": linf,
            }
            if state_path is not None:
                files.write_json(state_path, state)
            bar.update(s.stop - s.start)
    bar.close()

    order = sorted(chunks.values(), key=lambda c: c["start"])
    robust = torch.cat([unpack_flags(c["robust_flags"], c["stop"] - c["start"]) for c in order])
    breakdown: dict[str, int] = {}
    for c in order:
        for k, v in c["breakdown"].items():
            breakdown[k] = breakdown.get(k, 0) + v
    warnings = sorted({w for c in order for w in c["warnings"]})
    correct = int(robust.sum())
    details = {
        "kind": "autoattack",
        "version": "standard",
        "components": list(AUTOATTACK_COMPONENTS),
        "implementation": f"pyautoattack {version} (official AutoAttack, Croce & Hein 2020)",
        "seed": int(seed),
        "chunk_size": int(batch_size),
        "chunks": len(order),
        "chunks_resumed": resumed,
        "robust_after_component": breakdown if len(breakdown) == len(AUTOATTACK_COMPONENTS) + 1 else {},
        "warnings": warnings,
        "max_linf": max(c["max_linf"] for c in order),
        "notes": notes,
        "state_path": None if state_path is None else str(state_path),
    }
    seconds = float(sum(c["seconds"] for c in order))
    label = ATTACKS["autoattack"].label(eps)
    return AttackResult("autoattack", label, correct / n, correct, n, float(eps), seconds, details, robust)


# ----------------------------------------------------------------------------- evaluate


def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attacks: Sequence[str],
    eps: float,
    *,
    step: float | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    restarts: int = 1,
    seed: int = 0,
    n_per_attack: Mapping[str, int | None] | None = None,
    autoattack_state: str | Path | None = None,
    progress: bool = True,
    data_description: str = "",
    log: Callable[[str], None] | None = None,
) -> list[AttackResult]:
    """Run several attacks on the same images; one :class:`AttackResult` each, in order.

    Args:
        attacks: Attack names (validated before anything runs).
        n_per_attack: Optional per-attack image counts (the first ``n`` of ``x``), e.g.
            ``{"autoattack": 500}`` while the cheap attacks use every image.
        autoattack_state: State file of the AutoAttack row (see :func:`evaluate_attack`).
        data_description: Names the data in the per-attack summary lines.
        log: Receives one summary line per attack (data, images, attack, eps, accuracy);
            default: written above the progress bars when ``progress`` is on, else silent.
        Other arguments: as :func:`evaluate_attack`.
    """
    specs = [attack_spec(a) for a in attacks]
    if len({s.name for s in specs}) != len(specs):
        raise ValueError(f"Attack list {list(attacks)} names an attack twice.")
    limits = {attack_spec(k).name: v for k, v in (n_per_attack or {}).items() if v is not None}
    for name, value in limits.items():
        if int(value) < 1:
            raise ValueError(f"n for attack {name!r} must be >= 1, got {value}.")
    if log is None:
        log = tqdm.write if progress else (lambda _msg: None)
    results = []
    for spec in specs:
        n = min(int(limits.get(spec.name, x.shape[0])), x.shape[0])
        result = evaluate_attack(
            model, x[:n], y[:n], spec.name, eps, step=step, batch_size=batch_size, device=device,
            restarts=restarts, seed=seed, progress=progress,
            state_path=autoattack_state if spec.kind == "autoattack" else None,
        )
        log(result.summary(data_description))
        results.append(result)
    return results


# ----------------------------------------------------------------------------- sanity checks


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


# ----------------------------------------------------------------------------- report


def format_table(
    results: Sequence[AttackResult],
    checks: Sequence[Check] = (),
    dataset_description: str = "",
    *,
    model_description: str = "",
    n_total: int | None = None,
) -> str:
    """Markdown report: a header naming data, images, threat model; one row per attack; checks.

    Args:
        dataset_description: The data set and split, e.g. ``"digits (scikit-learn 8x8) test set"``.
        model_description: What was evaluated (architecture, checkpoint, weights hash).
        n_total: Size of the full test set, to say "first n of N".
    """
    eps_values = sorted({r.epsilon for r in results if r.name != "clean"})
    n_main = max((r.n_images for r in results), default=0)
    fewer = [f"{r.name}: first {r.n_images}" for r in results if r.n_images != n_main]
    images = f"the first {n_main}" + (f" of {n_total}" if n_total else "") + " (RobustBench order)"
    if fewer:
        images += "; " + ", ".join(fewer)
    lines = ["# Robustness evaluation", ""]
    if dataset_description:
        lines.append(f"- Data: {dataset_description}")
    lines.append(f"- Images: {images}")
    if model_description:
        lines.append(f"- Model: {model_description}")
    eps_text = ", ".join(format_eps(e) for e in eps_values) or "n/a"
    lines.append(f"- Threat model: L-inf, eps = {eps_text}, pixels in [0, 1]; robust = correct on the "
                 f"clean image and under the attack")
    lines += ["", "| Attack | Setting | Accuracy | Correct / images | eps | Time (s) |", "|---|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.name} | {r.label} | {r.accuracy:.2%} | {r.correct}/{r.n_images} | "
                     f"{format_eps(r.epsilon)} | {r.seconds:.1f} |")
    for r in results:
        if r.name == "autoattack":
            lines += ["", _autoattack_note(r)]
    if checks:
        lines += ["", "## Sanity checks", "", "| Check | Result | Detail |", "|---|---|---|"]
        for c in checks:
            lines.append(f"| {c.title} | {'**FAIL**' if c.passed is False else c.status} | {c.detail} |")
    return "\n".join(lines) + "\n"


def _autoattack_note(r: AttackResult) -> str:
    d = r.details
    parts = [f"AutoAttack: {d.get('implementation', 'official implementation')}, seed {d.get('seed')}"]
    steps = d.get("robust_after_component") or {}
    if steps:
        parts.append("robust images after each component: " + " -> ".join(f"{k} {v}" for k, v in steps.items()))
    if d.get("chunks_resumed"):
        parts.append(f"{d['chunks_resumed']} of {d['chunks']} chunks restored from {d.get('state_path')}")
    for w in d.get("warnings", []):
        parts.append(f"AutoAttack warning: {w}")
    text = "; ".join(parts)
    return text if text.endswith(".") else text + "."


# ----------------------------------------------------------------------------- plain state_dict


def export_state_dict(model: nn.Module, path: str | Path) -> Path:
    """Write the model's weights as a plain ``state_dict`` (tensors only, CPU, no prefix).

    This is what RobustBench's ``load_model(..., custom_checkpoint=PATH)`` and
    ``model.load_state_dict(torch.load(PATH))`` expect. Written atomically.
    """
    from las_env.checkpoint import atomic_save  # noqa: PLC0415

    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return atomic_save(state, path)


def _few(keys: set[str], shown: int = 4) -> str:
    ordered = sorted(keys)
    more = f" (+{len(ordered) - shown} more)" if len(ordered) > shown else ""
    return (", ".join(ordered[:shown]) or "none") + more


def load_plain_state_dict(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a plain ``state_dict`` file into ``model`` (strict), returning the model.

    Accepts a bare mapping of tensors, or one nested under ``"state_dict"`` / ``"model"``
    (common trainer conventions); a ``module.`` prefix (DataParallel) is removed.

    Raises:
        FileNotFoundError: no file. ValueError: a LAS-AT checkpoint, or keys/shapes that do not
        match the architecture (the message names the mismatches).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No state_dict file at {path}.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a plain state_dict"
        raise ValueError(
            f"{path} is not a plain state_dict (tensors only); if it is a LAS-AT checkpoint, "
            f"pass it as checkpoint=PATH. ({type(exc).__name__}: {exc})"
        ) from exc
    if isinstance(obj, Mapping) and obj.get("format") == "las-at/v1":
        raise ValueError(f"{path} is a LAS-AT checkpoint, not a plain state_dict: pass it as checkpoint=PATH.")
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state_dict (a mapping of parameter names to tensors).")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    missing, unexpected = model.state_dict().keys() - state.keys(), state.keys() - model.state_dict().keys()
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the architecture: missing keys {_few(missing)}; unexpected keys "
            f"{_few(unexpected)}. Check model= and data= (channels, classes)."
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path} does not fit the architecture: {exc}") from exc
    return model
