"""Training methods of the game (``method=pgd_at|trades|awp``): see :mod:`las_env.methods.base`.

Importing the package registers the built-in methods (each module registers itself).
"""

from las_env.methods.base import METHODS, MethodBatch, MethodConfig, MethodLoss, TrainingMethod, build_method, register_method
from las_env.methods.pgd_at import PGDAT
from las_env.methods.trades import TRADES, kl_per_image
from las_env.methods.awp import AWP

COLUMNS_METHODS_READ = frozenset((*PGDAT.reads, *TRADES.reads))
"""Strategy columns some method reads (AWP reads its base's): such a column in a grid whose method
does not read it is refused (``LASConfig``); any other extra column is the user's own, carried along."""

__all__ = ["AWP", "COLUMNS_METHODS_READ", "METHODS", "PGDAT", "TRADES", "MethodBatch", "MethodConfig", "MethodLoss",
           "TrainingMethod", "build_method", "kl_per_image", "register_method"]
