"""What ``chatkv launch`` needs running, for the terminal UI and headless mode alike.

In order: lock the data folder (one chatkv per folder), load the model (the first launch fetches and
converts it), start the engine. On the way out the engine is closed and the lock released, however
the app ended.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
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
    engine: object  # chatkv.engine.Engine, imported lazily with torch


@contextmanager
def open_runtime(settings: Settings, paths: Paths, progress: Log, engine_log: Log) -> Iterator[Runtime]:
    """Raises ``DataDirLocked`` or ``ModelError`` (both with a message for the user) before anything runs."""
    lock = DataDirLock(paths.data).acquire()
    try:
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
