"""Bad input: one exception type for it, and the one-paragraph exit used by the command line."""

from __future__ import annotations

import sys


class ConfigError(ValueError):
    """Bad input found before training starts; its message is the paragraph users see."""


def fail(message: str, code: int = 1) -> None:
    """Print ``message`` as one paragraph on stderr and exit with ``code``, without a traceback.

    ``SystemExit`` is not an ``Exception``, so Hydra (which prints a traceback for those) lets
    it through unchanged.
    """
    sys.stderr.write(f"las-at: error: {' '.join(str(message).split())}\n")
    sys.stderr.flush()
    raise SystemExit(code)
