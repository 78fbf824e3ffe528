"""Read a file a user (or an attacker) can put in our folders without hanging, following links or running out of memory.

Conversations, UI state, themes and the config file all come through here: a FIFO named like one of them
must not block the app, a symlink must not make it read another file, and a huge file is refused, not loaded.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


class UnreadableFile(Exception):
    """A stored file that cannot be used; ``reason`` says why, in words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def read_capped(path: Path, max_bytes: int, follow_symlinks: bool = False) -> bytes:
    """The bytes of a regular file no bigger than ``max_bytes``; ``UnreadableFile`` for anything else.

    Files chatkv writes itself are never links, so by default a symlink is refused: one planted in the data
    folder must not make us read (and later show) another file. Files the user writes (config, themes) are
    often links into a dotfiles repository, so those callers follow them.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK  # O_NONBLOCK: opening a FIFO named like our file must not hang the app
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnreadableFile("it is a symbolic link, not a file") from None
        if exc.errno == errno.ENOENT:
            raise
        raise UnreadableFile(f"cannot be opened ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableFile("it is not a regular file")
        if info.st_size > max_bytes:
            raise UnreadableFile(f"it is too large ({human_size(info.st_size)}, the limit is {human_size(max_bytes)})")
        chunks = []
        remaining = max_bytes + 1  # the file may grow after fstat; never read past the cap
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1024**2))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    except OSError as exc:
        raise UnreadableFile(f"cannot be read ({exc.strerror})") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise UnreadableFile(f"it is too large (over {human_size(max_bytes)})")
    return data


def human_size(size: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
