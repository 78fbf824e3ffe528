"""Calls from other threads into the App: one path that works at every moment of a model load.

The model loads on a thread, and the engine sends notes from threads of its own, at any time: before
the App's event loop runs, while it runs, and after the App has quit (the engine closes after it,
writing snapshots). ``AppRelay.post`` hands a call to the App's loop without blocking the caller.
Calls posted before the App is mounted wait and run, in order, once it is; calls posted after it has
unmounted run their fallback instead (for chatkv: the note printed on the terminal), as do calls that
reach the loop only after the App has gone. Nothing is lost, and no caller builds a thread hop by hand.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Callable

Call = Callable[[], None]


class AppRelay:
    """Posts calls to one App's event loop from any thread (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._waiting: list[tuple[Call, Call | None]] = []  # posted before the App was mounted

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        """The App is mounted (call on its loop): run what waited, in order; later posts go straight to ``loop``."""
        with self._lock:
            self._loop = loop
            waiting, self._waiting = self._waiting, []
        for call, _ in waiting:
            call()

    def close(self) -> None:
        """The App is unmounting: from now on every post, and every call not yet run, takes its fallback."""
        with self._lock:
            self._loop, self._closed = None, True
            waiting, self._waiting = self._waiting, []
        for _, fallback in waiting:
            if fallback is not None:
                fallback()

    @property
    def is_open(self) -> bool:
        return self._loop is not None

    def post(self, call: Call, fallback: Call | None = None) -> None:
        """Run ``call`` on the App's loop soon (never blocks); if the App has quit, run ``fallback`` here instead."""
        with self._lock:
            loop = self._loop
            if loop is None and not self._closed:
                self._waiting.append((call, fallback))
                return

        def deliver() -> None:
            if self.is_open:
                call()
            elif fallback is not None:
                fallback()

        if loop is not None:
            try:
                loop.call_soon_threadsafe(deliver)
                return
            except RuntimeError:  # the loop closed between the check and the post
                pass
        if fallback is not None:
            fallback()
