"""Pick the next token from one row of logits: greedy, or temperature with a repetition penalty and nucleus (top-p) filtering.

Sampling happens per session after the shared forward pass, so sessions with different sampling
settings can share a batch; a session's own seeded generator keeps its sampled replies repeatable.
"""

from __future__ import annotations

import torch

from collections.abc import Sequence

from chatkv.engine.api import REPETITION_WINDOW, Sampling


def make_generator(sampling: Sampling) -> torch.Generator | None:
    if sampling.greedy:
        return None
    generator = torch.Generator()
    if sampling.seed is not None:
        generator.manual_seed(sampling.seed)
    else:
        generator.seed()
    return generator


def recent_ids(prompt_ids: Sequence[int], reply_ids: Sequence[int]) -> list[int]:
    """The last ``REPETITION_WINDOW`` ids of prompt then reply: what a repetition penalty looks at."""
    return [*prompt_ids[-REPETITION_WINDOW:], *reply_ids[-REPETITION_WINDOW:]][-REPETITION_WINDOW:]


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None,
               recent: Sequence[int] = ()) -> int:
    """``logits``: [vocab] float32 on CPU; ``recent``: the ids the repetition penalty applies to (see ``recent_ids``)."""
    if sampling.greedy:
        return int(torch.argmax(logits))
    if sampling.repetition_penalty != 1.0 and recent:
        seen = torch.tensor(sorted(set(recent)), dtype=torch.long)
        picked = logits[seen]
        logits = logits.clone()
        logits[seen] = torch.where(picked > 0, picked / sampling.repetition_penalty, picked * sampling.repetition_penalty)
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # keep the smallest set whose mass reaches top_p (the first token always stays)
        outside = cumulative - sorted_probs > sampling.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
