"""The PGD-family evaluator: clean, FGSM, PGD-k and C&W-inf accuracy, and several attacks in a row.

Every number is the accuracy of a classifier on the first ``n`` images of a test set under one
named attack (:mod:`evaluation.attacks`) at one L-inf radius ``eps`` (pixels in ``[0, 1]``).
An image counts as robust only if it is classified correctly on the clean input AND under
every attack run (every restart): the clean image is itself a point of the eps-ball, so a
misclassified clean image has no robustness to report. This is also AutoAttack's rule, so all
rows of a table are comparable, and per-image flags are kept to compare attacks on the same
images. The PGD machinery is :func:`las_env.attack.pgd`; nothing here reimplements it.

``early_stop=True`` is the authors' evaluation PGD/C&W: an image stops being attacked once it is
misclassified (``las_env.attack``, tau = 0). In eval mode a frozen image stays misclassified, so an
image then counts as robust only if EVERY iterate of the full attack's path is classified correctly:
never more robust than the full attack on the same starts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from evaluation.attacks import attack_spec, default_step
from evaluation.autoattack import run_autoattack
from evaluation.batches import attack_generator, check_inputs, model_device, predict, slices
from evaluation.records import AttackResult, CleanRobust
from las_env.attack import Loss, eval_mode, pgd
from las_env.sharding import Shard


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
    early_stop: bool = False,
) -> Tensor:
    """Per-image robust flags of one batch under PGD with restarts (worst case over restarts).

    Each restart only attacks the images that survived every earlier one: an image already
    broken stays broken, so attacking it again could not change the result.
    """
    robust = predict(model, x) == y
    for _ in range(restarts):
        idx = robust.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        x_adv = pgd(model, x[idx], y[idx], eps, step, iterations, random_start=random_start, loss=loss,
                    generator=generator, early_stop=0 if early_stop else None)
        robust[idx] = predict(model, x_adv) == y[idx]
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
    shard: Shard | None = None,
    early_stop: bool = False,
) -> CleanRobust:
    """Clean and PGD-``iterations`` accuracy of ``model`` on ``(x, y)``: the cheap per-epoch probe.

    Batched, one PGD run per batch, no per-image Python, no progress bar. The model is in eval
    mode during the call and its mode is restored after. Random starts come from ``generator``
    (default: a fresh one seeded with ``seed``, so successive epochs are probed alike and the
    global RNG is untouched; ``shard``: this rank's rows of each batch under several processes,
    the starts drawn for the whole batch). Robust = correct on the clean image and on the PGD image.
    ``early_stop``: the authors' early-stopping PGD (module docstring).

    Returns:
        ``CleanRobust(clean, robust)``, fractions in ``[0, 1]`` over ``len(x)`` images.
    """
    check_inputs(x, y, eps)
    device = model_device(model)
    gen = generator if generator is not None else attack_generator(device, seed, "robust_accuracy")
    clean = robust = 0
    for s in slices(x.shape[0], batch_size):
        xb, yb = x[s].to(device), y[s].to(device)
        ok = predict(model, xb) == yb
        x_adv = pgd(model, xb, yb, eps, step, iterations, loss=loss, generator=gen, shard=shard,
                    early_stop=0 if early_stop else None)
        clean += int(ok.sum())
        robust += int((ok & (predict(model, x_adv) == yb)).sum())
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
    early_stop: bool = False,
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
        early_stop: PGD/C&W only: the authors' early stop (module docstring); FGSM has one step.

    Returns:
        An :class:`AttackResult` with per-image flags.
    """
    spec = attack_spec(attack)
    check_inputs(x, y, eps)
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    device = torch.device(device) if device is not None else model_device(model)
    if spec.kind == "autoattack":
        return run_autoattack(model, x, y, eps, batch_size=batch_size, device=device, seed=seed,
                              progress=progress, state_path=None if state_path is None else Path(state_path))

    eps_used = 0.0 if spec.kind == "clean" else float(eps)
    step = default_step(eps_used) if step is None else float(step)
    gen = generator if generator is not None else attack_generator(device, seed, spec.name)
    n = x.shape[0]
    robust = torch.zeros(n, dtype=torch.bool)
    label = spec.label(eps_used, step, restarts)
    start = time.perf_counter()
    with eval_mode(model), tqdm(total=n, desc=spec.name, unit="img", disable=not progress, leave=False) as bar:
        for s in slices(n, batch_size):
            xb, yb = x[s].to(device), y[s].to(device)
            if spec.kind == "clean":
                flags = predict(model, xb) == yb
            elif spec.kind == "fgsm":
                # One signed-gradient step of size eps from the clean image: PGD-1, no start.
                flags = _pgd_robust(model, xb, yb, eps=eps_used, step=eps_used, iterations=1, loss="ce",
                                    random_start=False, restarts=1, generator=gen)
            else:
                flags = _pgd_robust(model, xb, yb, eps=eps_used, step=step, iterations=spec.iterations,
                                    loss=spec.loss, random_start=True, restarts=restarts, generator=gen,
                                    early_stop=early_stop)
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
        if early_stop:  # recorded only when on: results of the default attack keep their form
            details["early_stop"] = True
            label += ", early stop at the first misclassification (the authors')"
    correct = int(robust.sum())
    return AttackResult(spec.name, label, correct / n, correct, n, eps_used, seconds, details, robust)


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
    early_stop: bool = False,
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
            state_path=autoattack_state if spec.kind == "autoattack" else None, early_stop=early_stop,
        )
        log(result.summary(data_description))
        results.append(result)
    return results


