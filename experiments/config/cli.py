"""Hydra's own failures before the task function runs (an unparsable override, an unknown option, an
unwritable folder) as the one-paragraph error with status 1; the task function's exceptions propagate
unchanged (a bug: its traceback helps), and ``HYDRA_FULL_ERROR=1`` gives Hydra's tracebacks."""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

from experiments.config.errors import fail


def _flat(text: object) -> str:
    return " ".join(str(text).split())


def hydra_message(exc: BaseException, program: str, conf_dir: Path, hints: dict[str, str] | None = None) -> str:
    """The paragraph for an exception Hydra raised before the task function ran."""
    command = f"python {program}"
    if isinstance(exc, OverrideParseException):
        detail = _flat(str(exc).split("\nSee ")[0])
        return (f"The command line cannot be parsed ({detail}). Overrides are key=value, group=option, "
                f"+new_key=value or ~key; quote a value with brackets, commas or spaces as a whole, e.g. "
                f"'eval.final_attacks=[clean,pgd20]'. Grammar: https://hydra.cc/docs/advanced/override_grammar/basic/")
    if isinstance(exc, MissingConfigException):
        missing = str(exc.missing_cfg_file or "")
        group, _, option = missing.rpartition("/")
        options = sorted(exc.options or []) or sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
        if group:
            what = f"{group}= needs an option" if not option else f"Unknown {group} option {option!r}"
            return (f"{what}. Valid choices for {group}=: {', '.join(options)} ({conf_dir.parent.name}/"
                    f"{conf_dir.name}/{group}/*.yaml), e.g. {group}={options[0] if options else 'NAME'}."
                    f"{(hints or {}).get(group, '')}")
        return f"A config file is missing ({_flat(exc)}). Check the group=option names on the command line."
    if isinstance(exc, ConfigCompositionException):
        match = re.search(r"Could not override '([^']+)'", str(exc))
        cause = _flat(exc.__cause__) if exc.__cause__ is not None else ""
        if match and ("not in struct" in cause or re.search(r"Key '[^']+' not in '", cause)):
            key = match.group(1)
            return (f"{key} is not a setting of {program} (check its spelling: `{command} --cfg job` "
                    f"lists every key). Only a key the config lacks (a setting of your own agent "
                    f"class, say) is added, with +{key}=VALUE.")
        typed = re.search(r"Value '(.*)' of type '\w+' could not be converted to (\w+)", cause)
        merged = re.search(r"Error merging override ([^=\s]+)=", str(exc))
        if (match or merged) and typed:  # OmegaConf checked the value against experiments/config/schema.py
            return (f"{(match or merged).group(1)}={typed.group(1)}: must be of type {typed.group(2)} (OmegaConf: "
                    f"{typed.group(0)}); `{command} --cfg job` shows every key's current value and type.")
        if match:
            return (f"{match.group(1)} cannot be set that way ({cause or _flat(exc)}). "
                    f"`{command} --cfg job` shows the key's current value and type.")
        return f"The configuration cannot be composed ({_flat(exc)}{'; ' + cause if cause else ''})."
    if isinstance(exc, OSError):
        where = exc.filename or "the output folder"
        return (f"{where} cannot be created or written ({exc.strerror or _flat(exc)}). Give "
                f"hydra.run.dir a writable folder (hydra.sweep.dir under -m), or drop it.")
    return (f"Hydra could not start {program} ({type(exc).__name__}: {_flat(exc)}). "
            f"Set HYDRA_FULL_ERROR=1 for the full traceback.")


def hydra_entry(main: Callable[[], Any], *, conf_dir: Path, hints: dict[str, str] | None = None) -> None:
    """Run the ``@hydra.main``-decorated ``main``; ``hints`` adds a sentence per group to an unknown option's message."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":  # the user asked for Hydra's tracebacks
        main()
        return
    task_code = getattr(main, "__wrapped__", main).__code__
    program = os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "this command"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing; we print
    try:
        main()
    except Exception as exc:  # noqa: BLE001 - each is either reported here or re-raised untouched
        if any(frame.f_code is task_code for frame, _ in traceback.walk_tb(exc.__traceback__)):
            raise  # raised inside the task function
        fail(hydra_message(exc, program, conf_dir, hints))  # Hydra's own status 1, the commands' "bad input"
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)
