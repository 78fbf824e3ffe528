"""What ``chatkv launch`` needs running, for the terminal UI and headless mode alike.

In order: lock the data folder (one chatkv per folder), find the model (the first launch fetches and
converts it), then import torch, load the model and start the engine, by default in a child process
of its own (``chatkv.engine.process``): every check that needs no model comes before the seconds torch takes. The terminal UI does the last step on a thread behind a
``LoadingEngine``, so saved chats can be read while the model loads. On the way out the engine is
closed and the lock released, however the app ended. With ``[backend] url`` (``--backend``) a
``RemoteBackend`` talking to that server takes the engine's place, and no model is loaded here.
"""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from chatkv.config import Settings
from chatkv.engine.api import BackendCapabilities, EngineError, EngineStats, SessionStats
from chatkv.engine.loading import load_engine
from chatkv.lock import DataDirLock
from chatkv.model.errors import ModelError
from chatkv.model.source import ModelSourceError, resolve
from chatkv.paths import Paths, ensure_private_dir, make_private_tree
from chatkv.store import ConversationStore

Log = Callable[[str], None]


@dataclass
class Runtime:
    settings: Settings
    paths: Paths
    store: ConversationStore
    engine: object  # chatkv.engine.Engine (imported lazily with torch) or chatkv.remote.backend.RemoteBackend
    notes: list[str] = field(default_factory=list)  # for the user once the app runs (a server not reachable, say)


def find_model(settings: Settings, paths: Paths, progress: Log) -> Path:
    """Resolve ``--model`` without torch (unless this launch fetches or converts it, which says so itself).

    Returns the models folder; raises ``ModelError`` with a message for the user.
    """
    ensure_private_dir(paths.cache)
    models_dir = ensure_private_dir(paths.models)
    try:
        resolve(settings.model.model, models_dir, progress)
    except ModelSourceError as exc:
        raise ModelError(str(exc)) from None
    make_private_tree(models_dir)  # what transformers and pip wrote there has the umask's modes
    return models_dir


def start_engine(settings: Settings, paths: Paths, models_dir: Path, progress: Log, engine_log: Log,
                 supervisor: "LoadingEngine | None" = None):
    """The running engine: in a child process (``EngineProcess``) unless ``[model] engine_process`` is off,
    then in this one (``load_engine``). Raises ``ModelError`` with a message for the user.

    With a ``supervisor``, the engine process is handed to it before it starts (so a load nobody wants any
    more can be aborted) and reports its death to it (so it is started again). An engine loaded in this
    process can be neither.
    """
    if settings.model.engine_process:
        from chatkv.engine.process import EngineProcess

        process = EngineProcess(settings, paths, models_dir, progress, engine_log,
                                on_death=supervisor.engine_died if supervisor is not None else None)
        if supervisor is not None:
            supervisor.starting(process)
        return process.start()
    return load_engine(settings, paths, models_dir, progress, engine_log)


@contextmanager
def open_runtime(settings: Settings, paths: Paths, progress: Log, engine_log: Log) -> Iterator[Runtime]:
    """Raises ``DataDirLocked`` or ``ModelError`` (both with a message for the user) before anything runs."""
    lock = DataDirLock(paths.data).acquire()
    try:
        if settings.backend.url:
            with _remote_backend(settings, progress) as (backend, notes):
                yield Runtime(settings, paths, ConversationStore(paths), backend, notes)
            return
        models_dir = find_model(settings, paths, progress)
        engine = start_engine(settings, paths, models_dir, progress, engine_log)
        try:
            yield Runtime(settings, paths, ConversationStore(paths), engine)
        finally:
            engine.close()
    finally:
        lock.release()


class LoadingEngine:
    """Stands in for the engine while a thread loads the model, and starts it again if its process dies.

    Every call the app makes is forwarded once the engine is there. Before that, figures are empty, a tab
    awaits ``until_ready`` before it submits, and ``submit`` raises ``EngineError`` saying why the model
    failed to load, which the tab shows while it hands the message back. ``on_done(error)`` is called on the
    loading thread when a load ends: ``error`` is None on success, else the message for the user.

    ``load(supervisor)`` starts the engine; through ``supervisor`` (this object) it hands over the engine it
    is starting (``starting``), so that closing during the load aborts it where the engine can ``abort()``,
    and tells of an engine process that died (``engine_died``). A dead engine is started again, once per
    death, and ``note`` tells the user; after ``MAX_DEATHS`` deaths within ``DEATH_WINDOW_S`` seconds it is
    left dead and every turn says what to do.
    """

    MAX_DEATHS = 3
    DEATH_WINDOW_S = 60.0
    capabilities = BackendCapabilities()  # it starts local engines only

    def __init__(self, load: Callable[["LoadingEngine"], object], on_done: Callable[[str | None], None],
                 note: Callable[[str], None] | None = None) -> None:
        self._load = load
        self._on_done = on_done
        self._note = note or (lambda message: None)
        self.engine = None  # the running engine once loaded (an EngineProcess, or an Engine in this process)
        self.error: str | None = None
        self._starting: object | None = None  # the engine being started, while a load runs
        self._dead: object | None = None  # an engine whose process died, closed by the next load
        self._deaths: list[float] = []  # when engines died (monotonic seconds)
        self._closing = False
        self._aborted = False
        self._lock = threading.Lock()
        self._thread = self._new_thread()

    def _new_thread(self) -> threading.Thread:
        return threading.Thread(target=self._run, name="chatkv-model-loader", daemon=True)

    def start(self) -> "LoadingEngine":
        self._thread.start()
        return self

    def _run(self) -> None:
        if self._dead is not None:
            self._dead.close()  # the reader thread that reported the death has ended by now
            self._dead = None
        try:
            self.engine = self._load(self)
        except ModelError as exc:
            self.error = str(exc)
        except Exception as exc:  # noqa: BLE001 - shown in the app, which stays open for reading old chats
            self.error = f"the model could not be loaded: {type(exc).__name__}: {exc}"
        if not self._aborted:  # an aborted load was not wanted any more: nobody to tell
            self._on_done(self.error)

    def starting(self, engine: object) -> None:
        """Called by ``load`` with the engine it is about to start."""
        self._starting = engine

    def engine_died(self, message: str) -> None:
        """Called (on the dead engine's own thread) when its process ended unexpectedly: start another."""
        with self._lock:
            if self._closing:
                return
            now = time.monotonic()
            self._deaths = [when for when in self._deaths if now - when < self.DEATH_WINDOW_S] + [now]
            self._dead, self.engine = self.engine, None
            if len(self._deaths) >= self.MAX_DEATHS:
                self.error = (f"{message}. It stopped {len(self._deaths)} times within a minute, so chatkv no longer "
                              "restarts it: check its log, then start chatkv again (a smaller --max-kv-bytes or "
                              "--quant int4 needs less memory).")
                self._note(self.error)
                return
            self._note(f"{message}. Starting it again: your tabs carry on, their KV restored from snapshots or "
                       "recomputed.")
            thread = self._new_thread()
            thread.start()
            self._thread = thread  # published once started: until_ready may join it at once

    @property
    def loading(self) -> bool:
        return self.engine is None and self.error is None

    async def until_ready(self) -> None:
        """Returns once the load (or a restart) has ended, either way (a tab's message waits here)."""
        while self.loading:
            await asyncio.to_thread(self._thread.join)

    def submit(self, session_id: str, messages, sampling=None):
        if self.engine is not None:
            return self.engine.submit(session_id, messages, sampling)
        raise EngineError(self.error or "the model is still loading (the title bar says when it is ready)")

    def cancel(self, session_id: str) -> bool:
        return self.engine.cancel(session_id) if self.engine is not None else False

    def forget(self, session_id: str) -> None:
        if self.engine is not None:
            self.engine.forget(session_id)

    def fork_kv(self, parent_session_id: str, child_session_id: str) -> int:
        """Before the model is there nothing is cached: 0, and the fork's first turn computes its prompt."""
        if self.engine is not None:
            return self.engine.fork_kv(parent_session_id, child_session_id)
        return 0

    def snapshot(self, session_ids: list[str] | None = None) -> int:
        return self.engine.snapshot(session_ids) if self.engine is not None else 0

    def stats(self) -> EngineStats:
        return self.engine.stats() if self.engine is not None else EngineStats()

    def session_stats(self, session_id: str) -> SessionStats | None:
        return self.engine.session_stats(session_id) if self.engine is not None else None

    def close(self) -> None:
        """End a load still running (abort it where the engine can, else wait: torch cannot be stopped
        half-imported), then close the engine."""
        with self._lock:
            self._closing = True  # no restart from here on
        if self._thread.ident is not None:  # started (the app may have ended before it was shown)
            abort = getattr(self._starting, "abort", None)
            if self.loading and abort is not None:
                self._aborted = True
                abort()
            self._thread.join()
        for engine in (self._dead, self.engine):
            if engine is not None:
                engine.close()


@contextmanager
def _remote_backend(settings: Settings, progress: Log):
    """The server instead of the local engine. Raises ``BackendUnavailable`` for a URL that cannot be used."""
    from chatkv.remote.backend import RemoteBackend, api_key_from_env

    options = settings.backend
    backend = RemoteBackend(options, api_key_from_env(options.api_key_env)).start()
    try:
        progress(f"asking {options.url} for its models…")
        notes = backend.probe()
        if backend.info.reachable and not notes:
            progress(f"{options.url}: {backend.info.kind} server, model {backend.default_model}")
        yield backend, notes
    finally:
        backend.close()
