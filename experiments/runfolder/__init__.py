"""Run folders: their file names and formats, the folder a command's settings map to, the one-run
lock, and what a run finds there at start (checkpoint to resume, leftovers, ``init_from``).

May import: ``las_env`` and ``experiments.config``.
"""
