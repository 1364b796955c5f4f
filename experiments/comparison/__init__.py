"""Comparing finished runs, one module per job (``experiments/compare.py`` is the command line)."""
