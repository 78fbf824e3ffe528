"""Dialog for a new chat tab: an optional name and an optional system prompt."""

from __future__ import annotations

from dataclasses import dataclass

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, TextArea


@dataclass(frozen=True)
class NewTabRequest:
    name: str  # "" lets the app pick one
    system: str


class NewTabScreen(ModalScreen[NewTabRequest | None]):
    DEFAULT_CSS = """
    NewTabScreen { align: center middle; }
    NewTabScreen > Vertical {
        width: 70;
        height: auto;
        padding: 1 2;
        border: thick $primary;
        background: $surface;
    }
    NewTabScreen TextArea { height: 6; }
    NewTabScreen Horizontal { height: auto; align-horizontal: right; margin-top: 1; }
    NewTabScreen Button { margin-left: 1; }
    """
    BINDINGS = [Binding("escape", "cancel", "Cancel", id="dialog.cancel")]

    def __init__(self, default_system: str = "") -> None:
        super().__init__()
        self.default_system = default_system

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Name (optional)")
            yield Input(placeholder="e.g. recipes", id="name")
            yield Label("System prompt (optional)")
            yield TextArea(self.default_system, id="system")
            with Horizontal():
                yield Button("Cancel", id="cancel")
                yield Button("Create", id="create", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#name", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._create()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "create":
            self._create()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def _create(self) -> None:
        name = self.query_one("#name", Input).value.strip()
        system = self.query_one("#system", TextArea).text.strip()
        self.dismiss(NewTabRequest(name, system))
