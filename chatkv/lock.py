"""One chatkv per data folder: an advisory lock so two running apps never overwrite each other's conversations.

The lock is ``flock`` on ``<folder>/.lock``. The kernel drops it when the process ends, however it ends
(crash, kill -9, power-off of the process), so a stale lock file never blocks the next launch; the file
itself is left in place on purpose, because deleting it would let a third process lock a different inode.
chatkv locks ``Paths.data``, the folder that holds the conversations.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from chatkv.paths import ensure_private_dir

LOCK_FILE_NAME = ".lock"


class DataDirLocked(Exception):
    """Another process holds the folder; the message says which and what the user can do."""

    def __init__(self, folder: Path, pid: int | None):
        self.folder = folder
        self.pid = pid
        who = f"Another chatkv (pid {pid})" if pid else "Another chatkv"
        super().__init__(
            f"{who} is using {folder}. Close it first, or start this one with "
            f"--data-dir <another folder> to keep a separate set of conversations."
        )


class DataDirUnusable(DataDirLocked):
    """The folder cannot be created or written (a file in its place, a read-only disk), so it cannot be locked.

    A kind of DataDirLocked so that every caller that explains a refused lock explains this one too.
    """

    def __init__(self, folder: Path, reason: str):
        self.folder = folder
        self.pid = None
        Exception.__init__(self, f"Cannot use {folder} for chatkv's data: {reason}. "
                                 f"Start chatkv with --data-dir <a folder you can write to>.")


class DataDirLock:
    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "DataDirLock":
        """Take the lock now or raise ``DataDirLocked`` (``DataDirUnusable`` if the folder cannot be written); never waits."""
        if self._fd is not None:
            return self
        try:
            ensure_private_dir(self.folder)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise DataDirUnusable(self.folder, exc.strerror or str(exc)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise DataDirLocked(self.folder, holder) from None
        except BaseException:
            os.close(fd)
            raise
        # the pid is only for the message another process shows; the flock is what excludes
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "DataDirLock":
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    # the holder may be between taking the lock and writing its pid, leaving the file empty for a moment
    return int(text) if text.isdigit() else None
