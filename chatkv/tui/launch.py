"""``chatkv launch``: lock the data folder, find the model, show the app at once while the model loads, clean up.

Problems the user can fix (another chatkv on the same folder, a model that cannot be found) end with
one line saying what to do, never a traceback, and before torch is imported. The model itself loads on
a thread behind a ``LoadingEngine``: the title bar shows its progress, saved chats can be read at once,
and a message sent before it is ready is handed back with a note.
"""

from __future__ import annotations

import sys

from chatkv.crash import CRASH_EXIT_CODE, crash_summary
from chatkv.engine.api import EngineError
from chatkv.lock import DataDirLock, DataDirLocked
from chatkv.model.errors import ModelError
from chatkv.runtime import LoadingEngine, find_model, open_runtime, start_engine
from chatkv.store import ConversationStore
from chatkv.tui.app import AppOptions, ChatApp, make_app


def say(message: str) -> None:
    print(f"chatkv: {message}", file=sys.stderr, flush=True)


class EngineNotes:
    """The engine's notes, the model's progress and the end of the load: to the app through its relay while it
    runs (or once it is mounted), to the terminal when there is no app (before it is made, after it quits)."""

    def __init__(self) -> None:
        self.app: ChatApp | None = None

    def _post(self, show, text: str | None) -> None:
        app = self.app
        fallback = (lambda: say(text)) if text else None
        if app is None:
            if fallback is not None:
                fallback()
            return
        app.relay.post(lambda: show(app), fallback)

    def __call__(self, message: str) -> None:
        self._post(lambda app: app.report_from_engine(message), message)

    def progress(self, message: str) -> None:
        self._post(lambda app: app.show_model_progress(message), message)

    def loaded(self, error: str | None) -> None:
        """The load ended (``error`` None) or failed with a message for the user."""
        self._post(lambda app: app.model_loaded(error), error)


def run_tui(context) -> int:
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        say("the chat needs a terminal; to drive it from a script use --headless --script FILE")
        return 2
    if context.settings.backend.url:
        return _run_with_server(context)
    args, settings, paths = context.args, context.settings, context.paths
    notes = EngineNotes()
    try:
        lock = DataDirLock(paths.data).acquire()
    except DataDirLocked as exc:
        say(str(exc))
        return 1
    try:
        try:
            models_dir = find_model(settings, paths, say)
        except ModelError as exc:
            say(str(exc))
            return 1

        def load(supervisor: LoadingEngine):
            return start_engine(settings, paths, models_dir, notes.progress, notes, supervisor)

        engine = LoadingEngine(load, notes.loaded, note=notes)
        # the load starts once the app shows, so its progress reaches the title bar
        options = AppOptions(new_tab=args.new, theme=args.theme, on_shown=engine.start)
        app = make_app(settings, engine, ConversationStore(paths), paths.user_themes, options)
        notes.app = app
        try:
            code = app.run()
            if app.crash is not None:
                snapshot_after_crash(engine, app.crash_session_ids)
                say(crash_summary(app.crash, app.crash_log))
                return CRASH_EXIT_CODE
        finally:
            notes.app = None
            engine.close()
    finally:
        lock.release()
    return code or app.return_code or 0


def _run_with_server(context) -> int:
    """``--backend URL``: a server does the model's work, so there is nothing to load behind the app."""
    args, settings, paths = context.args, context.settings, context.paths
    notes = EngineNotes()
    try:
        with open_runtime(settings, paths, progress=say, engine_log=notes) as runtime:
            options = AppOptions(new_tab=args.new, theme=args.theme)
            app = make_app(settings, runtime.engine, runtime.store, paths.user_themes, options)
            app.startup_notes.extend(runtime.notes)
            notes.app = app
            code = app.run()
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
