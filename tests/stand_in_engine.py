"""A stand-in for the engine, for the few UI tests where the reply's exact text, figures or timing is the point.

Everywhere else the tests run the real engine (on SmolLM2 or the tiny random Llama). A model cannot be
made to write Textual markup or an escape sequence on cue, nor give a snapshot test the same timings
twice, so these tests replay fixed tokens through the real ``TurnHandle`` and the real App instead.
"""

from __future__ import annotations

import asyncio

from chatkv.conversation import Message
from chatkv.engine.api import BackendCapabilities, EngineStats, Sampling, SessionStats, TokenEvent, TurnHandle, TurnResult


class StandInEngine:
    """Replies to every turn with ``tokens``, at once; the other calls the App makes do nothing."""

    capabilities = BackendCapabilities()

    def __init__(self, tokens: list[str] | tuple[str, ...] = ("ok",)) -> None:
        self.tokens = list(tokens)
        self.prompts: list[str] = []  # the last user message of each turn, as the engine received it

    def submit(self, session_id: str, messages: list[Message], sampling: Sampling | None = None) -> TurnHandle:
        self.prompts.append(messages[-1].content)
        handle = TurnHandle(session_id, asyncio.get_running_loop())
        for index, text in enumerate(self.tokens):
            handle._push(TokenEvent(session_id, text, index))
        handle._finish(self.result_for(session_id))
        return handle

    def result_for(self, session_id: str) -> TurnResult:
        count = len(self.tokens)
        return TurnResult(session_id, "".join(self.tokens), list(range(count)), [1, 2, 3], 3, 0, "none", 3, count,
                          5.0, 100.0, 1, "stop")

    async def until_ready(self) -> None:
        pass

    def cancel(self, session_id: str) -> bool:
        return False

    def stats(self) -> EngineStats:
        return EngineStats()

    def session_stats(self, session_id: str) -> SessionStats | None:
        return None

    def snapshot(self, session_ids: list[str] | None = None) -> int:
        return 0

    def forget(self, session_id: str) -> None:
        pass

    def fork_kv(self, parent_session_id: str, child_session_id: str) -> int:
        return 0

    def close(self) -> None:
        pass
