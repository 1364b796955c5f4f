"""Checkpoint files: written atomically, read back with their metadata.

A LAS-AT checkpoint is a ``torch.save``d dict::

    {
      "format": "las-at/v1",
      "meta":   {"dataset", "data_root", "model", "in_channels", "num_classes",
                 "run_dir", "wandb": {"id", "project", "group", "mode", "dir"} | None},
      "target": state_dict of the target network,
      ...       training state (game, agent, loop) used by resume
    }

A plain ``state_dict`` file (the RobustBench convention) holds the target's weights only.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "las-at/v1"


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any moment leaves either the previous file or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a LAS-AT checkpoint; a clear error if the file is missing or not ours."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"No checkpoint at {path}. Pass the run directory or its checkpoint.pt "
            f"(a training run writes <run_dir>/checkpoint.pt after every epoch)."
        )
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a LAS-AT checkpoint (format {FORMAT!r}). For a plain state_dict, "
            f"name the architecture: state_dict=PATH model=NAME data=NAME."
        )
    return ckpt
