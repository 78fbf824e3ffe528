"""What the engine promises its callers (the TUI, headless mode, the bench): requests in, events and results out.

The UI never touches torch and the engine never imports Textual; this module is where they meet.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator, Callable, Literal, Protocol, runtime_checkable

from chatkv.session_id import SESSION_ID_RULE, is_valid_session_id

FinishReason = Literal["stop", "length", "time", "cancelled", "error"]
ReusedFrom = Literal["memory", "disk", "none", "server"]


REPETITION_WINDOW = 64
"""Recent token ids (prompt and reply) a repetition penalty looks at: llama.cpp's ``repeat_last_n`` default."""


class EngineError(Exception):
    """A request the engine cannot take; the message is meant for the user."""


class QueueFullError(EngineError):
    pass


def check_session_id(session_id: str) -> None:
    """Raises ``EngineError`` if ``session_id`` is not safe as a file name and a store key (chatkv.session_id)."""
    if not is_valid_session_id(session_id):
        raise EngineError(f"{session_id!r} is not a valid session id: use {SESSION_ID_RULE}")


def check_turn_request(session_id: str, messages: list, sampling: "Sampling | None") -> "Sampling":
    """The checks every backend makes before it takes a turn; returns the sampling to use (default if None).

    Raises ``EngineError`` for an unsafe session id, a bad sampling value, or messages that do not end
    with a user message.
    """
    check_session_id(session_id)
    sampling = sampling or Sampling()
    sampling.validate()
    if not messages or messages[-1].role != "user":
        raise EngineError("a turn must end with a user message")
    return sampling


@dataclass(frozen=True)
class Sampling:
    """How one turn picks its tokens.

    temperature 0 is plain greedy decoding: the most likely token every step, with no penalty, so the reply is
    token-identical to a full-recompute reference (tests and the bench rely on it). Above 0, logits are divided by
    the temperature, tokens seen in the last ``REPETITION_WINDOW`` ids of the prompt and reply are penalised by
    ``repetition_penalty`` (CTRL-style: positive logits divided by it, negative ones multiplied; 1 is off), and
    the next token is drawn from the smallest set whose probability reaches ``top_p``.
    """

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    max_time_ms: int = 0  # 0: no limit
    repetition_penalty: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise EngineError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise EngineError("temperature must not be negative")
        if not 0.0 < self.top_p <= 1.0:
            raise EngineError("top_p must be in (0, 1]")
        if self.max_time_ms < 0:
            raise EngineError("max_time_ms must not be negative")
        if self.repetition_penalty <= 0:
            raise EngineError("repetition_penalty must be above 0 (1 is off)")


@dataclass(frozen=True)
class TokenEvent:
    session_id: str
    text: str  # the text this token adds to the reply (may be "" while a multi-byte character is incomplete)
    token_id: int


@dataclass
class TurnResult:
    """A finished turn. From a remote backend (``reused_from == "server"``) the token ids are empty and a
    count the server did not report (prompt, reused or prefilled tokens) is None, never a made-up 0."""

    session_id: str
    reply: str
    reply_ids: list[int]
    prompt_ids: list[int]
    prompt_tokens: int | None
    reused_tokens: int | None
    reused_from: ReusedFrom
    prefilled_tokens: int | None
    new_tokens: int
    ttft_ms: float
    decode_tok_s: float
    batch_size: int | None  # None from a remote backend: the server batches, and does not say with whom
    finish_reason: FinishReason
    dropped_messages: int = 0  # oldest messages left out to fit the context
    error: str | None = None
    total_ms: float = 0.0
    shared_tokens: int = 0  # of reused_tokens, those found in blocks another session computed
    shared_from: str | None = None  # that session's id, when all of them came from one session

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SessionStats:
    session_id: str
    tokens: int
    bytes: int
    resident: bool
    on_disk_bytes: int = 0
    # a remote backend's view of the session (None with the local engine, or where the server does not say)
    model: str | None = None
    slot: int | None = None  # llama.cpp slot the session is kept on
    server_prompt_tokens: int | None = None  # the last turn's prompt, as the server counted it
    server_cached_tokens: int | None = None  # of which the server served this many from its cache


@dataclass
class EngineStats:
    # KV store
    sessions: int = 0
    tokens: int = 0
    bytes: int = 0  # reserved: the KV tensors held, with the room each session keeps to grow into
    used_bytes: int = 0  # what the ``tokens`` held take up themselves
    peak_bytes: int = 0
    budget_bytes: int = 0
    evictions: int = 0
    evicted_tokens: int = 0
    evicted_bytes: int = 0
    # reuse
    prompt_tokens: int = 0
    reused_tokens: int = 0
    reused_tokens_same_session: int = 0  # from the session's own KV (memory or disk)
    reused_tokens_other_session: int = 0  # from blocks another session computed
    shared_blocks: int = 0  # KV blocks held by more than one session right now
    shared_bytes_saved: int = 0  # bytes those sessions would hold on top of `bytes` without sharing
    hit_rate: float = 0.0
    hit_rate_window: float = 0.0
    turns: int = 0
    turn_hits: int = 0
    disk_restores: int = 0
    disk_reused_tokens: int = 0
    disk_bytes: int = 0
    disk_budget_bytes: int = 0
    # batching
    forward_passes: int = 0
    avg_batch_size: float = 0.0
    avg_batch_wait_ms: float = 0.0
    avg_queue_depth: float = 0.0
    queue_depth: int = 0
    active_turns: int = 0
    rejected_requests: int = 0
    # throughput (rolling window)
    decode_tok_s: float = 0.0
    prefill_tok_s: float = 0.0
    decode_tok_s_history: list[float] = field(default_factory=list)
    last_ttft_ms: float = 0.0
    generated_tokens: int = 0
    prefilled_tokens: int = 0
    threads: int = 0  # torch threads the engine computes with
    # speculative decoding (prompt lookup, greedy turns): guessed tokens verified, and those accepted
    draft_tokens: int = 0  # the most tokens a turn guesses per step (0: off)
    drafted_tokens: int = 0
    accepted_draft_tokens: int = 0
    draft_acceptance_rate: float = 0.0  # accepted_draft_tokens / drafted_tokens
    weights: str = ""  # the model's dtype and weight quantization, e.g. "bfloat16+int4"
    # a remote backend's server-wide figures (chatkv.remote.server_metrics.ServerReport); None for the local engine
    server: Any = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TurnHandle:
    """One submitted turn: stream its tokens (``async for``), await its result, or block on it.

    The engine thread calls ``_push``/``_finish``; consumers may live on an asyncio loop or in a plain thread.
    ``listener``, if given, is called on the engine thread with every token event and, last, the result
    (``chatkv.engine.process`` forwards them to the app's process that way).
    """

    def __init__(self, session_id: str, loop: asyncio.AbstractEventLoop | None,
                 listener: Callable[[TokenEvent | TurnResult], None] | None = None) -> None:
        self.session_id = session_id
        self._loop = loop
        self._listener = listener
        self._queue: asyncio.Queue[TokenEvent | TurnResult] | None = asyncio.Queue() if loop else None
        self._done = threading.Event()
        self._result: TurnResult | None = None
        self._tokens: list[TokenEvent] = []

    @classmethod
    def for_caller(cls, session_id: str,
                   listener: Callable[[TokenEvent | TurnResult], None] | None = None) -> "TurnHandle":
        """A handle whose events reach the calling thread's event loop, if it runs one (else use ``wait()``)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        return cls(session_id, loop, listener)

    # engine side -------------------------------------------------------------------------------
    def _push(self, event: TokenEvent) -> None:
        self._tokens.append(event)
        self._deliver(event)

    def _finish(self, result: TurnResult) -> None:
        self._result = result
        self._done.set()
        self._deliver(result)

    def _deliver(self, item: TokenEvent | TurnResult) -> None:
        if self._listener is not None:
            self._listener(item)
        if self._loop is None or self._queue is None:
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:
            pass  # the consumer's loop is closed: nobody is listening any more

    # consumer side -----------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._done.is_set()

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[TokenEvent]:
        if self._queue is None:
            raise RuntimeError("this turn was submitted outside an event loop; use wait()")
        while True:
            item = await self._queue.get()
            if isinstance(item, TurnResult):
                self._queue.put_nowait(item)  # leave it for result()
                return
            yield item

    async def result(self) -> TurnResult:
        async for _ in self:
            pass
        assert self._result is not None
        return self._result

    def wait(self, timeout: float | None = None) -> TurnResult:
        if not self._done.wait(timeout):
            raise TimeoutError(f"turn for session {self.session_id} did not finish in {timeout} s")
        assert self._result is not None
        return self._result

    @property
    def tokens(self) -> list[TokenEvent]:
        return list(self._tokens)


@dataclass(frozen=True)
class BackendCapabilities:
    """What an engine-like object does beyond the calls every ``Backend`` answers: declared, never guessed."""

    holds_kv: bool = True  # the KV cache is this machine's: snapshots, evictions and memory figures are chatkv's
    server_models: bool = False  # a server offering models to choose from: models(), refresh_models(), set_model()


@runtime_checkable
class Backend(Protocol):
    """The one surface the App (terminal UI and headless mode) uses to run turns, whatever runs them: the engine in
    this process (``engine.Engine``), in its own process (``engine.process.EngineProcess``), loading or restarting
    behind the App (``runtime.LoadingEngine``), or a remote server (``remote.backend.RemoteBackend``)."""

    capabilities: BackendCapabilities

    def submit(self, session_id: str, messages: list, sampling: Sampling | None = None) -> TurnHandle:
        """Start a turn answering ``messages`` (``conversation.Message``, ending with the user's); raises ``EngineError``."""

    def cancel(self, session_id: str) -> bool:
        """Stop the session's turn, keeping what it wrote; False if it had none."""

    def forget(self, session_id: str) -> None:
        """The session is gone: drop its KV, in memory and on disk."""

    def fork_kv(self, parent_session_id: str, child_session_id: str) -> int:
        """Let the child start with the parent's KV; returns the tokens shared."""

    def snapshot(self, session_ids: list[str] | None = None) -> int:
        """Write the KV of these sessions (all: None) to disk; returns how many were written."""

    def stats(self) -> EngineStats:
        """The figures of the stats panel and headless ``stats`` events (docs/contracts.md, Metrics)."""

    def session_stats(self, session_id: str) -> SessionStats | None:
        """One session's figures, None if it has none yet."""

    async def until_ready(self) -> None:
        """Return once turns can be submitted (at once, except while a model loads or an engine restarts)."""

    def close(self) -> None:
        """End running turns as cancelled and free everything."""
