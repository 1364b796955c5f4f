"""``experiments/evaluate.py``'s work (``job.py``): its settings, target, job and reports (imports config, runfolder)."""
