"""The built-in data sets' records: one :func:`register_dataset` call each.

Values are the authors' where they have one (SPEC section 2: the grids, 8/255 with PGD step
2/255, PGD-AT 10 steps, SGD 0.1 / momentum 0.9 / weight decay 5e-4 with lr x0.1 at epochs 99
and 104 of 110); digits, our offline demo, has its own (see docs/environment.md, "Threat models and strategy grids").
``npz`` and ``folder`` are the user-data paths (:mod:`las_env.datasets.user`).
"""

from __future__ import annotations

from functools import partial

from las_env.datasets import loaders, user
from las_env.datasets.registry import CIFAR10_GRID, CIFAR_THREAT, ThreatModel, inclusive_range, register_dataset
from las_env.optim import OptimConfig
from las_env.strategy_space import StrategySpace

CIFAR100_GRID = StrategySpace(inclusive_range(1, 5, 1 / 255), tuple(range(3, 13)), inclusive_range(3, 15, 1 / 255))
# Digits (8x8, 17 grey levels): the evaluation radius is 0.2 (see docs/environment.md's threat-model
# section); the grid spans weak to strong attacks around it, as the CIFAR grid spans 3..15/255
# around 8/255; the step sizes 0.025..0.125 hold the evaluation step 0.05 = eps/4 at
# index 1, as CIFAR's 1..5/255 hold 2/255.
DIGITS_GRID = StrategySpace(
    step_sizes=(0.025, 0.05, 0.075, 0.1, 0.125),
    iterations=(1, 2, 3, 4, 5, 6, 7, 8),
    epsilons=(0.05, 0.10, 0.15, 0.20, 0.25, 0.30),
)
AUTHORS_OPTIM = OptimConfig(lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="piecewise",
                            milestones=(0.9, 0.9454545454545454), gamma=0.1)  # epochs 99/110 and 104/110
"""The authors' target training (SPEC section 2); label smoothing off (the presets set theirs)."""

register_dataset(
    "digits", lambda _root, _download: loaders._load_digits(),
    grid=DIGITS_GRID, threat=ThreatModel(0.2, 0.05, "L-inf eps=0.2 (digits)"), fixed_iterations=5,
    model="small_cnn", backbone="small_cnn",
    # Cosine over the short demo budget; the milestones only matter with schedule=piecewise.
    optim=OptimConfig(lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine", milestones=(0.5, 0.75), gamma=0.1),
    channels=1, height=8, width=8, classes=10,
    description="scikit-learn's 8x8 handwritten digits (1347 train / 450 test), offline",
)
register_dataset(
    "cifar10", partial(loaders._load_cifar, cifar100=False), grid=CIFAR10_GRID, threat=CIFAR_THREAT,
    model="resnet18", backbone="resnet18", optim=AUTHORS_OPTIM, channels=3, height=32, width=32, classes=10,
    description="CIFAR-10, root/cifar-10-batches-py (the 'python version')",
)
register_dataset(
    "cifar100", partial(loaders._load_cifar, cifar100=True), grid=CIFAR100_GRID, threat=CIFAR_THREAT,
    model="resnet18", backbone="resnet18", optim=AUTHORS_OPTIM, channels=3, height=32, width=32, classes=100,
    description="CIFAR-100, root/cifar-100-python",
)
register_dataset(
    "svhn", loaders._load_svhn, grid=CIFAR10_GRID, threat=CIFAR_THREAT,
    model="resnet18", backbone="resnet18", optim=AUTHORS_OPTIM, channels=3, height=32, width=32, classes=10,
    description="SVHN cropped digits, root/svhn/{train,test}_32x32.mat",
)
register_dataset(
    "gtsrb", loaders._load_gtsrb, grid=CIFAR10_GRID, threat=CIFAR_THREAT,
    model="resnet18", backbone="resnet18", optim=AUTHORS_OPTIM, channels=3, height=32, width=32, classes=43,
    description="GTSRB via torchvision, resized to 32x32 (root/gtsrb)",
)
register_dataset(
    "tiny-imagenet", loaders._load_tiny_imagenet, grid=CIFAR10_GRID, threat=CIFAR_THREAT,
    model="preact_resnet18", backbone="resnet18", optim=AUTHORS_OPTIM, channels=3, height=64, width=64,
    classes=200, description="Tiny-ImageNet 64x64, root/tiny-imagenet-200",
)
# User data: every default is the registry's user-data default (CIFAR grid, L-inf 8/255, PGD-AT
# 10 steps of 2/255, resnet18 for >= 32 px and small_cnn below), overridable on the command line.
register_dataset(
    "npz", user.load_npz, needs_path=True, optim=AUTHORS_OPTIM,
    description="your own .npz (data.path=FILE: x_train, y_train, x_test, y_test, optional class_names)",
)
register_dataset(
    "folder", user.load_folder, needs_path=True, optim=AUTHORS_OPTIM,
    description="your own image folder (data.path=DIR: train/<class>/*.png, test/<class>/*.png)",
)
