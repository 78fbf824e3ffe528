"""``chatkv model pull`` and ``chatkv model info``."""

from __future__ import annotations

import sys
import time

from chatkv.model.errors import ModelError
from chatkv.model.source import ModelSourceError, resolve
from chatkv.paths import ensure_private_dir, make_private_tree


def run_model_command(context) -> int:
    models_dir = ensure_private_dir(context.paths.models)
    spec = context.args.model or context.settings.model.model
    try:
        if context.args.model_command == "pull":
            started = time.perf_counter()
            source = resolve(spec, models_dir)
            make_private_tree(models_dir)
            print(f"{source.model_id} is ready in {source.path} ({time.perf_counter() - started:.1f} s)")
            return 0
        from chatkv.model.loader import load_model  # torch: only once we know the command needs it

        bundle = load_model(spec, models_dir, context.settings.model.dtype, context.settings.model.device,
                            quant=context.settings.model.quant)
        make_private_tree(models_dir)
    except (ModelError, ModelSourceError) as exc:
        print(f"chatkv: {exc}", file=sys.stderr)
        return 1
    fp = bundle.fingerprint
    print(f"model:       {fp.model_id}\nconfig hash: {fp.config_hash}\ndtype:       {fp.dtype}\n"
          f"device:      {bundle.device}\ncontext:     {bundle.max_context} tokens\nloaded in:   {bundle.load_seconds:.2f} s")
    return 0
