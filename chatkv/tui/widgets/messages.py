"""The blocks a chat is made of: what the user wrote, the model's reply with its footer, and notes.

Everything the model or the user wrote is shown literally: user text is plain ``Content`` (never
parsed as markup), replies are Markdown with raw HTML switched off, and both go through
``literal_text.visible`` so control characters never reach the terminal.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from markdown_it import MarkdownIt
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.content import Content
from textual.timer import Timer
from textual.widgets import Markdown, Static
from textual.widgets.markdown import MarkdownStream

from chatkv.tui.literal_text import visible

# New text is shown at most this often while streaming: every repaint re-lays out the screen, and on a
# small CPU the UI thread would otherwise take time from the engine writing the tokens (and the GIL, when
# the engine runs in this process: [model] engine_process off). Measured on 2 cores through the headless
# App with the engine in this process (one 64-token reply, 9 rounds each): 15 frames a second streamed
# ~20% fewer tokens per second than 10. Not measured again since the engine got its own process.
STREAM_FRAME_SECONDS = 1 / 10

FINISH_NOTES = {
    "length": "stopped at the token limit",
    "time": "stopped at the time limit",
    "cancelled": "stopped",
    "error": "failed",
}


def _keep_line_breaks(state) -> None:
    """A single newline inside a paragraph is a soft break, which Textual's Markdown shows as a space; make it a hard one."""
    for token in state.tokens:
        for child in token.children or ():
            if child.type == "softbreak":
                child.type = "hardbreak"


@functools.cache
def reply_parser() -> MarkdownIt:
    """GitHub-flavoured Markdown with raw HTML shown as text; single newlines kept, as the model wrote them.

    One parser for every reply (a parser holds no state between ``parse`` calls): the streaming Markdown
    widget asks for one on every frame, and building one costs about a millisecond of the main thread.
    """
    parser = MarkdownIt("gfm-like", {"html": False, "breaks": True})
    parser.core.ruler.push("keep_line_breaks", _keep_line_breaks)
    return parser


def code_blocks(markdown: str) -> list[str]:
    """The contents of the fenced and indented code blocks in ``markdown``, in order, without their fences."""
    return [token.content for token in reply_parser().parse(markdown) if token.type in ("fence", "code_block")]


def describe_reply(stats: dict[str, Any]) -> str:
    """The footer under a reply: '42 tokens · TTFT 85 ms · 31.0 tok/s · 118/130 prompt tokens from cache'."""
    parts = [f"{stats.get('new_tokens', 0)} tokens"]
    if stats.get("ttft_ms") is not None:
        parts.append(f"TTFT {stats['ttft_ms']:.0f} ms")
    if stats.get("decode_tok_s") is not None:
        parts.append(f"{stats['decode_tok_s']:.1f} tok/s")
    if stats.get("prompt_tokens"):
        if stats.get("reused_tokens") is None:  # a server that does not report its cache: say so, never show 0
            parts.append(f"{stats['prompt_tokens']} prompt tokens (cache use not reported by the server)")
        else:
            source = {"disk": " (disk snapshot)", "server": " (server's cache)"}.get(stats.get("reused_from"), "")
            if stats.get("shared_with"):
                source = f" (shared with tab {stats['shared_with']})"
            parts.append(f"{stats['reused_tokens']}/{stats['prompt_tokens']} prompt tokens from cache{source}")
    if stats.get("dropped_messages"):
        parts.append(f"{stats['dropped_messages']} oldest messages left out to fit the context")
    note = FINISH_NOTES.get(stats.get("finish_reason", ""))
    if note:
        parts.append(note)
    return " · ".join(parts)


class UserMessage(Static):
    DEFAULT_CSS = """
    UserMessage {
        margin: 1 0 0 8;
        padding: 0 1;
        background: $boost;
        border-left: thick $accent;
    }
    """

    def __init__(self, text: str, message_index: int | None = None) -> None:
        super().__init__(Content(visible(text)))
        self.text = text
        self.message_index = message_index  # position in the conversation; None once it no longer stands for one


class ChatNote(Static):
    """A line from the app itself inside the chat: an error, or why a turn did not run."""

    DEFAULT_CSS = """
    ChatNote {
        margin: 1 0 0 0;
        padding: 0 1;
        color: $text-warning;
    }
    ChatNote.-error { color: $text-error; }
    """

    def __init__(self, text: str, error: bool = False) -> None:
        super().__init__(Content(text), classes="-error" if error else "")


class AssistantReply(Vertical):
    """One reply: Markdown that streams while the model writes, then a footer with the turn's figures."""

    DEFAULT_CSS = """
    AssistantReply {
        height: auto;
        margin: 1 8 0 0;
    }
    AssistantReply > Markdown {
        margin: 0;
        padding: 0 1;
    }
    AssistantReply > .reply-footer {
        color: $text-muted;
        padding: 0 1;
    }
    AssistantReply.-streaming > .reply-footer { color: $text-accent; }
    AssistantReply.-stopped > .reply-footer { color: $text-warning; }
    """

    def __init__(self, text: str = "", stats: dict[str, Any] | None = None, message_index: int | None = None) -> None:
        super().__init__()
        self.text = text
        self.message_index = message_index  # position in the conversation; None once it no longer stands for one
        self._initial_stats = stats
        self._streaming = False
        # made at the first frame: stopping a stream whose task never ran would cancel the caller instead
        self._stream: MarkdownStream | None = None
        self._unshown = ""  # streamed text waiting for the next frame
        self._frame: Timer | None = None

    def compose(self) -> ComposeResult:
        yield Markdown(visible(self.text), parser_factory=reply_parser, open_links=False)
        footer = describe_reply(self._initial_stats) if self._initial_stats else ""
        yield Static(Content(footer), classes="reply-footer")

    @property
    def markdown(self) -> Markdown:
        return self.query_one(Markdown)

    def begin_streaming(self) -> None:
        self.add_class("-streaming")
        self.query_one(".reply-footer", Static).update(Content("writing…"))
        self._streaming = True

    def append(self, fragment: str) -> None:
        self.text += fragment
        self._unshown += fragment
        if self._frame is None and self._streaming:
            self._frame = self.set_timer(STREAM_FRAME_SECONDS, self._show_unshown)

    async def _show_unshown(self) -> None:
        self._frame = None
        text, self._unshown = self._unshown, ""
        if text and self._streaming:
            if self._stream is None:
                self._stream = Markdown.get_stream(self.markdown)
            await self._stream.write(visible(text))

    async def finish(self, text: str, stats: dict[str, Any]) -> None:
        """Stop streaming and render the whole reply once, so the end result never depends on how it was chunked."""
        if self._frame is not None:
            self._frame.stop()
            self._frame = None
        self._unshown = ""
        self._streaming = False
        if self._stream is not None:
            stream, self._stream = self._stream, None
            try:
                await stream.stop()
            except asyncio.CancelledError:
                # stop() cancels the stream's task and awaits it; if that task had not started yet, the await
                # raises here although nobody cancelled *this* turn. Only a cancel aimed at us goes on up.
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
        self.text = text
        await self.markdown.update(visible(text))
        self.remove_class("-streaming")
        self.set_class(stats.get("finish_reason") == "cancelled", "-stopped")
        self.query_one(".reply-footer", Static).update(Content(describe_reply(stats)))
