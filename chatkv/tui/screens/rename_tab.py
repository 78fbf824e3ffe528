"""Dialog to rename the current tab."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Input, Label

from chatkv.tui.screens.dialog import Dialog
from chatkv.tui.widgets.text_fields import SafeInput


class RenameTabScreen(Dialog[str | None]):
    """Dismisses with the new name, or None when cancelled or left blank."""

    DEFAULT_CSS = """
    RenameTabScreen { align: center middle; }
    RenameTabScreen > Vertical {
        width: 60;
        height: auto;
        padding: 1 2;
        border: thick $primary;
        background: $surface;
    }
    """
    BINDINGS = [Binding("escape", "cancel", "Cancel", id="dialog.cancel")]

    def __init__(self, current_name: str) -> None:
        super().__init__()
        self.current_name = current_name

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("New name (Enter to keep it, Esc to cancel)")
            yield SafeInput(self.current_name, id="name")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)
