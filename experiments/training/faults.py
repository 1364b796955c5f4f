"""A full disk while writing, Ctrl-C and SIGTERM, each one paragraph saying what is kept (the atomic writes
leave the last good checkpoint in place)."""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from experiments.config.errors import RunStopped
from experiments.runfolder.runfiles import CHECKPOINT

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def resume_command() -> str:
    """The command that continues this run: this command line plus ``resume=true``."""
    argv = sys.argv
    if argv and Path(argv[0]).name == "run.py":
        args = [a for a in argv[1:] if not a.startswith("resume=")]
        return shlex.join(["python", os.path.relpath(argv[0]), *args, "resume=true"])
    return "the same command plus resume=true"


@contextmanager
def full_disk_stops(run_dir: Path, writing: str, needed: int) -> Iterator[None]:
    """A full disk inside the block ends in one paragraph naming the folder, free and ``needed`` bytes."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        try:
            free = shutil.disk_usage(run_dir).free
        except OSError:
            free = 0
        ckpt = run_dir / CHECKPOINT
        kept = (f"The last good checkpoint, {ckpt}, is kept unchanged" if ckpt.is_file()
                else "No epoch had been saved yet, so nothing is kept")
        raise RunStopped(
            f"The disk holding {run_dir} is full ({os.strerror(exc.errno or errno.ENOSPC)}) while writing {writing}: "
            f"{_mib(free)} free, about {_mib(needed)} needed. {kept} (writes are atomic: no file was left half "
            f"written). Free that much space on this disk, or move the run folder to a larger one, then resume "
            f"with `{resume_command()}`.") from None


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, like Ctrl-C's ``KeyboardInterrupt``."""


@contextmanager
def stop_on_interrupt(run_dir: Path) -> Iterator[None]:
    """Ctrl-C and SIGTERM (main thread only: where Python delivers signals) end in one paragraph naming the kept
    checkpoint and the command that resumes."""
    def terminate(signum: int, frame: FrameType | None) -> None:
        raise _Terminated()

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminate) if main else None
    try:
        yield
    except KeyboardInterrupt as exc:
        how = "SIGTERM" if isinstance(exc, _Terminated) else "Ctrl-C"
        ckpt = run_dir / CHECKPOINT
        kept = (f"the checkpoint of the last finished epoch, {ckpt}, is kept" if ckpt.is_file()
                else "no epoch had finished, so there is no checkpoint yet (resume=true then starts the run)")
        raise RunStopped(f"Interrupted ({how}): {kept}. Resume with `{resume_command()}`.") from None
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
