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
from chatkv.tui.screens.edit_message import EditMessageScreen
from chatkv.tui.widgets.chat_view import ChatView
from chatkv.tui.widgets.prompt_input import PromptInput
from chatkv.visible_text import visible

BUSY_MESSAGE = "This tab is still replying: wait for it to finish, or press Esc to stop it."
STOPPED_BEFORE_REPLY = "Stopped before the model answered: your message is back in the box."


async def first_of(*awaitables) -> None:
    """Wait until one of ``awaitables`` is done; the others are cancelled."""
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


class TurnRefused(Exception):
    """A regenerate or edit that cannot run as asked; the message is for the user. Nothing was changed."""


def shared_head(old: list[Message], new: list[Message]) -> int:
    """How many leading messages ``new`` shares with ``old`` as the very same objects (kept, not rewritten)."""
    count = 0
    for before, after in zip(old, new):
        if before is not after:
            break
        count += 1
    return count


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
        **({"shared_tokens": result.shared_tokens} if result.shared_tokens else {}),
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
        super().__init__(Content(visible(conversation.name, one_line=True)), id=pane_id(conversation.id))
        self.conversation = conversation
        self.engine = engine
        self._save = save
        self.sampling = sampling
        self.persisted = persisted  # False: an --ephemeral tab, never written
        self.token_listeners: list[Callable[[str], None]] = []
        self._turn: Worker[TurnOutcome] | None = None
        self._stop_requested = asyncio.Event()  # Esc on this turn, in whatever state it is
        self._waiting_for_model = False

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
        origin = self.conversation.forked_from
        if origin is not None:
            await self.chat_view.add_note(f"Forked from {origin.name!r} at message {origin.message}; "
                                          "from here on this tab is its own conversation.")
        if messages and messages[-1].role == "user":
            if origin is not None and origin.message == len(messages) - 1:
                await self.chat_view.add_note("Forked before the reply: press Ctrl+G to write one, or send a message.")
            else:
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

    def on_chat_view_edit_requested(self, event: ChatView.EditRequested) -> None:
        event.stop()
        self.ask_to_edit(event.index)

    def ask_to_edit(self, index: int) -> None:
        """Open the edit dialog on user message ``index``; what the user confirms is sent in its place."""
        messages = self.conversation.messages
        if self.generating:
            self.notify(BUSY_MESSAGE, severity="warning")
            return
        if not 0 <= index < len(messages) or messages[index].role != "user":
            self.notify("Only your own messages can be edited: pick one with ↑/↓, or regenerate a reply with Ctrl+G.",
                        severity="warning")
            return

        def resend(text: str | None) -> None:
            if text is None or not self.is_attached:
                return
            try:
                self.edit(index, text)
            except TurnRefused as exc:
                self.notify(str(exc), severity="warning")
                return
            self.focus_input()

        self.app.push_screen(EditMessageScreen(messages[index].content, len(messages) - index - 1), resend)

    def send(self, text: str, sampling: Sampling | None = None) -> Worker[TurnOutcome]:
        """Start a turn; its worker's result is the ``TurnOutcome``. The caller checks ``generating`` first."""
        if self.generating:
            raise RuntimeError("send() while a turn is running; check ChatTab.generating first")
        history = self.conversation.messages + [Message("user", text)]
        return self._start_turn(history, sampling, typed=text)

    def regenerate(self, sampling: Sampling | None = None) -> Worker[TurnOutcome]:
        """Write the last reply again, replacing it (a trailing user message with no reply gets one).

        Raises ``TurnRefused`` (its message is for the user) while a reply is being written or when the
        conversation has no message to answer yet.
        """
        self._refuse_while_generating()
        messages = self.conversation.messages
        last_user = next((index for index in range(len(messages) - 1, -1, -1) if messages[index].role == "user"), None)
        if last_user is None:
            raise TurnRefused("There is no reply to regenerate yet: send a message first.")
        return self._start_turn(messages[: last_user + 1], sampling)

    def edit(self, index: int, text: str, sampling: Sampling | None = None) -> Worker[TurnOutcome]:
        """Replace user message ``index`` (0-based, system prompt excluded) with ``text`` and send it.

        The messages after it leave the conversation. Raises ``TurnRefused`` while a reply is being
        written, for a position that is not a user message, or for blank text; nothing changes then.
        """
        self._refuse_while_generating()
        messages = self.conversation.messages
        if not 0 <= index < len(messages):
            raise TurnRefused(f"There is no message {index} here: this conversation has messages 0 to {len(messages) - 1}."
                              if messages else "There is no message to edit yet.")
        if messages[index].role != "user":
            raise TurnRefused(f"Message {index} is a reply; only your own messages can be edited. "
                              "Regenerate a reply instead, or fork the conversation at it.")
        if not text.strip():
            raise TurnRefused("The edited message is empty; nothing was sent.")
        return self._start_turn(messages[:index] + [Message("user", text)], sampling, typed=text)

    def _refuse_while_generating(self) -> None:
        if self.generating:
            raise TurnRefused(BUSY_MESSAGE)

    def _start_turn(self, history: list[Message], sampling: Sampling | None, typed: str | None = None) -> Worker[TurnOutcome]:
        self._stop_requested = asyncio.Event()
        self._turn = self.run_worker(self._run_turn(history, sampling or self.sampling, typed), group="turn",
                                     exit_on_error=True)
        return self._turn

    def stop(self) -> bool:
        """Stop this tab's turn in whatever state it is: waiting for the model to load (the message is handed back),
        queued, prefilling or decoding (the engine ends it as 'cancelled', keeping the text so far)."""
        if not self.generating:
            return False
        self._stop_requested.set()
        self.engine.cancel(self.session_id)
        return True

    @property
    def waiting_for_model(self) -> bool:
        """The turn waits for the model to load: nothing of it has reached the engine yet."""
        return self.generating and self._waiting_for_model

    async def _run_turn(self, history: list[Message], sampling: Sampling, typed: str | None) -> TurnOutcome:
        """Make ``history`` (ending with a user message) the conversation and answer it.

        ``history`` starts with some of the current messages, the very same objects: those stay on
        screen, the rest of the view is redrawn from there. ``typed``: text the user typed for this
        turn, offered again in the input if the turn cannot run.
        """
        conversation = self.conversation
        previous = conversation.messages
        keep = shared_head(previous, history)
        conversation.messages = history
        turn = conversation.turns
        self.save()
        self.post_message(self.BusyChanged(self))
        view = self.chat_view
        await view.show_from(history, keep)
        # the terminal UI shows before the model is ready (and while a dead engine restarts): the message goes once it is
        self._waiting_for_model = True
        try:
            await first_of(self.engine.until_ready(), self._stop_requested.wait())
        finally:
            self._waiting_for_model = False
        if self._stop_requested.is_set():
            return await self._give_back(previous, keep, typed, turn, STOPPED_BEFORE_REPLY, as_error=False)
        try:
            handle = self.engine.submit(self.session_id, conversation.prompt_messages(), sampling)
        except EngineError as exc:
            return await self._give_back(previous, keep, typed, turn, str(exc))
        reply = await view.start_reply(len(history))
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
        stats = self.reply_stats(result)
        if result.finish_reason == "error":
            await reply.finish(result.reply, stats)
            return await self._give_back(previous, keep, typed, turn, result.error or "the engine failed on this turn", result)
        # a remote server's reply has no ids here (None, not []): the local engine re-tokenizes its text if it ever sees it
        token_ids = list(result.reply_ids) if result.reply_ids else None
        conversation.messages.append(Message("assistant", result.reply, token_ids=token_ids, stats=stats))
        self.save()
        await reply.finish(result.reply, stats)
        return TurnOutcome(turn, result)

    def reply_stats(self, result: TurnResult) -> dict:
        stats = reply_stats(result)
        origin = self.conversation.forked_from
        if result.shared_tokens and origin is not None and origin.session == result.shared_from:
            stats["shared_with"] = origin.name
        return stats

    async def _give_back(self, previous: list[Message], keep: int, typed: str | None, turn: int, error: str,
                         result: TurnResult | None = None, as_error: bool = True) -> TurnOutcome:
        """The turn did not happen: put the conversation back as it was, say why, and offer the typed text again."""
        self.conversation.messages = previous
        self.save()
        view = self.chat_view
        if keep < len(previous):  # an edit or a regenerate took messages off the screen: show them again
            await view.show_from(previous, keep)
        else:  # a plain send: its message (and any failed reply) stay in sight above the note, standing for nothing
            for block in view.message_blocks:
                if block.message_index >= len(previous):
                    block.message_index = None
        await view.add_note(f"Not sent: {error}" if as_error else error, error=as_error)
        if typed is not None and not self.prompt_input.text:
            self.prompt_input.load_text(typed)
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
