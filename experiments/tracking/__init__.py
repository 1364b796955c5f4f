"""Tracking: the run's loggers (log file, console, W&B) and PNG plots. May import ``las_env``, ``experiments.config``."""
