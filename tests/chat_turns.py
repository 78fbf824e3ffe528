"""Talk to an engine the way the app does: append the user message, wait for the turn, keep the reply's exact ids."""

from __future__ import annotations

from chatkv.conversation import Message
from chatkv.engine import Engine, Sampling, TurnResult


def chat(engine: Engine, session_id: str, history: list[Message], text: str, max_new_tokens: int = 8) -> TurnResult:
    history.append(Message("user", text))
    result = engine.submit(session_id, list(history), Sampling(max_new_tokens=max_new_tokens)).wait(120)
    assert result.error is None, result.error
    history.append(Message("assistant", result.reply, token_ids=result.reply_ids))
    return result
