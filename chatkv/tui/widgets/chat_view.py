"""The scrolling history of one chat: user messages, replies (one may be streaming) and notes.

The view is anchored to its bottom: new text scrolls it along only while the user is at the bottom;
scrolling up releases the anchor, and coming back down restores it (Textual's ``anchor``).
"""

from __future__ import annotations

from textual.containers import VerticalScroll

from chatkv.conversation import Message
from chatkv.tui.widgets.messages import AssistantReply, ChatNote, UserMessage, code_blocks


class ChatView(VerticalScroll):
    DEFAULT_CSS = """
    ChatView {
        height: 1fr;
        padding: 0 1 1 1;
    }
    """

    def on_mount(self) -> None:
        self.anchor()

    async def show_history(self, messages: list[Message]) -> None:
        blocks = []
        for message in messages:
            if message.role == "user":
                blocks.append(UserMessage(message.content))
            elif message.role == "assistant":
                blocks.append(AssistantReply(message.content, message.stats or {}))
        if blocks:
            await self.mount_all(blocks)

    async def add_user_message(self, text: str) -> UserMessage:
        block = UserMessage(text)
        await self.mount(block)
        return block

    async def start_reply(self) -> AssistantReply:
        reply = AssistantReply()
        await self.mount(reply)
        reply.begin_streaming()
        return reply

    async def add_note(self, text: str, error: bool = False) -> None:
        await self.mount(ChatNote(text, error=error))

    @property
    def replies(self) -> list[AssistantReply]:
        return list(self.query_children(AssistantReply))

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
