"""What ``chatkv launch`` needs running, for the terminal UI and headless mode alike.

In order: lock the data folder (one chatkv per folder), load the model (the first launch fetches and
converts it), start the engine. On the way out the engine is closed and the lock released, however
the app ended. With ``[backend] url`` (``--backend``) a ``RemoteBackend`` talking to that server takes
the engine's place, and no model is loaded here.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from chatkv.config import Settings
from chatkv.lock import DataDirLock
from chatkv.paths import Paths, ensure_private_dir
from chatkv.store import ConversationStore

Log = Callable[[str], None]


@dataclass
class Runtime:
    settings: Settings
    paths: Paths
    store: ConversationStore
    engine: object  # chatkv.engine.Engine (imported lazily with torch) or chatkv.remote.backend.RemoteBackend
    notes: list[str] = field(default_factory=list)  # for the user once the app runs (a server not reachable, say)


@contextmanager
def open_runtime(settings: Settings, paths: Paths, progress: Log, engine_log: Log) -> Iterator[Runtime]:
    """Raises ``DataDirLocked`` or ``ModelError`` (both with a message for the user) before anything runs."""
    lock = DataDirLock(paths.data).acquire()
    try:
        if settings.backend.url:
            with _remote_backend(settings, progress) as (backend, notes):
                yield Runtime(settings, paths, ConversationStore(paths), backend, notes)
            return
        import torch

        from chatkv.engine import Engine
        from chatkv.model.loader import load_model

        if settings.model.threads > 0:
            torch.set_num_threads(settings.model.threads)
        model = settings.model
        progress(f"loading {model.model} (the first launch downloads and converts it: about half a minute)…")
        ensure_private_dir(paths.cache)
        bundle = load_model(model.model, ensure_private_dir(paths.models), model.dtype, model.device, progress=progress,
                            quant=model.quant)
        progress(f"{bundle.model_id} ready ({bundle.fingerprint.dtype}, {bundle.device}, loaded in {bundle.load_seconds:.1f} s)")
        engine = Engine(bundle, settings, snapshot_dir=paths.snapshots, log=engine_log).start()
        try:
            yield Runtime(settings, paths, ConversationStore(paths), engine)
        finally:
            engine.close()
    finally:
        lock.release()


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
