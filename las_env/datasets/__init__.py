"""Data sets: the registry of their facts, the built-in records, and the user-data loaders.

``register_dataset`` adds one; ``lookup`` gives its :class:`DatasetRecord`; ``load_dataset``
loads it into an :class:`las_env.data.ImageData`.
"""

from las_env.datasets.registry import (
    DatasetRecord,
    dataset_names,
    is_registered,
    load_dataset,
    lookup,
    register_dataset,
)

__all__ = ["DatasetRecord", "dataset_names", "is_registered", "load_dataset", "lookup", "register_dataset"]
