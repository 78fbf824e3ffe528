"""What a Python user would write without chatkv: plain transformers on the same model object, greedy.

Two baselines, both timed the same way as chatkv's turns (wall clock from the call to the first new
token, and to the last):
- ``generate_with_cache``: ``model.generate``; its DynamicCache lives only for one request.
- ``generate_without_cache``: no KV cache at all, as the seed report's baseline: every new token
  runs the model over the prompt and everything generated so far. It computes logits only at the
  last position (``logits_to_keep=1``), which is what any sensible loop does and only helps it.
Both stop at the model's end-of-turn token or at ``max_new_tokens``, as chatkv does, so with the
same model, dtype and prompt all sides generate the same tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer


@dataclass
class Generation:
    prompt_ids: list[int]
    reply_ids: list[int]  # as generated, the end-of-turn token included when the model produced it
    ttft_ms: float
    total_ms: float

    @property
    def new_tokens(self) -> int:
        return len(self.reply_ids)

    @property
    def decode_ms(self) -> float:
        return self.total_ms - self.ttft_ms


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The prompt ids a plain transformers chat loop feeds the model: the chat template over the text."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return [int(token) for token in ids]


def stop_token_ids(bundle: Any) -> list[int]:
    eos = bundle.model.generation_config.eos_token_id
    if eos is None:
        eos = bundle.tokenizer.eos_token_id
    return [int(token) for token in (eos if isinstance(eos, (list, tuple)) else [eos])]


class _FirstTokenClock(BaseStreamer):
    """``generate`` hands its streamer the prompt first, then each new token: the second call is the first token."""

    def __init__(self) -> None:
        self.calls = 0
        self.first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


@torch.inference_mode()
def generate_with_cache(bundle: Any, prompt_ids: list[int], max_new_tokens: int) -> Generation:
    model = bundle.model
    input_ids = torch.tensor([prompt_ids], device=bundle.device)
    stops = stop_token_ids(bundle)
    clock = _FirstTokenClock()
    started = time.perf_counter()
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stops,
        pad_token_id=stops[0],
        streamer=clock,
    )
    finished = time.perf_counter()
    reply = [int(token) for token in output[0, len(prompt_ids):]]
    first = clock.first_token_at or finished
    return Generation(list(prompt_ids), reply, (first - started) * 1000, (finished - started) * 1000)


@torch.inference_mode()
def generate_without_cache(bundle: Any, prompt_ids: list[int], max_new_tokens: int) -> Generation:
    model = bundle.model
    stops = set(stop_token_ids(bundle))
    sequence = torch.tensor([prompt_ids], device=bundle.device)
    reply: list[int] = []
    first_token_at = None
    started = time.perf_counter()
    for _ in range(max_new_tokens):
        logits = model(input_ids=sequence, use_cache=False, logits_to_keep=1).logits[0, -1]
        token = int(torch.argmax(logits.float()))
        if first_token_at is None:
            first_token_at = time.perf_counter()
        reply.append(token)
        if token in stops:
            break
        sequence = torch.cat([sequence, sequence.new_tensor([[token]])], dim=1)
    finished = time.perf_counter()
    return Generation(list(prompt_ids), reply, (first_token_at - started) * 1000, (finished - started) * 1000)
