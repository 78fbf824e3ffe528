"""The plain full-recompute reference: what greedy decoding gives with no cache at all.

Every step runs the stock transformers model over the whole sequence (``use_cache=False``) and
takes the argmax of the last position. Slow on purpose; the exactness tests and the bench compare
the engine's replies with it token by token.
"""

from __future__ import annotations

import torch


@torch.inference_mode()
def greedy_full_recompute(model, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int]) -> list[int]:
    device = next(model.parameters()).device
    sequence = list(prompt_ids)
    generated: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([sequence], device=device), use_cache=False, logits_to_keep=1).logits
        token = int(torch.argmax(logits[0, -1].float()))
        generated.append(token)
        sequence.append(token)
        if token in eos_ids:
            break
    return generated
