"""Dialog to edit one of the user's earlier messages before it is sent again."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.widgets import Label

from chatkv.tui.screens.dialog import Dialog
from chatkv.tui.widgets.prompt_input import PromptInput


class EditMessageScreen(Dialog[str | None]):
    """Dismisses with the edited text (Enter), or None when cancelled (Esc) or left blank."""

    DEFAULT_CSS = """
    EditMessageScreen { align: center middle; }
    EditMessageScreen > Vertical {
        width: 80%;
        max-width: 100;
        height: auto;
        padding: 1 2;
        border: thick $primary;
        background: $surface;
    }
    """
    BINDINGS = [Binding("escape", "cancel", "Cancel", id="dialog.cancel")]

    def __init__(self, text: str, later_messages: int) -> None:
        super().__init__()
        self.text = text
        self.later_messages = later_messages

    def compose(self) -> ComposeResult:
        later = (f" The {self.later_messages} message(s) after it leave this conversation (fork first to keep them)."
                 if self.later_messages else "")
        with Vertical():
            yield Label(Content(f"Edit and resend: Enter sends, Ctrl+J adds a line, Esc cancels.{later}"))
            yield PromptInput(id="edited")

    def on_mount(self) -> None:
        editor = self.query_one(PromptInput)
        editor.load_text(self.text)  # as written: the editor never draws its control characters
        editor.move_cursor(editor.document.end)
        editor.focus()

    def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        event.stop()
        self.dismiss(event.text)

    def action_cancel(self) -> None:
        self.dismiss(None)
