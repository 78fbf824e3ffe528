"""Where a decode step's time goes at 16 sessions: attention's share, and aggregate decode tok/s.

    .venv/bin/python scripts/attention_share.py [--sessions 16] [--dtype auto] [--quant none] [--new-tokens 64] [--steps N]

Sixteen sessions (~120-token prompts) decode together (speculative decoding off); every forward pass in
which all of them decode one token is timed, and so is every call of the engine's attention function
inside it: ``attention.attend``, or ``packed_attention`` in older checkouts. ``--steps N`` keeps only the
first N such passes: replies end where their numerics take them, so two versions compared over the same
N passes attend over the same contexts (``context_tokens_per_step``: keys attended per pass, all sessions). On the CPU there is nothing
asynchronous to wait for, so wall time is the cost. Prints one JSON line. It only uses the engine's
public pieces (``Engine``, ``ModelRunner.forward``, the attention functions), so the same script
measures an older checkout put first on PYTHONPATH (its own thread policy applies).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AttentionInterface

from chatkv.config import Settings
from chatkv.conversation import Message
from chatkv.engine import Engine, Sampling
from chatkv.engine import attention
from chatkv.model import load_model
from chatkv.paths import Paths, ensure_private_dir


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quant", default="none", help="none, int8, int4 or auto (the app's default: int4 in bf16)")
    parser.add_argument("--steps", type=int, default=0, help="only the first N passes where every session decodes")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    bundle = load_model("smollm2", ensure_private_dir(Paths.resolve(None).models), dtype=args.dtype,
                        quant=args.quant, progress=lambda message: None, allow_pull=False)
    settings = Settings()
    settings.batching.max_batch_size = args.sessions
    settings.snapshot.enabled = False
    engine = Engine(bundle, settings)

    if hasattr(settings, "speculative"):
        settings.speculative.draft_tokens = 0  # every decode step feeds one token per session
    in_attention = [0.0]
    # the engine's attention: ``attend`` where the lean forward calls it, else ``packed_attention`` (older checkouts)
    name = "attend" if hasattr(attention, "attend") else "packed_attention"
    attend = getattr(attention, name)

    def timed_attention(*call_args, **kwargs):
        started = time.perf_counter()
        try:
            return attend(*call_args, **kwargs)
        finally:
            in_attention[0] += time.perf_counter() - started

    if name == "packed_attention":
        AttentionInterface.register(attention.ATTENTION_NAME, timed_attention)  # the transformers modules
    setattr(attention, name, timed_attention)  # forwards that look it up by name
    steps: list[tuple[float, float, int]] = []
    forward = engine.runner.forward

    def timed_forward(input_ids, positions, segments, logits_rows, *rest, **kwargs):
        in_attention[0] = 0.0
        started = time.perf_counter()
        logits = forward(input_ids, positions, segments, logits_rows, *rest, **kwargs)
        seconds = time.perf_counter() - started
        if len(input_ids) == args.sessions and len(logits_rows) == args.sessions:  # every session decoding
            steps.append((seconds, in_attention[0], sum(positions) + len(positions)))
        return logits

    engine.runner.forward = timed_forward
    topics = ["rivers", "volcanoes", "deserts", "glaciers", "forests", "oceans", "mountains", "islands"]
    handles = []
    for index in range(args.sessions):
        text = (f"Story {index}: " + " ".join(f"a fact about {topics[(index + i) % 8]}." for i in range(20))
                + " Now write a long story about it.")
        handles.append(engine.submit(f"p{index}", [Message("user", text)], Sampling(max_new_tokens=args.new_tokens)))
    started = time.perf_counter()
    engine.drain()
    wall = time.perf_counter() - started
    results = [handle.wait(0) for handle in handles]
    steps = steps[: args.steps] if args.steps else steps
    step = statistics.median(s for s, _, _ in steps)
    attn = statistics.median(a for _, a, _ in steps)
    print(json.dumps({
        "engine": attention.__file__, "torch_threads": torch.get_num_threads(), "dtype": str(bundle.dtype),
        "quant": args.quant, "sessions": args.sessions, "decode_steps_timed": len(steps),
        "context_tokens_per_step": statistics.median(c for _, _, c in steps),
        "decode_step_ms_median": round(step * 1000, 2), "attention_ms_per_step_median": round(attn * 1000, 2),
        "attention_share": round(attn / step, 3), "decode_tok_s_from_steps": round(args.sessions / step, 1),
        "new_tokens": sum(r.new_tokens for r in results), "wall_s_including_prefill": round(wall, 2),
    }))


if __name__ == "__main__":
    main()
