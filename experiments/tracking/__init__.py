"""Tracking: the run's loggers (log file, console, offline W&B) and its PNG plots.

May import: ``las_env``, ``experiments.config``.
"""
