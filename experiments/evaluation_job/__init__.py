"""``experiments/evaluate.py``'s work: settings, target, reports, the job (one module each)."""
