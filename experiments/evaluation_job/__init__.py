"""``experiments/evaluate.py``'s work (``job.py``): its settings, target, job, reports (imports config, runfolder)."""
