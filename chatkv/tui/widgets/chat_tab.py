"""One chat tab: its conversation, its history view, its input, and the turn it may be running.

A tab is one engine session (the conversation id). Sending appends and saves the user message,
submits the whole conversation to the engine, streams the reply into the view, then appends the
reply with the model's own token ids (so the next turn reuses the cached KV exactly) and saves again.
While a reply is being written the tab refuses a new message with a visible note rather than
queueing it: Esc stops the reply, keeping what was written.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable

from textual.app import ComposeResult
from textual.content import Content
from textual.message import Message as TextualMessage
from textual.widgets import TabPane
from textual.worker import Worker, WorkerCancelled, WorkerFailed

from chatkv.conversation import Conversation, Message
from chatkv.engine.api import EngineError, Sampling, TurnResult
from chatkv.tui.widgets.chat_view import ChatView
from chatkv.tui.widgets.prompt_input import PromptInput

BUSY_MESSAGE = "This tab is still replying: wait for it to finish, or press Esc to stop it."


def pane_id(session_id: str) -> str:
    """Widget ids may not start with a digit, session ids may."""
    return f"chat-{session_id}"


@dataclass
class TurnOutcome:
    """How a send ended: the engine's result, or the reason it never ran."""

    turn: int
    result: TurnResult | None = None
    error: str | None = None


def reply_stats(result: TurnResult) -> dict:
    return {
        "new_tokens": result.new_tokens,
        "ttft_ms": round(result.ttft_ms, 1),
        "decode_tok_s": round(result.decode_tok_s, 1),
        "reused_tokens": result.reused_tokens,
        "reused_from": result.reused_from,
        "prompt_tokens": result.prompt_tokens,
        "batch_size": result.batch_size,
        "finish_reason": result.finish_reason,
        "dropped_messages": result.dropped_messages,
    }


class ChatTab(TabPane):
    DEFAULT_CSS = """
    ChatTab {
        padding: 0;
        layout: vertical;
    }
    """

    class BusyChanged(TextualMessage):
        """The tab started or finished writing a reply."""

        def __init__(self, tab: "ChatTab") -> None:
            super().__init__()
            self.tab = tab

    def __init__(
        self,
        conversation: Conversation,
        engine,
        save: Callable[[Conversation], None],
        sampling: Sampling,
        persisted: bool = True,
    ) -> None:
        super().__init__(Content(conversation.name), id=pane_id(conversation.id))
        self.conversation = conversation
        self.engine = engine
        self._save = save
        self.sampling = sampling
        self.persisted = persisted  # False: an --ephemeral tab, never written
        self.token_listeners: list[Callable[[str], None]] = []
        self._turn: Worker[TurnOutcome] | None = None

    @property
    def session_id(self) -> str:
        return self.conversation.id

    @property
    def generating(self) -> bool:
        return self._turn is not None and not self._turn.is_finished

    @property
    def chat_view(self) -> ChatView:
        return self.query_one(ChatView)

    @property
    def prompt_input(self) -> PromptInput:
        return self.query_one(PromptInput)

    def compose(self) -> ComposeResult:
        yield ChatView()
        yield PromptInput()

    async def on_mount(self) -> None:
        messages = self.conversation.messages
        await self.chat_view.show_history(messages)
        if messages and messages[-1].role == "user":
            # the user message is saved when sent, the reply when it ends: chatkv stopped in between
            await self.chat_view.add_note("No reply was saved for this message: chatkv closed while writing it.")

    def focus_input(self) -> None:
        self.prompt_input.focus()

    def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        event.stop()
        if self.generating:
            self.notify(BUSY_MESSAGE, severity="warning")
            return
        self.prompt_input.clear()
        self.send(event.text)

    def send(self, text: str, sampling: Sampling | None = None) -> Worker[TurnOutcome]:
        """Start a turn; its worker's result is the ``TurnOutcome``. The caller checks ``generating`` first."""
        if self.generating:
            raise RuntimeError("send() while a turn is running; check ChatTab.generating first")
        self._turn = self.run_worker(self._run_turn(text, sampling or self.sampling), group="turn", exit_on_error=True)
        return self._turn

    def stop(self) -> bool:
        """Ask the engine to stop this tab's reply; the turn then ends as 'cancelled' with the text so far."""
        return self.generating and self.engine.cancel(self.session_id)

    async def _run_turn(self, text: str, sampling: Sampling) -> TurnOutcome:
        conversation = self.conversation
        conversation.messages.append(Message("user", text))
        turn = conversation.turns
        self.save()
        self.post_message(self.BusyChanged(self))
        view = self.chat_view
        await view.add_user_message(text)
        loaded = getattr(self.engine, "until_loaded", None)
        if loaded is not None:  # the terminal UI shows before the model is ready: the message goes once it is
            await loaded()
        try:
            handle = self.engine.submit(self.session_id, conversation.prompt_messages(), sampling)
        except EngineError as exc:
            return await self._give_back(text, turn, str(exc))
        reply = await view.start_reply()
        try:
            async for event in handle:
                if event.text:
                    reply.append(event.text)
                    for listener in self.token_listeners:
                        listener(event.text)
            result = await handle.result()
        except asyncio.CancelledError:
            self.engine.cancel(self.session_id)  # the tab is going away: free the engine's slot
            raise
        if result.finish_reason == "error":
            await reply.finish(result.reply, reply_stats(result))
            return await self._give_back(text, turn, result.error or "the engine failed on this turn", result)
        stats = reply_stats(result)
        # a remote server's reply has no ids here (None, not []): the local engine re-tokenizes its text if it ever sees it
        token_ids = list(result.reply_ids) if result.reply_ids else None
        conversation.messages.append(Message("assistant", result.reply, token_ids=token_ids, stats=stats))
        self.save()
        await reply.finish(result.reply, stats)
        return TurnOutcome(turn, result)

    async def _give_back(self, text: str, turn: int, error: str, result: TurnResult | None = None) -> TurnOutcome:
        """The turn did not happen: take the user message back out, say why, and offer the text again."""
        if self.conversation.messages and self.conversation.messages[-1].role == "user":
            self.conversation.messages.pop()
            self.save()
        await self.chat_view.add_note(f"Not sent: {error}", error=True)
        if not self.prompt_input.text:
            self.prompt_input.load_text(text)
        return TurnOutcome(turn, result, error)

    async def wait_for_turn(self) -> TurnOutcome | None:
        """Until the running turn (if any) has ended and been saved; its outcome, or None if it was cut off."""
        worker = self._turn
        if worker is None:
            return None
        try:
            return await worker.wait()
        except (WorkerCancelled, WorkerFailed):
            return None

    def save(self) -> None:
        self.conversation.updated = time.time()
        self._save(self.conversation)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.worker is self._turn and event.worker.is_finished:
            self.post_message(self.BusyChanged(self))
