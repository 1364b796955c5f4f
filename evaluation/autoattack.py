"""AutoAttack standard (L-inf) from the official package, resumable chunk by chunk.

The images are split into chunks; each finished chunk is saved to a JSON state file tied to
the model, the images, eps and the seed, so an interrupted evaluation resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from evaluation.attacks import ATTACKS
from evaluation.batches import slices
from evaluation.records import AttackResult, pack_flags, unpack_flags
from las_env import files
from las_env.attack import eval_mode
from las_env.checkpoint import state_fingerprint

AUTOATTACK_COMPONENTS: tuple[str, ...] = ("apgd-ce", "apgd-t", "fab-t", "square")
"""The attacks of AutoAttack's "standard" version for L-inf, in the order it runs them."""

AUTOATTACK_STATE_FORMAT = "las-at/autoattack-state/v1"


def import_autoattack() -> tuple[type, str]:
    """The official AutoAttack class (package ``pyautoattack``) and its version.

    Only this packaging is supported: its API (``batch_size=``, logging through the
    ``auto-attack`` logger) is what :func:`run_autoattack` relies on.

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


def run_autoattack(
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
        for i, s in enumerate(slices(n, batch_size)):
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
