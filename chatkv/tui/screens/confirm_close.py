"""Dialog before closing a tab: close it (the conversation stays saved), delete the conversation too, or cancel."""

from __future__ import annotations

from enum import Enum

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.widgets import Button, Static

from chatkv.tui.screens.dialog import Dialog
from chatkv.visible_text import visible

CLOSE_EXPLAINED = ("Closing keeps the conversation saved: reopen it from the command palette (Ctrl+P, \"Reopen\"). "
                   "Deleting removes it and its KV snapshot.")


class CloseChoice(Enum):
    CLOSE = "close"
    DELETE = "delete"


class ConfirmCloseScreen(Dialog[CloseChoice | None]):
    DEFAULT_CSS = """
    ConfirmCloseScreen { align: center middle; }
    ConfirmCloseScreen > Vertical {
        width: 70;
        height: auto;
        padding: 1 2;
        border: thick $warning;
        background: $surface;
    }
    ConfirmCloseScreen Static { width: 1fr; }
    ConfirmCloseScreen Horizontal { height: auto; align-horizontal: right; margin-top: 1; }
    ConfirmCloseScreen Button { margin-left: 1; }
    """
    BINDINGS = [Binding("escape", "cancel", "Cancel", id="dialog.cancel")]

    def __init__(self, tab_name: str, generating: bool) -> None:
        super().__init__()
        self.tab_name = tab_name
        self.generating = generating

    def compose(self) -> ComposeResult:
        question = f"Close {visible(self.tab_name, one_line=True)!r}?"
        if self.generating:
            question += " Its reply is still being written and will be stopped."
        with Vertical():
            yield Static(Content(question))
            yield Static(Content(CLOSE_EXPLAINED))
            with Horizontal():
                yield Button("Cancel", id="cancel")
                yield Button("Delete", id="delete", variant="error")
                yield Button("Close", id="close", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#close", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        choices = {"close": CloseChoice.CLOSE, "delete": CloseChoice.DELETE}
        self.dismiss(choices.get(event.button.id or ""))

    def action_cancel(self) -> None:
        self.dismiss(None)
