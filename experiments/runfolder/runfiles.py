"""The names and formats of a run folder's files, for every reader and writer (imports nothing: cheap to read)."""

from __future__ import annotations

RESULTS_FORMAT = "las-at/results/v1"
METRICS_FORMAT = "las-at/metrics/v1"
EVALUATION_FORMAT = "las-at/evaluation/v1"  # experiments/evaluate.py's evaluation*.json
SUMMARY_FORMAT = "las-at/comparison/v2"  # v2: rliable statistics (IQM, CIs, P(improvement)), cost

CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"  # the one before the latest (las_env.checkpoint.previous_path)
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
EVALUATION_STEM = "evaluation"  # evaluate.py's reports: evaluation[_n<N>][_eps<E>].md/.json by a checkpoint
EVALUATION_GLOB = f"{EVALUATION_STEM}*.json"
REPORT_MD = "report.md"
SUMMARY_FILE = "summary.json"

RUN_FILES = (CHECKPOINT, PREVIOUS_CHECKPOINT, WEIGHTS_FILE, METRICS_FILE, RESULTS_FILE, RESULTS_MD, ACCURACY_PNG,
             CHOICES_PNG, AUTOATTACK_STATE)
"""What a training run writes atomically in its folder (the names of its temporary files)."""
