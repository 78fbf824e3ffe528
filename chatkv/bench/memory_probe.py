"""A child process that loads the model, serves one long conversation and reports its memory, as JSON on stdout.

Peak RSS can only be read for a whole process, and the bench process has held other things (an fp32
copy of the model for the checks, earlier scenarios' sessions); a fresh process per measurement gives
the peak that one chatkv (or one plain ``model.generate``) serving that conversation really reaches.
Loading the model has a peak of its own (the checkpoint is read before it is cast to the dtype), so
on Linux the probe resets the peak after loading (``/proc/self/clear_refs``) and reports both.

    python -m chatkv.bench.memory_probe --system chatkv --tokens 1024 --dtype bfloat16 --model smollm2 --models-dir DIR
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import sys
from pathlib import Path

import psutil

NEW_TOKENS = 8  # enough to exercise decode; the session's length is mostly its prompt


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    """The process's peak RSS since it started, or since the last ``_reset_peak_rss``."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
    except (OSError, AttributeError):
        # ru_maxrss is in KiB on Linux (bytes on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def _reset_peak_rss() -> bool:
    """Start a new peak from the current RSS (Linux 4.0+); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--system", choices=["chatkv", "generate"], required=True)
    parser.add_argument("--tokens", type=int, required=True, help="session length to reach: prompt plus reply")
    parser.add_argument("--model", required=True)
    parser.add_argument("--models-dir", required=True)
    parser.add_argument("--dtype", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    from chatkv.bench.baselines import generate_with_cache, render_prompt
    from chatkv.bench.filler import filler_message
    from chatkv.model.loader import load_model

    hf_logging.disable_progress_bar()
    rss_start = _rss()
    bundle = load_model(args.model, Path(args.models_dir), dtype=args.dtype, device=args.device, progress=lambda _: None,
                        allow_pull=False)
    rss_loaded = _rss()
    peak_loading = _peak_rss()
    peak_was_reset = _reset_peak_rss()
    template_tokens = len(render_prompt(bundle.tokenizer, [{"role": "user", "content": ""}]))
    message = filler_message(bundle.tokenizer, args.tokens - NEW_TOKENS - template_tokens)
    report: dict = {"system": args.system, "target_tokens": args.tokens, "rss_start_bytes": rss_start,
                    "rss_after_load_bytes": rss_loaded, "peak_rss_loading_bytes": peak_loading}
    if args.system == "generate":
        prompt_ids = render_prompt(bundle.tokenizer, [{"role": "user", "content": message}])
        generation = generate_with_cache(bundle, prompt_ids, NEW_TOKENS)
        report.update(prompt_tokens=len(prompt_ids), new_tokens=generation.new_tokens,
                      session_tokens=len(prompt_ids) + generation.new_tokens)
    else:
        report.update(_serve_with_chatkv(bundle, message))
    # without the reset, the serving peak is the whole process's (loading included), and says so
    report.update(rss_end_bytes=_rss(), peak_rss_serving_bytes=_peak_rss(), serving_peak_excludes_loading=peak_was_reset)
    print(json.dumps(report))
    return 0


def _serve_with_chatkv(bundle, message: str) -> dict:
    from chatkv.config import Settings
    from chatkv.conversation import Message
    from chatkv.engine import Engine, Sampling

    settings = Settings()
    settings.snapshot.enabled = False
    session = "bench-memory"
    with Engine(bundle, settings) as engine:
        result = engine.submit(session, [Message("user", message)], Sampling(max_new_tokens=NEW_TOKENS)).wait()
        if result.error:
            raise SystemExit(f"chatkv failed the turn: {result.error}")
        stats = engine.stats()

        def read_tensor():
            # the session's KV blocks in the pool: their bytes over their token slots is the exact cost of one token
            store = engine.store
            entry = store.peek(session)
            return {"tensor_bytes": entry.nbytes, "tensor_token_slots": len(entry.block_table) * store.block_size,
                    "tensor_dtype": str(store.kv.dtype).removeprefix("torch."), "tensor_shape": list(store.kv.shape)}

        tensor = engine.call_in_engine(read_tensor).result()
    return {"prompt_tokens": result.prompt_tokens, "new_tokens": result.new_tokens,
            "session_tokens": stats.tokens, "kv_bytes_held": stats.bytes, "kv_peak_bytes": stats.peak_bytes,
            "kv_budget_bytes": stats.budget_bytes, **tensor}


if __name__ == "__main__":
    raise SystemExit(main())
