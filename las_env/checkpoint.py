"""Checkpoint files: written atomically, read back safely with their metadata.

A LAS-AT checkpoint is a ``torch.save``d dict::

    {
      "format": "las-at/v1",
      "meta":   {"dataset", "data_root", "model", "in_channels", "num_classes", "data_fingerprint",
                 "run_dir", "wandb": {"id", "project", "group", "mode", "dir"} | None},
      "target": state_dict of the target network,
      ...       training state (game, agent, loop) used by resume
    }

It holds tensors and plain Python values only, so every read is ``torch.load(weights_only=True)``:
a file whose pickle names anything else (a payload that would run code) is refused as
:class:`NotACheckpointError` before any of it runs. A plain ``state_dict`` file (the RobustBench
convention) holds the target's weights only.

The training loop keeps the checkpoint before the latest as ``checkpoint.prev.pt``
(:func:`atomic_save` with ``keep_previous``), so a damaged latest file still leaves a state
to resume from; :func:`load_checkpoint` names a damaged file instead of a torch traceback.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from las_env.files import atomic_open, temp_path

FORMAT = "las-at/v1"
TRAINING_KEYS = ("meta", "target", "env", "agent", "loop", "config")
"""What every checkpoint a training run writes holds besides the mark (resume and init_from read them all)."""
TORCH_FILE_MAGIC = b"PK\x03\x04"
"""How every file ``torch.save`` writes starts (a zip archive)."""
WEIGHTS_ONLY_REFUSALS = ("GLOBAL ", "Can only ", "unrecognized function")
"""How torch's weights-only unpickler words a refused object (a name, a constructor, a call), as
opposed to bytes it cannot parse (damage)."""
PROJECT_CHECKPOINTS = ("checkpoint.pt", "checkpoint.prev.pt", "best.pt")
"""The checkpoint names a training run writes in its folder: the only files a message may advise deleting."""
LEGACY_NUMPY_GLOBALS = [np.zeros(0).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]
"""What checkpoints written before the RNG states became tensors also hold (numpy's RNG state, a
uint32 array: numpy's array rebuilder, whichever module holds it, the array and dtype types):
allowed, exactly these, so those runs still resume. An object array would need more."""


class NotACheckpointError(ValueError):
    """A file that is not a LAS-AT checkpoint: another kind of file, or a pickle naming Python
    objects a checkpoint never holds (refused before any of them is built)."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        super().__init__(f"{path} is not a LAS-AT checkpoint: {reason}. Nothing in it was run or used. Pass the "
                         f"run folder a training run printed (it holds checkpoint.pt), or its checkpoint.pt; a "
                         f"plain state_dict is evaluated with state_dict=PATH model=NAME data=NAME.")


class CorruptCheckpointError(ValueError):
    """A checkpoint file that exists but cannot be read back (truncated, empty).

    Attributes:
        path: the damaged file.
        previous: the rotated previous checkpoint next to it, when one is kept (else ``None``).
    """

    def __init__(self, path: Path, reason: str, previous: Path | None) -> None:
        self.path, self.reason, self.previous = path, reason, previous
        size = path.stat().st_size if path.exists() else 0
        if previous is not None:
            advice = (f"The previous checkpoint is kept as {previous}: resume from it (a training run does so by "
                      f"itself with resume=true; to evaluate it, pass checkpoint={previous}).")
        elif is_run_checkpoint(path):
            advice = (f"No previous checkpoint is kept next to it, so the run cannot continue from it: delete {path} "
                      f"(a file this project wrote) and run the command again to start the run over.")
        else:
            advice = "Copy the file again from where it came from."
        super().__init__(f"The checkpoint {path} is damaged ({size} bytes; {reason}): it is not a complete torch "
                         f"file (cut short by a full disk or an unfinished copy). {advice}")


def is_run_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a checkpoint a training run wrote in its run folder (its name is one
    of :data:`PROJECT_CHECKPOINTS` and the folder holds a run's ``.hydra`` record or ``log.txt``)."""
    folder = path.parent
    return path.name in PROJECT_CHECKPOINTS and ((folder / ".hydra").is_dir() or (folder / "log.txt").is_file())


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


def read_torch_file(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)`` of a file this project wrote (checkpoint, ``best.pt``), with
    every failure named: not a torch file, a pickle that names other Python objects
    (:class:`NotACheckpointError`, refused before any of it is built), or damage
    (:class:`CorruptCheckpointError`)."""
    with open(path, "rb") as f:
        head = f.read(len(TORCH_FILE_MAGIC))
    # Anything but the zip mark is another kind of file; zero bytes there are what a crash leaves
    # (damage, reported below).
    if len(head) == len(TORCH_FILE_MAGIC) and head != TORCH_FILE_MAGIC and head.strip(b"\x00"):
        raise NotACheckpointError(path, f"it is not a file torch.save writes (it starts with {head!r})")
    try:
        with torch.serialization.safe_globals(LEGACY_NUMPY_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise  # not damage: say what they say
    except pickle.UnpicklingError as exc:
        if not any(refusal in str(exc) for refusal in WEIGHTS_ONLY_REFUSALS):  # e.g. "Unsupported operand"
            raise _damaged(path, exc) from None
        raise NotACheckpointError(path, f"its pickle names {_refused_name(exc)}, which a checkpoint (tensors and "
                                  f"plain values) never holds, so it was refused unread (a file made to run code "
                                  f"when loaded looks like this)") from None
    except (OSError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError, AttributeError, ImportError,
            IndexError, TypeError, UnicodeDecodeError) as exc:
        # torch.load's errors for damaged files: PytorchStreamReader (truncated zip), OSError
        # EINVAL (zip cut elsewhere), EOFError (empty), and whatever a mangled archive raises.
        raise _damaged(path, exc) from None


def _refused_name(exc: BaseException) -> str:
    """The Python object a weights-only load refused, as its message names it."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return f"`{found.group(1)}`" if found else "a Python object"


def _damaged(path: Path, exc: BaseException) -> CorruptCheckpointError:
    previous = previous_path(path)
    detail = _first_sentence(str(exc))
    return CorruptCheckpointError(path, f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__,
                                  previous if previous.is_file() and previous != path else None)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a LAS-AT checkpoint; a clear error if the file is missing, damaged or not ours.

    Raises:
        FileNotFoundError: no such file.
        CorruptCheckpointError: the file cannot be read (names the file and what to do).
        NotACheckpointError: a file that is not a LAS-AT checkpoint (including one whose pickle
            names anything but tensors and plain values: it is refused unread).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"No checkpoint at {path}. Pass the run directory or its checkpoint.pt "
            f"(a training run writes <run_dir>/checkpoint.pt after every epoch)."
        )
    ckpt = read_torch_file(path, map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise NotACheckpointError(path, f"it is a torch file without the format mark {FORMAT!r} (a plain state_dict "
                                  f"or another tool's file)")
    return ckpt


def require_keys(ckpt: Mapping[str, Any], path: Path, keys: Sequence[str]) -> None:
    """Raise :class:`NotACheckpointError` naming the keys of ``keys`` that ``ckpt`` lacks."""
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise NotACheckpointError(path, f"it carries the format mark {FORMAT!r} but lacks {missing}, which every "
                                  f"checkpoint a training run writes holds (a file put together by hand, or cut "
                                  f"down)")


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

    Used to tie saved results and AutoAttack state files to the exact weights and images, and a
    checkpoint to the data it trained on (:func:`data_fingerprint`). Hashes each tensor's memory
    in place (no copy).
    """
    h = hashlib.sha256()
    if isinstance(module_or_tensors, nn.Module):
        items: list[tuple[str, Tensor]] = list(module_or_tensors.state_dict().items())
    else:
        items = [(str(i), t) for i, t in enumerate(module_or_tensors)]
    for key, t in items:
        h.update(key.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:16]


def data_fingerprint(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor) -> str:
    """The content hash of a loaded data set's four arrays (:func:`state_fingerprint`), which a
    checkpoint records (``meta["data_fingerprint"]``) so that a resume on other data is refused."""
    return state_fingerprint([x_train, y_train, x_test, y_test])


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
        why = (f"its pickle names {_refused_name(exc)}, refused unread"
               if any(refusal in str(exc) for refusal in WEIGHTS_ONLY_REFUSALS)
               else f"{type(exc).__name__}: {_first_sentence(str(exc))}")
        raise ValueError(f"{path} is not a plain state_dict (tensors only; {why}); if it is a LAS-AT checkpoint, "
                         f"pass it as checkpoint=PATH.") from None
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
