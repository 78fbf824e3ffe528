"""Pick the next token from one row of logits: greedy, or temperature with nucleus (top-p) filtering.

Sampling happens per session after the shared forward pass, so sessions with different sampling
settings can share a batch; a session's own seeded generator keeps its sampled replies repeatable.
"""

from __future__ import annotations

import torch

from chatkv.engine.api import Sampling


def make_generator(sampling: Sampling) -> torch.Generator | None:
    if sampling.greedy:
        return None
    generator = torch.Generator()
    if sampling.seed is not None:
        generator.manual_seed(sampling.seed)
    else:
        generator.seed()
    return generator


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """``logits``: [vocab] float32 on CPU."""
    if sampling.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # keep the smallest set whose mass reaches top_p (the first token always stays)
        outside = cumulative - sorted_probs > sampling.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
