"""One importer for the dotted paths configs use to name classes (agents, SB3 algorithms, policies)."""

from __future__ import annotations

import importlib
from typing import Any


def import_object(path: str) -> Any:
    """``"pkg.module.Name"`` or ``"pkg.module:Name"`` (``Name`` may be ``Outer.Inner``) -> the object.

    Raises:
        ImportError: not a dotted path, the module cannot be imported, or it lacks the name. The
            callers turn it into their one-paragraph error; nothing is logged here (unlike Hydra's
            own locator, which logs before it raises).
    """
    if ":" in path:
        module_name, _, name = path.partition(":")
    else:
        module_name, _, name = path.rpartition(".")
    if not module_name or not name:
        raise ImportError(f"{path!r} is not an import path (package.module.Class or package.module:Class)")
    obj: Any = importlib.import_module(module_name)
    for part in name.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ImportError(f"module {module_name!r} has no attribute {name!r}") from None
    return obj
