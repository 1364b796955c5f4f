"""Bad input's exception and the one exit of every command: ``las-at: error: <paragraph>`` on stderr."""

from __future__ import annotations

import sys


class ConfigError(ValueError):
    """Bad input found before training starts; its message is the paragraph users see."""


class RunStopped(ConfigError):
    """A run stopped by a fault outside its settings (full disk, Ctrl-C, its folder taken): what is kept, how to go on."""


def fail(message: object, code: int = 1) -> None:
    """Print ``message`` as one paragraph on stderr, exit with ``code`` (``SystemExit`` passes through Hydra)."""
    sys.stderr.write("las-at: error: " + " ".join(str(message).split()) + "\n")  # whitespace folded: one line
    sys.stderr.flush()
    raise SystemExit(code)
