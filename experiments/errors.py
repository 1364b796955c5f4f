"""Bad input: one exception type for it, and the one-paragraph exit every command line uses.

The format, for ``experiments/run.py``, ``evaluate.py`` and ``compare.py`` alike (and for Hydra's
own failures, ``experiments/cli.py``): one line on stderr, ``las-at: error: <paragraph>``, the
paragraph naming the problem and a fix that works; no traceback.
"""

from __future__ import annotations

import sys

PREFIX = "las-at: error: "
"""How every command-line error starts (tests and scripts may match on it)."""

EXIT_BAD_INPUT = 1
"""Exit status of bad input reported before any work starts."""


class ConfigError(ValueError):
    """Bad input found before training starts; its message is the paragraph users see."""


class RunStopped(ConfigError):
    """A run stopped by a fault outside its settings (a full disk, Ctrl-C or SIGTERM, its folder
    taken or removed); the message says what is kept and how to continue. A :class:`ConfigError`,
    so every command shows it as the same one paragraph."""


def error_line(message: object) -> str:
    """``message`` as the one-line paragraph users see (whitespace and newlines folded)."""
    return PREFIX + " ".join(str(message).split())


def fail(message: object, code: int = EXIT_BAD_INPUT) -> None:
    """Print ``message`` as one paragraph on stderr and exit with ``code``, without a traceback.

    ``SystemExit`` is not an ``Exception``, so Hydra (which prints a traceback for those) lets
    it through unchanged.
    """
    sys.stderr.write(error_line(message) + "\n")
    sys.stderr.flush()
    raise SystemExit(code)
