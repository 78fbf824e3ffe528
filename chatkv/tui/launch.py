"""``chatkv launch``: lock the data folder, load the model with visible progress, run the app, clean up.

Problems the user can fix (another chatkv on the same folder, a model that cannot be loaded) end
with one line saying what to do, never a traceback.
"""

from __future__ import annotations

import sys

from chatkv.crash import CRASH_EXIT_CODE, crash_summary
from chatkv.engine.api import EngineError
from chatkv.lock import DataDirLocked
from chatkv.model.loader import ModelError
from chatkv.runtime import open_runtime
from chatkv.tui.app import AppOptions, ChatApp, make_app


def say(message: str) -> None:
    print(f"chatkv: {message}", file=sys.stderr, flush=True)


class EngineNotes:
    """Sends the engine's notes to the app once it runs, to the terminal before and after."""

    def __init__(self) -> None:
        self.app: ChatApp | None = None

    def __call__(self, message: str) -> None:
        app = self.app
        if app is not None and app.is_running:
            app.report_from_engine(message)
        else:
            say(message)


def run_tui(context) -> int:
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        say("the chat needs a terminal; to drive it from a script use --headless --script FILE")
        return 2
    args, settings, paths = context.args, context.settings, context.paths
    notes = EngineNotes()
    try:
        with open_runtime(settings, paths, progress=say, engine_log=notes) as runtime:
            options = AppOptions(new_tab=args.new, theme=args.theme)
            app = make_app(settings, runtime.engine, runtime.store, paths.user_themes, options)
            app.startup_notes.extend(runtime.notes)
            notes.app = app
            code = app.run()
            notes.app = None
            if app.crash is not None:
                snapshot_after_crash(runtime.engine, app.crash_session_ids)
                say(crash_summary(app.crash, app.crash_log))
                return CRASH_EXIT_CODE
    except (DataDirLocked, ModelError, EngineError) as exc:  # each carries a message for the user
        say(str(exc))
        return 1
    return code or app.return_code or 0


def snapshot_after_crash(engine, session_ids: list[str]) -> None:
    """Write the KV snapshots the app would have written on quit, where the engine can still do it."""
    try:
        engine.snapshot(session_ids)
    except Exception:  # the crash is already being reported; a snapshot is only a speed-up for the next launch
        pass
