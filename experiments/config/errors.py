"""Bad input: one exception type for it, and the one exit every command line uses: one line on stderr,
``las-at: error: <paragraph naming the problem and a fix that works>``, no traceback.
"""

from __future__ import annotations

import sys


class ConfigError(ValueError):
    """Bad input found before training starts; its message is the paragraph users see."""


class RunStopped(ConfigError):
    """A run stopped by a fault outside its settings (a full disk, Ctrl-C or SIGTERM, its folder
    taken or removed); the message says what is kept and how to continue. A :class:`ConfigError`,
    so every command shows it as the same one paragraph."""


def fail(message: object, code: int = 1) -> None:
    """Print ``message`` as one paragraph on stderr and exit with ``code`` (1: bad input). ``SystemExit``
    is not an ``Exception``, so Hydra (which prints a traceback for those) lets it through."""
    sys.stderr.write("las-at: error: " + " ".join(str(message).split()) + "\n")  # whitespace folded: one line
    sys.stderr.flush()
    raise SystemExit(code)
