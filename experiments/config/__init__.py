"""Configuration: Hydra's config into complete, frozen run settings; the one error format, Hydra's failures
in it. May import ``las_env``, ``agents``, ``evaluation`` and this package; nothing else in ``experiments``."""
