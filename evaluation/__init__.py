"""Robustness evaluation a reviewer can trust: clean, FGSM, PGD-k, C&W-inf, official AutoAttack.

One module per job:

- :mod:`evaluation.attacks`: attack names and what they mean (:data:`ATTACKS`, :func:`attack_spec`).
- :mod:`evaluation.records`: results (:class:`AttackResult`, :class:`Check`, :class:`CleanRobust`).
- :mod:`evaluation.robust`: the PGD / C&W / FGSM evaluator (:func:`robust_accuracy`,
  :func:`evaluate_attack`, :func:`evaluate`).
- :mod:`evaluation.autoattack`: the official AutoAttack runner with its resumable state file.
- :mod:`evaluation.sanity`: checks of the evaluation against gradient masking (SPEC section 5).
- :mod:`evaluation.report`: the Markdown table (:func:`format_table`).

The package sits above ``las_env`` (it imports the game's PGD and checkpoint I/O, never the
reverse); plain ``state_dict`` I/O lives in :mod:`las_env.checkpoint`.
"""

from evaluation.attacks import (ATTACKS, DEFAULT_ATTACKS, AttackSpec, attack_order, attack_spec, default_step,
                                format_eps)
from evaluation.autoattack import AUTOATTACK_COMPONENTS, import_autoattack
from evaluation.records import AttackResult, Check, CleanRobust, pack_flags, unpack_flags
from evaluation.report import format_table
from evaluation.robust import evaluate, evaluate_attack, robust_accuracy
from evaluation.sanity import HUGE_EPSILON, sanity_checks

__all__ = [
    "ATTACKS",
    "AUTOATTACK_COMPONENTS",
    "DEFAULT_ATTACKS",
    "HUGE_EPSILON",
    "AttackResult",
    "AttackSpec",
    "Check",
    "CleanRobust",
    "attack_order",
    "attack_spec",
    "default_step",
    "evaluate",
    "evaluate_attack",
    "format_eps",
    "format_table",
    "import_autoattack",
    "pack_flags",
    "robust_accuracy",
    "sanity_checks",
    "unpack_flags",
]
