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

The training loop keeps the checkpoint before the latest as ``checkpoint.prev.pt``
(:func:`atomic_save` with ``keep_previous``), so a damaged latest file still leaves a state
to resume from; :func:`load_checkpoint` names a damaged file instead of a torch traceback.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from las_env.files import atomic_open, temp_path

FORMAT = "las-at/v1"


class CorruptCheckpointError(ValueError):
    """A checkpoint file that exists but cannot be read back (truncated, empty, not a torch file).

    Attributes:
        path: the damaged file.
        previous: the rotated previous checkpoint next to it, when one is kept (else ``None``).
    """

    def __init__(self, path: Path, reason: str, previous: Path | None) -> None:
        self.path, self.reason, self.previous = path, reason, previous
        size = path.stat().st_size if path.exists() else 0
        if previous is not None:
            advice = (f"The previous checkpoint is kept as {previous}: resume from it (a training run does so by "
                      f"itself with resume=true; to evaluate it, pass checkpoint={previous}), or delete the run "
                      f"folder to start over.")
        else:
            advice = (f"No previous checkpoint is kept next to it, so the run cannot continue: delete {path} (or "
                      f"the whole run folder) to start the run over.")
        super().__init__(f"The checkpoint {path} is damaged ({size} bytes; {reason}): it is not a complete torch "
                         f"file (cut short by a full disk or an unfinished copy, or another file under this name). "
                         f"{advice}")


def previous_path(path: Path) -> Path:
    """Where the checkpoint before ``path`` is kept: ``checkpoint.pt`` -> ``checkpoint.prev.pt``."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def atomic_save(obj: Any, path: str | Path, *, keep_previous: bool = False) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any moment leaves either the previous file or the new one, never a torn file.
    With ``keep_previous`` the file being replaced becomes :func:`previous_path` first, also
    atomically: it is hard-linked to a temporary name and renamed over the old previous one, so
    at every moment ``path`` holds a complete checkpoint and the previous one holds the one
    before (or, after a crash between the two renames, the same one).
    The file gets the usual permissions (0644 under umask 022), like every other output.
    """
    path = Path(path)
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
        if keep_previous and path.is_file():
            _rotate(path)
    return path


def _rotate(path: Path) -> None:
    prev, tmp = previous_path(path), temp_path(previous_path(path))
    try:
        os.link(path, tmp)
    except OSError:  # no hard links on this file system: a copy, still renamed into place atomically
        shutil.copyfile(path, tmp)
    os.replace(tmp, prev)


def _first_sentence(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    cut = text.find(". ")
    text = text[:cut] if cut > 0 else text.rstrip(".")
    return text if len(text) <= limit else text[:limit] + "..."


def _load(path: Path, map_location: str | torch.device) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise  # not damage: say what they say
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, KeyError,
            AttributeError, ImportError, IndexError, TypeError, UnicodeDecodeError) as exc:
        # torch.load's errors for damaged files: PytorchStreamReader (truncated zip), OSError
        # EINVAL (zip cut elsewhere), EOFError (empty), UnpicklingError (text or other bytes),
        # and whatever a mangled pickle raises.
        previous = previous_path(path)
        raise CorruptCheckpointError(path, f"{type(exc).__name__}: {_first_sentence(str(exc))}",
                                     previous if previous.is_file() and previous != path else None) from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a LAS-AT checkpoint; a clear error if the file is missing, damaged or not ours.

    Raises:
        FileNotFoundError: no such file.
        CorruptCheckpointError: the file cannot be read (names the file and what to do).
        ValueError: a readable file that is not a LAS-AT checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"No checkpoint at {path}. Pass the run directory or its checkpoint.pt "
            f"(a training run writes <run_dir>/checkpoint.pt after every epoch)."
        )
    ckpt = _load(path, map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a LAS-AT checkpoint (format {FORMAT!r}). For a plain state_dict, "
            f"name the architecture: state_dict=PATH model=NAME data=NAME."
        )
    return ckpt


def restore_generator(generator: torch.Generator, state: torch.Tensor) -> None:
    """Set ``generator`` to a saved state, also when the state comes from another device type.

    A CUDA generator's state (Philox: seed and offset, 16 bytes) cannot be set on a CPU
    generator (mt19937, 5056 bytes) nor the reverse. Random numbers never agree across device
    types anyway, so a checkpoint moved from one to the other continues from a seed derived
    from the saved state: deterministic for that checkpoint, not the uninterrupted run's stream.
    """
    state = state.detach().cpu()
    if state.numel() == generator.get_state().numel():
        generator.set_state(state)
        return
    digest = hashlib.sha256(state.numpy().tobytes()).digest()
    generator.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def state_fingerprint(module_or_tensors: nn.Module | Sequence[Tensor]) -> str:
    """SHA-256 (first 16 hex digits) of a model's state_dict or of tensors' bytes.

    Used to tie saved results and AutoAttack state files to the exact weights and images.
    """
    h = hashlib.sha256()
    if isinstance(module_or_tensors, nn.Module):
        items: list[tuple[str, Tensor]] = list(module_or_tensors.state_dict().items())
    else:
        items = [(str(i), t) for i, t in enumerate(module_or_tensors)]
    for key, t in items:
        h.update(key.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def export_state_dict(model: nn.Module, path: str | Path) -> Path:
    """Write the model's weights as a plain ``state_dict`` (tensors only, CPU, no prefix).

    This is what RobustBench's ``load_model(..., custom_checkpoint=PATH)`` and
    ``model.load_state_dict(torch.load(PATH))`` expect. Written atomically.
    """
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return atomic_save(state, path)


def _few(keys: set[str], shown: int = 4) -> str:
    ordered = sorted(keys)
    more = f" (+{len(ordered) - shown} more)" if len(ordered) > shown else ""
    return (", ".join(ordered[:shown]) or "none") + more


def load_plain_state_dict(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a plain ``state_dict`` file into ``model`` (strict), returning the model.

    Accepts a bare mapping of tensors, or one nested under ``"state_dict"`` / ``"model"``
    (common trainer conventions); a ``module.`` prefix (DataParallel) is removed.

    Raises:
        FileNotFoundError: no file. ValueError: a LAS-AT checkpoint, or keys/shapes that do not
        match the architecture (the message names the mismatches).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No state_dict file at {path}.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a plain state_dict"
        raise ValueError(
            f"{path} is not a plain state_dict (tensors only); if it is a LAS-AT checkpoint, "
            f"pass it as checkpoint=PATH. ({type(exc).__name__}: {exc})"
        ) from exc
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        raise ValueError(f"{path} is a LAS-AT checkpoint, not a plain state_dict: pass it as checkpoint=PATH.")
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state_dict (a mapping of parameter names to tensors).")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    missing, unexpected = model.state_dict().keys() - state.keys(), state.keys() - model.state_dict().keys()
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the architecture: missing keys {_few(missing)}; unexpected keys "
            f"{_few(unexpected)}. Check model= and data= (channels, classes)."
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path} does not fit the architecture: {exc}") from exc
    return model
