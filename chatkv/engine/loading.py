"""Load the model and start an engine in this process: what the engine's child process does first, and what
``chatkv launch`` does itself with ``[model] engine_process`` off."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from chatkv.config import Settings
from chatkv.paths import Paths

Log = Callable[[str], None]


def load_engine(settings: Settings, paths: Paths, models_dir: Path, progress: Log, engine_log: Log):
    """Import torch, load the model, start the engine (``chatkv.engine.Engine``) in this process; raises ``ModelError``."""
    model = settings.model
    progress(f"loading {model.model}…")
    import torch

    from chatkv.engine import Engine
    from chatkv.model.loader import load_model

    if model.threads > 0:
        torch.set_num_threads(model.threads)
    bundle = load_model(model.model, models_dir, model.dtype, model.device, progress=progress, quant=model.quant)
    settings.generation.fill_sampling_defaults(bundle.sampling_defaults)
    progress(f"{bundle.model_id} ready ({bundle.fingerprint.dtype}, {bundle.device}, loaded in {bundle.load_seconds:.1f} s)")
    return Engine(bundle, settings, snapshot_dir=paths.snapshots, log=engine_log).start()
