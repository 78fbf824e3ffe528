"""Counters and rolling rates for the stats panel, headless stats and the bench (definitions: docs/contracts.md, Metrics)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

WINDOW_SECONDS = 10.0
HIT_RATE_WINDOW_TURNS = 20
HISTORY_POINTS = 60
HISTORY_INTERVAL = 0.5


@dataclass
class _StepRecord:
    at: float
    prefill_tokens: int
    prefill_seconds: float
    decode_tokens: int
    decode_seconds: float


@dataclass
class EngineMetrics:
    forward_passes: int = 0
    batched_sessions: int = 0  # sum over forward passes of the sessions in each
    turns: int = 0
    turn_hits: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0
    shared_tokens: int = 0  # of reused_tokens, those from blocks another session computed
    disk_restores: int = 0
    disk_reused_tokens: int = 0
    generated_tokens: int = 0
    prefilled_tokens: int = 0
    admitted: int = 0
    wait_seconds: float = 0.0
    queue_depth_samples: int = 0
    queue_depth_sum: int = 0
    rejected_requests: int = 0
    last_ttft_ms: float = 0.0
    drafted_tokens: int = 0  # speculative decoding: guessed tokens fed to be verified
    accepted_draft_tokens: int = 0  # of which the model agreed with (and the reply kept) this many
    _steps: deque = field(default_factory=deque)
    _recent_turns: deque = field(default_factory=lambda: deque(maxlen=HIT_RATE_WINDOW_TURNS))
    decode_history: deque = field(default_factory=lambda: deque(maxlen=HISTORY_POINTS))
    _history_at: float = 0.0

    def record_step(
        self, sessions: int, prefill_tokens: int, decode_tokens: int, seconds: float, queue_depth: int,
        decode_generated: int | None = None,
    ) -> None:
        """One forward pass; its time is split between prefill and decode in proportion to the tokens fed.

        ``decode_tokens`` counts the tokens decoding turns fed (last tokens and guesses), ``decode_generated``
        the tokens they got out of it (more than one each where guesses were accepted, none where the turn
        ended before sampling); the decode rate counts the latter. By default the two are the same.
        """
        self.forward_passes += 1
        self.batched_sessions += sessions
        self.prefilled_tokens += prefill_tokens
        self.queue_depth_samples += 1
        self.queue_depth_sum += queue_depth
        total = prefill_tokens + decode_tokens
        prefill_share = seconds * prefill_tokens / total if total else 0.0
        generated = decode_tokens if decode_generated is None else decode_generated
        now = time.monotonic()
        self._steps.append(_StepRecord(now, prefill_tokens, prefill_share, generated, seconds - prefill_share))
        self._trim(now)

    def record_draft(self, drafted: int) -> None:
        """Guessed tokens fed to a forward pass to be verified."""
        self.drafted_tokens += drafted

    def record_draft_accepted(self, accepted: int) -> None:
        """Guessed tokens the model agreed with that became reply tokens."""
        self.accepted_draft_tokens += accepted

    def record_generated(self, count: int) -> None:
        self.generated_tokens += count

    def record_admission(self, wait_seconds: float) -> None:
        self.admitted += 1
        self.wait_seconds += wait_seconds

    def record_turn(
        self, prompt_tokens: int, reused_tokens: int, from_disk: bool, ttft_ms: float, shared_tokens: int = 0
    ) -> None:
        self.turns += 1
        self.shared_tokens += shared_tokens
        self.turn_hits += reused_tokens > 0
        self.prompt_tokens += prompt_tokens
        self.reused_tokens += reused_tokens
        if from_disk:
            self.disk_restores += 1
            self.disk_reused_tokens += reused_tokens
        if ttft_ms:
            self.last_ttft_ms = ttft_ms
        self._recent_turns.append((prompt_tokens, reused_tokens))

    def _trim(self, now: float) -> None:
        while self._steps and now - self._steps[0].at > WINDOW_SECONDS:
            self._steps.popleft()

    def rates(self) -> tuple[float, float]:
        """(decode tok/s, prefill tok/s) over the recent window."""
        self._trim(time.monotonic())
        decode_tokens = sum(s.decode_tokens for s in self._steps)
        decode_seconds = sum(s.decode_seconds for s in self._steps)
        prefill_tokens = sum(s.prefill_tokens for s in self._steps)
        prefill_seconds = sum(s.prefill_seconds for s in self._steps)
        return (
            decode_tokens / decode_seconds if decode_seconds > 0 else 0.0,
            prefill_tokens / prefill_seconds if prefill_seconds > 0 else 0.0,
        )

    def sample_history(self) -> None:
        """Add a point to the tok/s sparkline at most every HISTORY_INTERVAL seconds."""
        now = time.monotonic()
        if now - self._history_at >= HISTORY_INTERVAL:
            self._history_at = now
            self.decode_history.append(round(self.rates()[0], 1))

    @property
    def hit_rate(self) -> float:
        return self.reused_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def hit_rate_window(self) -> float:
        prompt = sum(p for p, _ in self._recent_turns)
        return sum(r for _, r in self._recent_turns) / prompt if prompt else 0.0

    @property
    def draft_acceptance_rate(self) -> float:
        """Accepted guessed tokens / guessed tokens (0 before any guess)."""
        return self.accepted_draft_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def avg_batch_size(self) -> float:
        return self.batched_sessions / self.forward_passes if self.forward_passes else 0.0

    @property
    def avg_batch_wait_ms(self) -> float:
        return self.wait_seconds * 1000 / self.admitted if self.admitted else 0.0

    @property
    def avg_queue_depth(self) -> float:
        return self.queue_depth_sum / self.queue_depth_samples if self.queue_depth_samples else 0.0
