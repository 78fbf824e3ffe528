"""The scrolling history of one chat: user messages, replies (one may be streaming) and notes.

The view is anchored to its bottom: new text scrolls it along only while the user is at the bottom;
scrolling up releases the anchor, and coming back down restores it (Textual's ``anchor``).

When the view has focus (Tab / Shift+Tab from the input, or a click on a message) it works like
Textual's ``OptionList``: ↑/↓, Home/End move a highlight over the messages, and the highlighted one
can be edited and resent (``e`` or Enter, user messages) or forked into a new tab (``f``). The view
only says what was asked for (``EditRequested``, ``ForkRequested``); the tab and the app act on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual import events
from textual.containers import VerticalScroll
from textual.message import Message as TextualMessage
from textual.widget import Widget

from chatkv.conversation import Message
from chatkv.tui.keys import CHAT_VIEW_BINDINGS
from chatkv.tui.widgets.messages import AssistantReply, ChatNote, UserMessage, code_blocks

MessageBlock = UserMessage | AssistantReply


class ChatView(VerticalScroll):
    DEFAULT_CSS = """
    ChatView {
        height: 1fr;
        padding: 0 1 1 1;
    }
    ChatView:focus > .-selected { outline-left: thick $accent; background: $boost; }
    """
    BINDINGS = CHAT_VIEW_BINDINGS

    @dataclass
    class EditRequested(TextualMessage):
        """The user asked to edit and resend message ``index`` (its position in the conversation)."""

        index: int

    @dataclass
    class ForkRequested(TextualMessage):
        """The user asked for a new tab holding messages 0..``index``."""

        index: int

    def __init__(self) -> None:
        super().__init__()
        self.selected: int | None = None  # position in the conversation of the highlighted message

    def on_mount(self) -> None:
        self.anchor()

    # showing messages ------------------------------------------------------------------------------
    @staticmethod
    def _block_for(message: Message, index: int) -> MessageBlock | None:
        if message.role == "user":
            return UserMessage(message.content, index)
        if message.role == "assistant":
            return AssistantReply(message.content, message.stats or {}, index)
        return None

    async def show_history(self, messages: list[Message], start: int = 0) -> None:
        """Append blocks for ``messages``, the first of them at position ``start`` of the conversation."""
        blocks = [block for index, message in enumerate(messages, start) if (block := self._block_for(message, index))]
        if blocks:
            await self.mount_all(blocks)

    async def show_from(self, messages: list[Message], keep: int) -> None:
        """Show ``messages`` where the first ``keep`` are already shown: everything shown after them goes."""
        first_gone = next((block for block in self.message_blocks if block.message_index >= keep), None)
        if first_gone is not None:
            children = list(self.children)
            await self.remove_children(children[children.index(first_gone):])
        if self.selected is not None and self.selected >= keep:
            self.selected = None
        await self.show_history(messages[keep:], keep)

    async def start_reply(self, index: int | None = None) -> AssistantReply:
        reply = AssistantReply(message_index=index)
        await self.mount(reply)
        reply.begin_streaming()
        return reply

    async def add_note(self, text: str, error: bool = False) -> None:
        await self.mount(ChatNote(text, error=error))

    @property
    def replies(self) -> list[AssistantReply]:
        return list(self.query_children(AssistantReply))

    @property
    def message_blocks(self) -> list[MessageBlock]:
        """The blocks that stand for a message of the conversation, in order."""
        return [child for child in self.children
                if isinstance(child, (UserMessage, AssistantReply)) and child.message_index is not None]

    # selecting -------------------------------------------------------------------------------------
    def select_message(self, index: int | None) -> None:
        """Highlight the message at conversation position ``index`` (None: no highlight) and scroll to it."""
        self.selected = index
        for block in self.message_blocks:
            block.set_class(block.message_index == index, "-selected")
            if block.message_index == index:
                self.scroll_to_widget(block, animate=False)

    def _blocks_by_position(self) -> list[int]:
        return [block.message_index for block in self.message_blocks]

    def action_select(self, step: int) -> None:
        indices = self._blocks_by_position()
        if not indices:
            return
        if self.selected not in indices:
            self.select_message(indices[-1])
            return
        position = max(0, min(len(indices) - 1, indices.index(self.selected) + step))
        self.select_message(indices[position])

    def action_select_at(self, position: int) -> None:
        indices = self._blocks_by_position()
        if indices:
            self.select_message(indices[position])

    def action_edit_selected(self) -> None:
        if self.selected is not None:
            self.post_message(self.EditRequested(self.selected))

    def action_fork_selected(self) -> None:
        if self.selected is not None:
            self.post_message(self.ForkRequested(self.selected))

    def on_focus(self) -> None:
        if not self.region.area:
            # focus passing through a hidden tab (a dialog closing as another tab opens): picking a message would
            # scroll this tab's view and release its anchor, though the user never looked at it
            return
        if self.selected is None:
            self.action_select(0)  # the last message: where the user most likely wants to act
        else:
            self.select_message(self.selected)

    def on_click(self, event: events.Click) -> None:
        widget: Widget | None = event.widget
        while widget is not None and widget is not self:
            if isinstance(widget, (UserMessage, AssistantReply)) and widget.message_index is not None:
                self.focus()
                self.select_message(widget.message_index)
                return
            widget = widget.parent  # type: ignore[assignment]
    def scroll_to_place(self, where: str) -> None:
        """``page_up``, ``page_down``, ``top`` or ``bottom``; going back to the bottom follows new text again."""
        if where == "page_up":
            self.scroll_page_up()
        elif where == "page_down":
            self.scroll_page_down()
        elif where == "top":
            self.scroll_home(animate=False)
        elif where == "bottom":
            self.scroll_end(animate=False)
            self.anchor()
        else:
            raise ValueError(f"unknown place {where!r}")

    def last_reply_text(self) -> str | None:
        """The newest reply as the model wrote it (the part written so far, while it streams); None if there is none."""
        replies = self.replies
        return replies[-1].text if replies else None

    def last_code_block(self) -> str | None:
        """The last fenced or indented code block in this chat's replies, newest reply first; None if there is none."""
        for reply in reversed(self.replies):
            blocks = code_blocks(reply.text)
            if blocks:
                return blocks[-1]
        return None
