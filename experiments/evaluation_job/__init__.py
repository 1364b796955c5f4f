"""``experiments/evaluate.py``'s work: its settings, the target to evaluate, the job and its reports."""
