"""The engine on an accelerator: fp32 exactness, then bf16 throughput against batched ``model.generate``.

    .venv/bin/python scripts/gpu_check.py                       # CUDA: 1/8/32/64 sessions + 16 of mixed lengths
    .venv/bin/python scripts/gpu_check.py --device cpu --quick  # the same code paths at CI size, on the CPU

Three parts, printed as JSON lines and, with ``--json FILE``, as one JSON document:
1. exactness: fp32 greedy replies of several sessions served together equal the full-recompute reference;
2. throughput: N sessions of the same prompt length decoding together, aggregate generated tok/s, chatkv
   vs ``model.generate`` over the same N prompts as one left-padded batch (its KV cache inside the call);
3. mixed lengths: 16 sessions whose prompts range from short to long, against 16 of one length (a
   per-shape attention plan, as cuDNN builds, would show here as a cliff).
The exit code is 1 if the exactness check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from chatkv.config import Settings
from chatkv.conversation import Message
from chatkv.engine import Engine, Sampling
from chatkv.engine.reference import greedy_full_recompute
from chatkv.model import load_model
from chatkv.paths import Paths, ensure_private_dir

TOPICS = ["rivers", "volcanoes", "deserts", "glaciers", "forests", "oceans", "mountains", "islands"]


def prompt(index: int, words: int) -> str:
    filler = " ".join(f"detail {i} about {TOPICS[(index + i) % len(TOPICS)]}." for i in range(words // 4))
    return f"Request {index}: {filler} Now tell me a long story about {TOPICS[index % len(TOPICS)]}."


def serve_together(engine: Engine, prompts: list[str], new_tokens: int) -> tuple[list, float]:
    handles = [
        engine.submit(f"s{len(prompts)}-{i}-{time.monotonic_ns()}", [Message("user", text)], Sampling(max_new_tokens=new_tokens))
        for i, text in enumerate(prompts)
    ]
    started = time.perf_counter()
    engine.drain()
    seconds = time.perf_counter() - started
    results = [handle.wait(0) for handle in handles]
    for result in results:
        if result.error:
            raise SystemExit(f"chatkv failed a turn: {result.error}")
    return results, seconds


def engine_for(bundle, sessions: int) -> Engine:
    settings = Settings()
    settings.batching.max_batch_size = max(1, sessions)
    settings.batching.max_total_queued_requests = max(100, sessions)
    settings.snapshot.enabled = False
    return Engine(bundle, settings)


def check_exactness(bundle, sessions: int, new_tokens: int) -> dict:
    engine = engine_for(bundle, sessions)
    prompts = [prompt(i, 8 + 24 * i) for i in range(sessions)]
    results, _ = serve_together(engine, prompts, new_tokens)
    results += serve_together(engine, prompts[:1], new_tokens)[0]  # a new session reusing the first one's blocks
    engine.close()
    mismatches = [
        result.session_id for result in results
        if result.reply_ids != greedy_full_recompute(bundle.model, result.prompt_ids, new_tokens, engine.eos_ids)
    ]
    return {"part": "exactness", "dtype": "float32", "sessions": len(results), "new_tokens": new_tokens,
            "shared_tokens": results[-1].shared_tokens, "exact": not mismatches, "mismatches": mismatches}


@torch.inference_mode()
def generate_batched(bundle, prompts: list[str], new_tokens: int) -> tuple[int, float]:
    tokenizer = bundle.tokenizer
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in prompts]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(bundle.device)
    started = time.perf_counter()
    output = bundle.model.generate(**batch, max_new_tokens=new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    if bundle.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    generated = output[:, batch["input_ids"].shape[1]:]
    eos = bundle.tokenizer.eos_token_id
    tokens = sum(int((row == eos).nonzero()[0, 0]) + 1 if (row == eos).any() else len(row) for row in generated)
    return tokens, seconds


def throughput(bundle, sessions: int, new_tokens: int, words: list[int]) -> dict:
    prompts = [prompt(i, words[i % len(words)]) for i in range(sessions)]
    engine = engine_for(bundle, sessions)
    serve_together(engine, prompts[:1], 2)  # warm-up
    results, seconds = serve_together(engine, prompts, new_tokens)
    engine.close()
    chatkv = sum(r.new_tokens for r in results) / seconds
    generate_batched(bundle, prompts[:1], 2)  # warm-up
    tokens, generate_seconds = generate_batched(bundle, prompts, new_tokens)
    baseline = tokens / generate_seconds
    return {"sessions": sessions, "prompt_tokens": [min(r.prompt_tokens for r in results), max(r.prompt_tokens for r in results)],
            "chatkv_tok_s": round(chatkv, 1), "generate_batched_tok_s": round(baseline, 1),
            "ratio": round(chatkv / baseline, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--quick", action="store_true", help="CI size: 1 and 2 sessions, a few tokens")
    parser.add_argument("--dtype", default=None, help="throughput dtype (default bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    models_dir = ensure_private_dir(Paths.resolve(None).models)
    report: list[dict] = []

    def emit(line: dict) -> None:
        report.append(line)
        print(json.dumps(line), flush=True)

    quiet = lambda message: None  # noqa: E731
    fp32 = load_model(args.model, models_dir, dtype="float32", device=args.device, progress=quiet, allow_pull=False)
    emit({"part": "machine", "device": str(fp32.device), "torch": torch.__version__,
          "gpu": torch.cuda.get_device_name(0) if fp32.device.type == "cuda" else None})
    exactness = check_exactness(fp32, sessions=2 if args.quick else 4, new_tokens=4 if args.quick else 24)
    emit(exactness)
    dtype = args.dtype or ("bfloat16" if fp32.device.type == "cuda" else "float32")
    bundle = fp32 if dtype == "float32" else load_model(args.model, models_dir, dtype=dtype, device=args.device,
                                                         progress=quiet, allow_pull=False)
    del fp32
    levels, new_tokens = ((1, 2), 4) if args.quick else ((1, 8, 32, 64), 128)
    for sessions in levels:
        emit({"part": "throughput", "dtype": dtype, "new_tokens": new_tokens, **throughput(bundle, sessions, new_tokens, [40])})
    mixed_sessions = 2 if args.quick else 16
    mixed_words = [8, 40] if args.quick else [8, 40, 120, 300, 600, 900, 60, 200]
    uniform = throughput(bundle, mixed_sessions, new_tokens, [40])
    mixed = throughput(bundle, mixed_sessions, new_tokens, mixed_words)
    emit({"part": "mixed_lengths", "dtype": dtype, "new_tokens": new_tokens, "uniform": uniform, "mixed": mixed,
          "mixed_vs_uniform": round(mixed["chatkv_tok_s"] / uniform["chatkv_tok_s"], 2)})
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if exactness["exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
