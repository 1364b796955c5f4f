"""One run per folder: ``<run_dir>/run.lock`` records its owner and is held with ``fcntl.flock`` (dropped by the
kernel when the owner dies: a stale lock is taken over). Without flock (``ENOLCK``) the record decides: a live
pid here, or another host's record. Symlinks are never followed."""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: records only
    fcntl = None  # type: ignore[assignment]

from experiments.config.errors import ConfigError, RunStopped
from experiments.runfolder.runfiles import BEST, LOG_FILE, RUN_FILES

LOCK_NAME = "run.lock"
NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)  # open fails (ELOOP) instead of following a symlink


def refuse_symlinks(run_dir: Path) -> None:
    """Raise :class:`ConfigError` when one of the run folder's own files is a symlink."""
    links = [name for name in (LOCK_NAME, LOG_FILE, BEST, *RUN_FILES) if (Path(run_dir) / name).is_symlink()]
    if links:
        raise ConfigError(
            f"The run directory {run_dir} holds symlinks where the run writes its own files ({', '.join(links)}): "
            f"writing through them would overwrite or append to the files they point at, so this run does not "
            f"start. Move each symlink out of the folder (e.g. mv {run_dir}/{links[0]} {run_dir}/{links[0]}.link; "
            f"what it points at stays as it is), or run in a fresh folder (change a setting, or set run_root).")


class RunLock(AbstractContextManager):
    """A run folder's lock, held until :meth:`release`; ``took_over``: the stale record it replaced, or None."""

    def __init__(self, path: Path, fd: int, took_over: dict[str, Any] | None) -> None:
        self.path, self._fd, self.took_over = path, fd, took_over

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        """Take the folder's lock or raise :class:`ConfigError` naming the live owner."""
        path = Path(run_dir) / LOCK_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        refuse_symlinks(path.parent)
        for _ in range(20):  # the file can be replaced between open and flock: retry on a new inode
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | NO_FOLLOW, 0o666)
            except OSError as exc:
                if exc.errno == errno.ELOOP:  # became a symlink since refuse_symlinks looked
                    refuse_symlinks(path.parent)
                raise
            try:
                held = _flock(fd)  # None: no flock on this file system, so the record decides
                replaced = held is not False and not _is_file_of(fd, path)  # its owner removed it as we opened it
                owner = _read(path)
                if not replaced and (held is False or (held is None and owner and _alive_here(owner))):
                    raise ConfigError(_refusal(path, owner))
            except BaseException:
                os.close(fd)
                raise
            if replaced:
                os.close(fd)
                continue
            record = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            os.fsync(fd)
            return cls(path, fd, owner if held and owner.get("pid") else None)
        raise ConfigError(f"Could not take the run lock {path}: it kept changing under us. Run the command again.")

    def verify(self) -> None:
        """Raise :class:`RunStopped` unless the folder and the lock are still this run's (before it writes again)."""
        assert self._fd is not None
        run_dir = self.path.parent
        if _is_file_of(self._fd, self.path):
            return
        owner = _read(self.path)
        now = ("no longer exists" if not run_dir.is_dir() else
               f"lost its lock {self.path}" + (f", which now names process {owner.get('pid', '?')} on host "
                                                f"{owner.get('host', '?')}" if owner else " (removed)"))
        self._fd, fd = None, self._fd
        os.close(fd)  # the lock is no longer ours to remove: release() leaves the file alone
        raise RunStopped(
            f"The run directory {run_dir} {now} while this run was training, so it stops here and writes nothing "
            f"more (another run, or a cleanup, took the folder; writing on would mix two runs). Check which "
            f"process uses {run_dir} now; once none does, continue with the same command plus resume=true.")

    def release(self) -> None:
        """Remove the lock file (unless another owner replaced it) and drop the lock; idempotent."""
        if self._fd is None:
            return
        try:
            if _is_file_of(self._fd, self.path):
                self.path.unlink(missing_ok=True)  # first unlink, then unlock: a waiter re-checks the inode
        finally:
            os.close(self._fd)
            self._fd = None

    def __exit__(self, *exc: object) -> None:
        self.release()


def _flock(fd: int) -> bool | None:
    """Take ``fd``'s exclusive flock: True, False while another process holds it, None without flock."""
    if fcntl is None:
        return None
    for _ in range(5):  # is_held() probes hold a shared lock for an instant: try again
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            time.sleep(0.02)
        except OSError as exc:
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                return None
            raise
    return False


def is_held(run_dir: Path) -> bool:
    """Whether a live process holds ``run_dir``'s lock now (a probe: takes nothing)."""
    try:
        fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDONLY | NO_FOLLOW)
    except OSError:  # no lock file (or a symlink): nobody holds it
        return False
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        pass
    finally:
        os.close(fd)  # closing drops the probe's shared lock, if it got one
    return False


def _is_file_of(fd: int, path: Path) -> bool:
    """Whether ``path`` (a symlink not followed) is still the file ``fd`` has open."""
    try:
        return os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
    except FileNotFoundError:
        return False


def _read(path: Path) -> dict[str, Any]:
    """The owner's record in the lock file (a symlink not followed), or {} when there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | NO_FOLLOW)
        try:
            record = json.loads(os.read(fd, 65536).decode() or "{}")
        finally:
            os.close(fd)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _alive_here(record: dict[str, Any]) -> bool:
    """Whether the record's owner may be alive: a live pid on this host, or another host's."""
    if record.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(record.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        pass
    return True


def _refusal(path: Path, owner: dict[str, Any]) -> str:
    who = (f"process {owner.get('pid', '?')} on host {owner.get('host', '?')}, started {owner.get('started', '?')}"
           + (f" (`{owner['command']}`)" if owner.get("command") else "")) if owner else "another process"
    return (f"The run directory {path.parent} is in use by {who}: two runs in one folder would write the same "
            f"checkpoint and logs. Wait for it to finish (or stop it), then run this command again (add "
            f"resume=true to continue its checkpoint); to run a second copy, change a setting such as seed=1 "
            f"(it gets a folder of its own). If that process is gone (a lock of another host cannot be checked from "
            f"here) and the message persists, move the stale lock aside: mv {path} {path}.stale.")
