"""Configuration: the composed Hydra config turned into complete, frozen run settings, the one
error format (``las-at: error: <paragraph>``) and Hydra's own failures in that format.

May import: ``las_env``, ``agents``, ``evaluation`` and this package; nothing else in ``experiments``.
"""
