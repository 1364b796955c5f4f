"""The data-set registry: one :class:`DatasetRecord` per data set, the single source of its facts.

A record says how to load a data set and every default that depends on it: the strategy grid,
the evaluation threat model, the PGD-AT attack, the target model and strategy backbone, the
target's optimiser and schedule, and augmentation. Everything else (``lookup(name).grid``,
``lookup(name).threat``, the game's and the agents' defaults, the command line's ``data=`` choices)
reads the record. Adding a data set is one :func:`register_dataset` call::

    import las_env
    las_env.register_dataset("mine", loader=lambda root, download: my_image_data())
    env = gymnasium.make("LAS-v0", dataset="mine")
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from las_env.optim import OptimConfig
from las_env.strategy_space import StrategySpace

if TYPE_CHECKING:
    from las_env.data import ImageData

Loader = Callable[[Path, bool], "ImageData"]
"""``(root, download) -> ImageData``: ``root`` is the folder (or file) the user named with
``data.root`` / ``data.path``; ``download`` allows fetching missing files."""

SMALL_IMAGE_MODEL = "small_cnn"
LARGE_IMAGE_MODEL = "resnet18"
LARGE_FROM_PX = 32
"""Size rule of records without a fixed model: resnet18 when the shorter image side is at least
32 px, small_cnn below (resnet18's strides need the room); the same rule switches augmentation on."""

@dataclass(frozen=True)
class ThreatModel:
    """The evaluation threat model of a data set: L-infinity ball of radius ``epsilon``.

    ``step_size`` is the PGD step used by evaluation and by the L2 reward probe
    (2/255 for CIFAR's 8/255, i.e. epsilon / 4).
    """

    epsilon: float
    step_size: float
    description: str


CIFAR_THREAT = ThreatModel(8 / 255, 2 / 255, "L-inf eps=8/255")
"""The CIFAR threat model, also the default of records that do not name one (user data)."""


def inclusive_range(start: int, stop: int, scale: float = 1.0) -> tuple[float, ...]:
    """``start .. stop`` inclusive, times ``scale`` (a grid column; the YAML spells it {start, stop, scale})."""
    return tuple(v * scale for v in range(start, stop + 1))


# The authors' grid (SPEC section 2), in /255 units, inclusive; also the default of user data.
CIFAR10_GRID = StrategySpace(inclusive_range(1, 5, 1 / 255), tuple(range(3, 15)), inclusive_range(3, 15, 1 / 255))


@dataclass(frozen=True)
class DatasetRecord:
    """Everything the project knows about one data set.

    Attributes:
        name: the registered name (``"cifar10"``; the command line also accepts ``_`` for ``-``).
        loader: ``(root, download) -> ImageData``.
        grid: the default strategy grid (``data.grid.*`` overrides each column).
        threat: the evaluation threat model (epsilon and PGD step size, pixel units).
        fixed_iterations: PGD-AT's attack is the threat model's epsilon and step size with this
            many iterations (``agent=fixed``; ``data.fixed_attack.*`` overrides).
        model: the default target architecture; ``None``: by image size (:data:`LARGE_FROM_PX`).
        backbone: the default strategy-network backbone; ``None``: by image size, like ``model``.
        optim: the target's default optimiser and schedule (``data.optim.*`` overrides).
        augment: crop + flip on the device; ``None``: on for images of 32 px and more.
        channels, height, width, classes: the shape of the data when known before loading
            (``None`` for user data, known once loaded); documentation and quick checks.
        needs_path: the loader reads the file or folder of ``data.path`` (user data).
        description: one line for listings and messages.
    """

    name: str
    loader: Loader
    grid: StrategySpace = CIFAR10_GRID
    threat: ThreatModel = CIFAR_THREAT
    fixed_iterations: int = 10
    model: str | None = None
    backbone: str | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: bool | None = None
    channels: int | None = None
    height: int | None = None
    width: int | None = None
    classes: int | None = None
    needs_path: bool = False
    description: str = ""

    @property
    def fixed_attack(self) -> tuple[float, int, float]:
        """PGD-AT's attack ``(step_size, iterations, epsilon)``."""
        return self.threat.step_size, self.fixed_iterations, self.threat.epsilon

    def model_for(self, height: int, width: int) -> str:
        """The default target architecture for images of ``height x width``."""
        return self.model or _by_size(height, width)

    def backbone_for(self, height: int, width: int) -> str:
        """The default strategy backbone for images of ``height x width``."""
        return self.backbone or _by_size(height, width)

    def augment_for(self, height: int, width: int) -> bool:
        """Whether crop + flip is on by default for images of ``height x width``."""
        return self.augment if self.augment is not None else min(height, width) >= LARGE_FROM_PX


def _by_size(height: int, width: int) -> str:
    return LARGE_IMAGE_MODEL if min(height, width) >= LARGE_FROM_PX else SMALL_IMAGE_MODEL


_RECORDS: dict[str, DatasetRecord] = {}


def _key(name: str) -> str:
    return str(name).lower().replace("_", "-")


def register_dataset(name: str | DatasetRecord, loader: Loader | None = None, *, replace: bool = False,
                     **facts) -> DatasetRecord:
    """Add a data set to the registry (``name, loader`` plus any :class:`DatasetRecord` field,
    or a ready record). Unnamed facts take the user-data defaults: the CIFAR grid, L-inf 8/255
    with step 2/255, PGD-AT 10 steps of 2/255, resnet18 for images of 32 px or more and
    small_cnn below, SGD 0.1 with the authors' piecewise schedule.

    Raises:
        ValueError: the name is taken (pass ``replace=True`` to redefine it), or no loader.
    """
    if isinstance(name, DatasetRecord):
        record = name
    else:
        if loader is None:
            raise ValueError(f"register_dataset({name!r}): give loader=(root, download) -> ImageData.")
        record = DatasetRecord(name=_key(name), loader=loader, **facts)
    key = _key(record.name)
    if key in _RECORDS and not replace:
        raise ValueError(f"A data set named {key!r} is already registered; pass replace=True to redefine it.")
    _RECORDS[key] = record
    return record


def dataset_names() -> tuple[str, ...]:
    """The registered names, built-in first, in registration order."""
    return tuple(_RECORDS)


def lookup(name: str) -> DatasetRecord:
    """The record of a data set (``_`` and ``-`` are the same; case is ignored).

    Raises:
        KeyError: no such data set; the message lists the registered names.
    """
    key = _key(name)
    if key not in _RECORDS:
        raise KeyError(f"Unknown data set {name!r}; valid names are: {', '.join(_RECORDS)}.")
    return _RECORDS[key]


def is_registered(name: str) -> bool:
    """Whether :func:`lookup` knows ``name``."""
    return _key(name) in _RECORDS


def load_dataset(name: str, root: str | Path = "data", download: bool = True) -> ImageData:
    """Load a registered data set whole into memory as :class:`ImageData`.

    Args:
        name: a registered name (:func:`dataset_names`).
        root: the folder holding the data set folders (``cifar-10-batches-py`` etc.), or the
            file / folder of a user data set (``data.path``). Relative: to the working directory.
        download: when the files are missing, fetch them with torchvision if it imports.

    Raises:
        ValueError: ``name`` is not registered.
        DatasetNotFoundError: the files are absent and could not be fetched.
        DataError: the files are there but their content is unusable.
    """
    try:
        record = lookup(name)
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None
    return record.loader(Path(root).expanduser(), download)
