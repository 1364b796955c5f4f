"""The names and formats of the files in a run folder: one place for every reader and writer.

A training run (:mod:`experiments.training.loop`) writes, in ``runs/<data>/<agent>/<model>-seed<s>-<hash>/``::

    checkpoint.pt, checkpoint.prev.pt   resumable state (the one before the latest kept)
    best.pt                             best-epoch weights (model selection), when kept
    target_state_dict.pt                plain state_dict of the final target (RobustBench)
    metrics.json  (METRICS_FORMAT)      per-epoch history
    results.json  (RESULTS_FORMAT)      final evaluation, settings, status
    results.md, accuracy.png, choices.png, log.txt, autoattack_state*.json

``experiments/evaluate.py`` adds ``evaluation*.json`` (:data:`EVALUATION_FORMAT`) and ``.md``
next to a checkpoint; ``experiments/compare.py`` writes ``report.md`` and ``summary.json``
(:data:`SUMMARY_FORMAT`). This module imports nothing of the project (no torch, no env), so
the comparison can read run folders without building anything.
"""

from __future__ import annotations

RESULTS_FORMAT = "las-at/results/v1"
METRICS_FORMAT = "las-at/metrics/v1"
EVALUATION_FORMAT = "las-at/evaluation/v1"
"""Format of the reports of ``experiments/evaluate.py`` (``evaluation*.json``)."""
SUMMARY_FORMAT = "las-at/comparison/v1"

CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
"""The checkpoint before the latest (:func:`las_env.checkpoint.previous_path` of :data:`CHECKPOINT`)."""
BEST = "best.pt"
WEIGHTS_FILE = "target_state_dict.pt"
RESULTS_FILE = "results.json"
RESULTS_MD = "results.md"
METRICS_FILE = "metrics.json"
ACCURACY_PNG = "accuracy.png"
CHOICES_PNG = "choices.png"
LOG_FILE = "log.txt"
AUTOATTACK_STATE = "autoattack_state.json"
AUTOATTACK_STATE_BEST = "autoattack_state_best.json"
EVALUATION_STEM = "evaluation"
"""Base name of ``experiments/evaluate.py``'s reports: ``evaluation[_n<N>][_eps<E>].md/.json`` next to a checkpoint."""
EVALUATION_GLOB = f"{EVALUATION_STEM}*.json"
REPORT_MD = "report.md"
SUMMARY_FILE = "summary.json"

RUN_FILES = (CHECKPOINT, PREVIOUS_CHECKPOINT, WEIGHTS_FILE, METRICS_FILE, RESULTS_FILE, RESULTS_MD, ACCURACY_PNG,
             CHOICES_PNG, AUTOATTACK_STATE)
"""What a training run writes atomically in its folder (the names of its temporary files)."""
