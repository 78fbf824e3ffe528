"""One turn of one session as it moves through the engine: its prompt, what was reused, what it generated."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from chatkv.engine.detokenizer import IncrementalDetokenizer
from chatkv.engine.drafter import NgramDrafter
from chatkv.engine.api import FinishReason, ReusedFrom, Sampling, TurnHandle


class TurnState(Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"


@dataclass
class Turn:
    session_id: str
    prompt_ids: list[int]
    sampling: Sampling
    handle: TurnHandle
    dropped_messages: int = 0
    submitted_at: float = field(default_factory=time.perf_counter)
    session_is_new: bool = False  # no turn of this session in the last few seconds (set by the scheduler)
    state: TurnState = TurnState.WAITING
    # filled at admission
    admitted_at: float = 0.0
    reused_tokens: int = 0
    reused_from: ReusedFrom = "none"
    shared_tokens: int = 0  # of reused_tokens, those in blocks another session computed
    shared_from: str | None = None  # that session, when there is one
    max_new_tokens: int = 0
    generator: torch.Generator | None = None
    detokenizer: IncrementalDetokenizer | None = None
    drafter: NgramDrafter | None = None  # built on the first draft; greedy turns only
    # progress
    prefill_position: int = 0  # prompt tokens already in the session's KV
    reply_ids: list[int] = field(default_factory=list)
    reply_text: str = ""
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    batch_size: int = 0  # sessions in the forward pass that completed this turn's prefill
    cancel_requested: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def pending_input(self) -> list[int]:
        """Tokens this turn feeds in its next forward: the rest of its prompt, or its last sampled token."""
        if self.state is TurnState.PREFILLING:
            return self.prompt_ids[self.prefill_position:]
        return self.reply_ids[-1:]

    def propose_draft(self, max_tokens: int) -> list[int]:
        """Tokens guessed to follow the reply (prompt lookup), at most ``max_tokens``; none for sampled turns.

        Exactness needs the greedy pick: a sampled turn would need rejection sampling to keep its distribution.
        The guess never reaches past ``max_new_tokens`` (the token the verifying forward adds counts too),
        so its K/V always fit in the room reserved at admission.
        """
        room = min(max_tokens, self.max_new_tokens - len(self.reply_ids) - 1)
        if room <= 0 or not self.sampling.greedy or self.state is not TurnState.DECODING:
            return []
        if self.drafter is None:
            self.drafter = NgramDrafter(self.prompt_ids)
        self.drafter.extend(self.reply_ids[len(self.drafter.ids) - self.prompt_tokens :])
        return self.drafter.propose(room)

    @property
    def ttft_ms(self) -> float:
        return (self.first_token_at - self.submitted_at) * 1000 if self.first_token_at else 0.0

    @property
    def decode_tok_s(self) -> float:
        produced_after_first = len(self.reply_ids) - 1
        span = self.last_token_at - self.first_token_at
        return produced_after_first / span if produced_after_first > 0 and span > 0 else 0.0
