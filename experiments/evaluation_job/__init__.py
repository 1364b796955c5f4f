"""``experiments/evaluate.py``'s work, one module per job.

- :mod:`~experiments.evaluation_job.settings`: the command line validated (:func:`parse_settings`).
- :mod:`~experiments.evaluation_job.target`: the network from a checkpoint or a plain state_dict.
- :mod:`~experiments.evaluation_job.reports`: report names, merging with earlier reports, W&B.
- :mod:`~experiments.evaluation_job.job`: :func:`prepare` (load, export) and :func:`execute`
  (attack, check, write, print).
"""
