"""The training loop: the game set up from finished settings, epochs of act / step / learn,
divergence guard, per-epoch evaluation and validation selection, torchrun, the final evaluation
and the run's result files.

May import: ``las_env``, ``agents``, ``evaluation``, ``experiments.config``,
``experiments.runfolder``, ``experiments.tracking``.
"""
