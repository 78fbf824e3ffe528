"""Quality of each weight quantization against unquantized bf16, on a fixed set of chat prompts (greedy).

For every prompt: the bf16 reply (the lean forward, unquantized, full recompute) and the quantized one.
Two figures per mode: the share of replies identical token for token, and the per-token top-1 agreement
(feeding the bf16 reply to the quantized model, how often its argmax is bf16's next token).
Run: .venv/bin/python scripts/quant_quality.py [MAX_NEW_TOKENS]  (a few minutes on 2 cores)
"""

import sys

import torch

from chatkv.engine.reference import greedy_full_recompute
from chatkv.engine.threads import engine_threads
from chatkv.model import load_model
from chatkv.paths import Paths, ensure_private_dir

PROMPTS = [
    "What is the capital of France?",
    "Explain what a KV cache is in two sentences.",
    "Write a haiku about the sea.",
    "Give me three tips for learning to cook.",
    "What is 17 times 3?",
    "Summarise the plot of Romeo and Juliet.",
    "Translate 'good morning' into Spanish and German.",
    "Write a Python function that reverses a string.",
    "Why is the sky blue?",
    "List the planets of the solar system in order.",
    "Suggest a name for a bakery.",
    "What are the benefits of regular exercise?",
]
MAX_NEW = int(sys.argv[1]) if len(sys.argv) > 1 else 48
torch.set_num_threads(engine_threads())
models = ensure_private_dir(Paths.resolve(None).models)


def load(quant):
    return load_model("smollm2", models, dtype="bfloat16", device="cpu", quant=quant, progress=lambda _: None)


base = load("none")
eos = {base.tokenizer.eos_token_id, *([base.model.generation_config.eos_token_id] if isinstance(
    base.model.generation_config.eos_token_id, int) else base.model.generation_config.eos_token_id or [])}
prompts = [base.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"] for p in PROMPTS]
reference = [greedy_full_recompute(base.lean, ids, MAX_NEW, eos) for ids in prompts]
print(f"{len(prompts)} prompts, greedy, up to {MAX_NEW} new tokens, full recompute\n", flush=True)
print(f"| weights | identical replies | top-1 agreement | weight bytes |\n|---|---:|---:|---:|")
print(f"| bf16 (none) | {len(prompts)}/{len(prompts)} | 100.0% | {base.lean.weight_bytes / 2**20:,.0f} MiB |")
for quant in ("int8", "int4"):
    bundle = load(quant)
    identical = agree = total = 0
    for ids, expected in zip(prompts, reference):
        identical += greedy_full_recompute(bundle.lean, ids, MAX_NEW, eos) == expected
        with torch.inference_mode():
            logits = bundle.lean(input_ids=torch.tensor([ids + expected[:-1]])).logits[0, len(ids) - 1:]
        agree += int((logits.argmax(-1) == torch.tensor(expected)).sum())
        total += len(expected)
    print(f"| bf16 + {quant} | {identical}/{len(prompts)} | {100 * agree / total:.1f}% | "
          f"{bundle.lean.weight_bytes / 2**20:,.0f} MiB |", flush=True)
