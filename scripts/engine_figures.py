"""The engine's three headline figures in one run (bf16; all torch work on one thread via Engine.drain):
turn-8 TTFT with the KV cache vs recomputing every turn; 8 concurrent sessions vs one at a time; single-session
decode vs model.generate. Run: .venv/bin/python scripts/engine_figures.py (about a minute on 2 cores)."""

import time

import torch

from chatkv.config import Settings
from chatkv.conversation import Message
from chatkv.engine import Engine, Sampling
from chatkv.model import load_model
from chatkv.paths import Paths, ensure_private_dir

bundle = load_model("smollm2", ensure_private_dir(Paths.resolve(None).models), dtype="bfloat16")


def turn(engine, sid, messages, n):
    handle = engine.submit(sid, messages, Sampling(max_new_tokens=n))
    engine.drain()
    return handle.wait(0)


cached = Engine(bundle, Settings())
settings = Settings()
settings.kv.enabled = False
recompute = Engine(bundle, settings)
topics = ["rivers", "volcanoes", "deserts", "glaciers", "forests", "oceans", "mountains", "islands"]
history = []
for topic in topics:
    history.append(Message("user", f"Tell me three interesting facts about {topic}, and explain for each one why it matters "
                                     f"to people who live nearby and how scientists first discovered it."))
    a = turn(cached, "c", list(history), 64)
    b = turn(recompute, "r", list(history), 64)  # the same prompt, recomputed from scratch
    history.append(Message("assistant", a.reply, token_ids=a.reply_ids))
print(f"turn 8: prompt {a.prompt_tokens} tokens; TTFT with cache {a.ttft_ms:.1f} ms (prefilled {a.prefilled_tokens}) "
      f"vs recompute {b.ttft_ms:.1f} ms (prefilled {b.prefilled_tokens}): {b.ttft_ms / a.ttft_ms:.1f}x")

prompts = [f"Story number {i}: tell me about a dragon who learns a new skill." for i in range(8)]
engine = Engine(bundle, Settings())
turn(engine, "warm", [Message("user", "hi")], 4)
started = time.perf_counter()
one = [turn(engine, f"seq{i}", [Message("user", p)], 100) for i, p in enumerate(prompts)]
sequential = sum(r.new_tokens for r in one) / (time.perf_counter() - started)
started = time.perf_counter()
handles = [engine.submit(f"bat{i}", [Message("user", p)], Sampling(max_new_tokens=100)) for i, p in enumerate(prompts)]
engine.drain()
together = [h.wait(0) for h in handles]
batched = sum(r.new_tokens for r in together) / (time.perf_counter() - started)
print(f"8 sessions x 100 tokens: one at a time {sequential:.1f} tok/s, concurrent {batched:.1f} tok/s "
      f"({batched / sequential:.2f}x; batch sizes {sorted({r.batch_size for r in together})})")

tok = bundle.tokenizer
text = tok.apply_chat_template([{"role": "user", "content": prompts[0]}], add_generation_prompt=True, tokenize=False)
ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
rates = {"chatkv": [], "generate": []}
for round_ in range(3):
    r = turn(engine, f"single{round_}", [Message("user", prompts[0])], 100)
    rates["chatkv"].append(r.decode_tok_s)
    with torch.inference_mode():
        t = time.perf_counter()
        bundle.model.generate(ids, max_new_tokens=100, min_new_tokens=100, do_sample=False)
    rates["generate"].append(100 / (time.perf_counter() - t))
print(f"single-session decode: chatkv {max(rates['chatkv']):.1f} tok/s (decode only, best of 3) vs "
      f"model.generate {max(rates['generate']):.1f} tok/s (whole call incl. prefill, best of 3)")
