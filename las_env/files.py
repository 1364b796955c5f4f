"""The one writer of each kind of output file: atomic text, strict JSON, and their permissions.

**Strict JSON.** Every ``.json`` file this project writes is strict JSON (RFC 8259: no bare
``NaN``/``Infinity``, which Python's ``json`` writes by default and strict parsers reject).
The convention, in one place (:func:`strict_json`): a non-finite float is written as ``null``,
and the document gets a top-level ``"nonfinite"`` object mapping the JSON Pointer (RFC 6901)
of each such value to what it was (``"nan"``, ``"inf"`` or ``"-inf"``). A document without
non-finite values has no ``"nonfinite"`` key. So ``null`` alone means "absent / not measured",
and ``null`` listed in ``"nonfinite"`` means "the number was NaN or infinite".

**Permissions.** Files are created with mode ``0666`` minus the umask (``0644`` under the usual
``022``), like any file a program opens for writing; ``tempfile.mkstemp`` would make them
``0600``, private to their owner, unlike every other output of a run.

**Temporary files.** An atomic write goes through ``.<name>.<pid>.t<random hex>.tmp`` in the same
folder. A killed writer leaves its temporary file behind; :func:`stale_temp_files` finds those
of processes that are no longer running, for the next run to remove.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

NONFINITE_KEY = "nonfinite"
"""Top-level key of a strict JSON document listing the values written as null (see above)."""

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)(?:\.t[0-9a-f]+)?\.tmp$")


def temp_path(path: Path) -> Path:
    """The temporary name an atomic write of ``path`` uses (unique per process and call)."""
    return path.with_name(f".{path.name}.{os.getpid()}.t{secrets.token_hex(4)}.tmp")


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success fsync and rename it over ``path``.

    A crash at any moment leaves either the previous file or the new one, never a torn one;
    on an exception the temporary file is removed. The file gets the usual permissions.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0666 & ~umask, like open()
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "w") as f:
        f.write(text)


def strict_json(obj: Any) -> tuple[Any, dict[str, str]]:
    """``obj`` with every non-finite float replaced by ``None``, and the JSON Pointer of each
    replaced value mapped to ``"nan"``/``"inf"``/``"-inf"``. Tuples become lists."""
    found: dict[str, str] = {}

    def walk(value: Any, pointer: str) -> Any:
        if isinstance(value, float):
            if math.isfinite(value):
                return value
            found[pointer] = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
            return None
        if isinstance(value, dict):
            return {k: walk(v, f"{pointer}/{_escape(str(k))}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{pointer}/{i}") for i, v in enumerate(value)]
        return value

    return walk(obj, ""), found


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def dumps_json(doc: dict[str, Any], *, indent: int | None = 1, sort_keys: bool = False,
               default: Callable[[Any], Any] | None = None) -> str:
    """``doc`` as strict JSON text (the convention above), ending in a newline."""
    if default is not None:  # apply it first, so what it returns is checked too
        doc = json.loads(json.dumps(doc, default=default, allow_nan=True))
    clean, found = strict_json(doc)
    if found:
        clean[NONFINITE_KEY] = found
    return json.dumps(clean, indent=indent, sort_keys=sort_keys, allow_nan=False) + "\n"


def write_json(path: str | Path, doc: dict[str, Any], *, indent: int | None = 1, sort_keys: bool = False,
               default: Callable[[Any], Any] | None = None) -> Path:
    """Write ``doc`` to ``path`` as strict JSON, atomically. The one JSON writer of the project."""
    atomic_write_text(path, dumps_json(doc, indent=indent, sort_keys=sort_keys, default=default))
    return Path(path)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def stale_temp_files(folder: Path, names: Iterable[str] | None = None, *, any_writer: bool = False) -> list[Path]:
    """Temporary files of atomic writes in ``folder`` whose writer is gone.

    Args:
        names: only temporaries of these file names (``checkpoint.pt``...); ``None``: all.
        any_writer: also those of live processes and those without a pid in their name (the
            caller holds the folder's run lock, so no live process writes these names).
    """
    wanted = None if names is None else set(names)
    out = []
    if not folder.is_dir():
        return out
    for p in folder.iterdir():
        m = _TEMP.match(p.name)
        legacy = re.match(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$", p.name)  # mkstemp's names (older versions)
        name = m["name"] if m else (legacy["name"] if legacy else None)
        if name is None or (wanted is not None and name not in wanted) or not p.is_file():
            continue
        if any_writer or (m and not _alive(int(m["pid"]))):
            out.append(p)
    return out
