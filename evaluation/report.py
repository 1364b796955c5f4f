"""The Markdown report of an evaluation: header (data, images, threat model), one row per attack, checks."""

from __future__ import annotations

from collections.abc import Sequence

from evaluation.attacks import format_eps
from evaluation.records import AttackResult, Check


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

