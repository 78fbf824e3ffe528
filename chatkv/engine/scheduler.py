"""Decide what runs next: which waiting turns to admit, and which tokens go into the next forward pass.

Policy, in short:
- a bounded queue; a full queue rejects the turn at once with a message;
- at most ``max_batch_size`` turns run at a time, one per session;
- when nothing is decoding, a new turn waits up to ``max_batch_wait_ms`` for company, so turns sent
  together from several tabs share their prefill; it waits only when company is plausible (its session
  is new, as when tabs are opened or restored together, or another session sent a turn in the last
  few seconds), so one conversation on its own never pays the wait;
- every step packs one token for each decoding turn (continuous batching: turns join and leave
  between steps) and up to ``prefill_chunk_tokens`` of prompt from turns still prefilling;
- a greedy decoding turn may add tokens guessed from its own conversation (``draft_tokens``, prompt
  lookup) after its last token, for the engine to verify in the same forward; guesses go only into steps
  with few decode rows (``DRAFT_STEP_ROWS``), where verifying them costs about as much as one token;
- ``prefill_only`` reproduces the seed design: prompts are prefilled together, but each turn then
  decodes alone, one session per forward pass, in turn.

The scheduler never touches the model or the KV tensors; the engine does.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from chatkv.config import BatchingOptions
from chatkv.engine.api import QueueFullError
from chatkv.engine.turn import Turn, TurnState
from chatkv.model.lean_llama import QUANT_MAX_ROWS

# decode rows (last tokens and guesses, all sessions) a step may reach by adding guesses: up to here a
# quantized linear stays on its packed kernel, whose cost barely grows with the rows
DRAFT_STEP_ROWS = QUANT_MAX_ROWS


@dataclass
class PlannedSegment:
    turn: Turn
    tokens: list[int]  # a decoding turn: its last token, then the guessed ones (``draft``)
    draft: list[int] = field(default_factory=list)

    @property
    def completes_prompt(self) -> bool:
        """True if this segment ends the turn's prompt (or is a decode token), so the step samples for it."""
        if self.turn.state is TurnState.DECODING:
            return True
        return self.turn.prefill_position + len(self.tokens) == self.turn.prompt_tokens

    @property
    def logits_rows(self) -> int:
        """Rows of logits this segment needs: one per token it verifies (the guesses and the last token), else one."""
        if self.draft:
            return len(self.tokens)
        return 1 if self.completes_prompt else 0


COMPANY_WINDOW_SECONDS = 5.0  # another session's turn this recent suggests a burst from several tabs


class Scheduler:
    def __init__(self, options: BatchingOptions, draft_tokens: int = 0) -> None:
        self.options = options
        self.draft_tokens = draft_tokens
        self.waiting: deque[Turn] = deque()
        self.running: list[Turn] = []
        self._decode_cursor = 0
        self._last_submit: dict[str, float] = {}  # session -> when it last sent a turn (recent ones only)

    @property
    def max_batch_size(self) -> int:
        return self.options.max_batch_size if self.options.enabled else 1

    def enqueue(self, turn: Turn) -> None:
        if len(self.waiting) >= self.options.max_total_queued_requests:
            raise QueueFullError(
                f"The engine queue is full ({self.options.max_total_queued_requests} turns waiting). "
                "Try again when a reply finishes."
            )
        self.waiting.append(turn)
        now = turn.submitted_at
        self._last_submit = {sid: at for sid, at in self._last_submit.items() if now - at < COMPANY_WINDOW_SECONDS}
        turn.session_is_new = turn.session_id not in self._last_submit
        self._last_submit[turn.session_id] = now

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def batch_wait_remaining(self, now: float) -> float:
        """Seconds to keep waiting for more turns before admitting; 0 means admit now."""
        if not self.waiting or any(t.state is TurnState.DECODING for t in self.running):
            return 0.0
        if len(self.waiting) + len(self.running) >= self.max_batch_size:
            return 0.0
        first = self.waiting[0]
        if not self._company_plausible(first, now):
            return 0.0
        waited = now - first.submitted_at
        return max(0.0, self.options.max_batch_wait_ms / 1000 - waited)

    def _company_plausible(self, turn: Turn, now: float) -> bool:
        if turn.session_is_new:
            return True
        return any(sid != turn.session_id and now - at < COMPANY_WINDOW_SECONDS for sid, at in self._last_submit.items())

    def take_admissions(self) -> list[Turn]:
        """Waiting turns that may start now: free batch slots, and no other turn of the same session running."""
        busy = {turn.session_id for turn in self.running}
        admitted: list[Turn] = []
        kept: deque[Turn] = deque()
        while self.waiting:
            turn = self.waiting.popleft()
            if len(self.running) + len(admitted) < self.max_batch_size and turn.session_id not in busy:
                admitted.append(turn)
                busy.add(turn.session_id)
            else:
                kept.append(turn)
        self.waiting = kept
        return admitted

    def requeue_front(self, turn: Turn) -> None:
        """A turn that could not get KV memory waits at the head of the queue for a running turn to finish."""
        self.waiting.appendleft(turn)

    def plan_step(self) -> list[PlannedSegment]:
        decoding = [t for t in self.running if t.state is TurnState.DECODING]
        prefilling = [t for t in self.running if t.state is TurnState.PREFILLING]
        if self.options.prefill_only and not prefilling and decoding:
            self._decode_cursor = (self._decode_cursor + 1) % len(decoding)
            return self._with_drafts([decoding[self._decode_cursor]])
        plan: list[PlannedSegment] = []
        if not self.options.prefill_only:
            plan.extend(self._with_drafts(decoding))
        budget = max(1, self.options.prefill_chunk_tokens)
        for turn in prefilling:
            if budget <= 0:
                break
            tokens = turn.pending_input()[:budget]
            budget -= len(tokens)
            plan.append(PlannedSegment(turn, tokens))
        return plan

    def _with_drafts(self, decoding: list[Turn]) -> list[PlannedSegment]:
        """One segment per decoding turn; guesses added while the step's decode rows stay within DRAFT_STEP_ROWS."""
        room = DRAFT_STEP_ROWS - len(decoding)
        segments = []
        for turn in decoding:
            draft = turn.propose_draft(min(self.draft_tokens, room)) if room > 0 and self.draft_tokens else []
            room -= len(draft)
            segments.append(PlannedSegment(turn, turn.pending_input() + draft, draft))
        return segments

    def remove(self, turn: Turn) -> None:
        if turn in self.running:
            self.running.remove(turn)
        elif turn in self.waiting:
            self.waiting.remove(turn)
