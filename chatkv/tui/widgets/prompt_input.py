"""Where the user types: Enter sends, Ctrl+J (or Shift+Enter / Alt+Enter where the terminal tells them apart) adds a newline.

The editing keys are TextArea's (readline-like: Ctrl+W deletes a word); PgUp/PgDn and Ctrl+Home/End scroll the
chat history instead (``chatkv.tui.keys``).
"""

from __future__ import annotations

from dataclasses import dataclass

from textual import events
from textual.message import Message

from chatkv.tui.keys import HISTORY_BINDINGS
from chatkv.tui.widgets.text_fields import SafeTextArea

NEWLINE_KEYS = {"ctrl+j", "shift+enter", "alt+enter"}


class PromptInput(SafeTextArea):
    BINDINGS = HISTORY_BINDINGS
    DEFAULT_CSS = """
    PromptInput {
        height: auto;
        min-height: 3;
        max-height: 10;
        border: tall $border-blurred;
    }
    PromptInput:focus { border: tall $border; }
    """

    @dataclass
    class Submitted(Message):
        """Enter was pressed on text that is not blank."""

        prompt_input: "PromptInput"
        text: str

        @property
        def control(self) -> "PromptInput":
            return self.prompt_input

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, soft_wrap=True, show_line_numbers=False, compact=False, placeholder="Message… (Enter sends, Ctrl+J new line)")

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            if self.text.strip():
                self.post_message(self.Submitted(self, self.text))
        elif event.key in NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            self.insert("\n")
