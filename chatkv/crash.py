"""What happens after an error nobody caught: the traceback goes to a log file, the user gets one line.

A crash must never look like success (exit status 0), and a traceback must never be the user's only
explanation. ``write_crash_log`` writes the full traceback to ``crash-<UTC time>.log`` in the data
folder (private, like every chatkv file); ``crash_summary`` is the one line that names the error and
that file. The TUI, headless mode and the ``chatkv`` command all end a crash this way, with exit
status 1 (``CRASH_EXIT_CODE``).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

from chatkv import __version__
from chatkv.paths import ensure_private_dir

CRASH_EXIT_CODE = 1
CRASH_LOG_PREFIX = "crash-"


def write_crash_log(folder: Path, error: BaseException) -> Path | None:
    """Write ``error``'s traceback, with the chatkv and Python versions, to a new file in ``folder``.

    Returns the file's path, or None when it could not be written (the folder is read-only, say):
    a crash report must not raise a second error.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    lines = [f"chatkv {__version__}, Python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}\n\n",
             *traceback.format_exception(error)]
    try:
        ensure_private_dir(folder)
        for attempt in range(100):
            path = Path(folder) / f"{CRASH_LOG_PREFIX}{stamp}{'' if attempt == 0 else f'-{attempt}'}.log"
            try:
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
            with os.fdopen(descriptor, "w", encoding="utf-8", errors="backslashreplace") as log:
                log.writelines(lines)
            return path
    except OSError:
        pass
    return None


def crash_summary(error: BaseException, log_path: Path | None) -> str:
    """One line for the user: what went wrong, that conversations are saved, where the traceback is."""
    what = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    what = " ".join(what.split())  # one line, whatever the message holds
    if len(what) > 200:
        what = what[:199] + "…"
    where = f"the full traceback is in {log_path}" if log_path else "the traceback could not be written to the data folder"
    return f"stopped on an unexpected error ({what}); conversations are saved; {where}. Please report it."
