"""A data set of your own code, registered from a module the runner imports (``data.plugin``).

``data.plugin=MODULE`` imports MODULE (from the current directory or ``PYTHONPATH``) before the
data-set registry is read; the module registers its data set with ``las_env.register_dataset``.
Run from the repository root::

    python experiments/run.py data.plugin=examples.my_data data.name=mine data.epochs=1 data.batch_size=16 logger=none

Facts the ``register_dataset`` call leaves out (grid, threat model, model, optimiser...) take the
defaults of ``las_env/datasets/registry.py::DatasetRecord``.
"""

import torch

from las_env import register_dataset
from las_env.data import ImageData


def load(root: str, download: bool) -> ImageData:
    """Any ImageData: float images in [0, 1] of shape (N, C, H, W), labels 0..K-1 (here random 8x8 grey)."""
    g = torch.Generator().manual_seed(0)
    return ImageData(name="mine", x_train=torch.rand(64, 1, 8, 8, generator=g), y_train=torch.arange(64) % 2,
                     x_test=torch.rand(16, 1, 8, 8, generator=g), y_test=torch.arange(16) % 2,
                     num_classes=2, class_names=["a", "b"], description="mine (random)")


register_dataset("mine", load)
