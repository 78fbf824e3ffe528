"""``chatkv model pull`` and ``chatkv model info``."""

from __future__ import annotations

import sys
import time

from chatkv.model.loader import ModelError, load_model
from chatkv.model.source import ModelSourceError, resolve
from chatkv.paths import ensure_private_dir


def run_model_command(context) -> int:
    models_dir = ensure_private_dir(context.paths.models)
    spec = context.args.model or context.settings.model.model
    try:
        if context.args.model_command == "pull":
            started = time.perf_counter()
            source = resolve(spec, models_dir)
            print(f"{source.model_id} is ready in {source.path} ({time.perf_counter() - started:.1f} s)")
            return 0
        bundle = load_model(spec, models_dir, context.settings.model.dtype, context.settings.model.device,
                            quant=context.settings.model.quant)
    except (ModelError, ModelSourceError) as exc:
        print(f"chatkv: {exc}", file=sys.stderr)
        return 1
    fp = bundle.fingerprint
    print(f"model:       {fp.model_id}\nconfig hash: {fp.config_hash}\ndtype:       {fp.dtype}\n"
          f"device:      {bundle.device}\ncontext:     {bundle.max_context} tokens\nloaded in:   {bundle.load_seconds:.2f} s")
    return 0
