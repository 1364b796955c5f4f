"""Training methods of the game (``method=pgd_at|trades|awp``): see :mod:`las_env.methods.base`."""

from las_env.methods.awp import AWP
from las_env.methods.base import METHODS, MethodBatch, MethodConfig, MethodLoss, TrainingMethod
from las_env.methods.pgd_at import PGDAT
from las_env.methods.trades import TRADES, kl_per_image


def build_method(cfg: MethodConfig) -> TrainingMethod:
    """The method ``cfg`` names (AWP around its ``awp_base``)."""
    base: TrainingMethod = TRADES(cfg.trades_beta) if cfg.loss_name == "trades" else PGDAT()
    if cfg.name == "awp":
        return AWP(base, cfg.awp_gamma, cfg.awp_warmup_epochs, cfg.awp_proxy_lr,
                   proxy_loss=cfg.awp_proxy_loss, clean_forward=cfg.awp_clean_forward)
    return base


__all__ = ["AWP", "METHODS", "PGDAT", "TRADES", "MethodBatch", "MethodConfig", "MethodLoss", "TrainingMethod",
           "build_method", "kl_per_image"]

COLUMNS_METHODS_READ = frozenset((*PGDAT.reads, *TRADES.reads))
"""Strategy columns some method reads (AWP reads its base's): such a column in a grid whose method
does not read it is refused (``LASConfig``); any other extra column is the user's own, carried along."""
__all__.append("COLUMNS_METHODS_READ")
