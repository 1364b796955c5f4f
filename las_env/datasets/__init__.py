"""Data sets: the registry of their facts, the built-in records, and the user-data loaders.

``register_dataset`` adds one; ``lookup`` gives its :class:`DatasetRecord`; ``load_dataset``
loads it into an :class:`las_env.data.ImageData`. Importing the package registers the built-in
records (:mod:`las_env.datasets.builtin`), so every import of the registry sees them.
"""

from las_env.datasets.registry import (
    DatasetRecord,
    ThreatModel,
    dataset_names,
    is_registered,
    load_dataset,
    lookup,
    register_dataset,
)
from las_env.datasets import builtin  # noqa: E402, F401 - registers the built-in records, after the registry

__all__ = ["DatasetRecord", "ThreatModel", "dataset_names", "is_registered", "load_dataset", "lookup", "register_dataset"]
