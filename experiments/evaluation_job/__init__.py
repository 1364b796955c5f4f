"""``experiments/evaluate.py``'s work (``job.py``): its settings, the target to evaluate, the job and its reports."""
