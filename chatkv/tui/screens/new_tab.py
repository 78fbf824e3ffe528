"""Dialog for a new chat tab: an optional name, an optional system prompt, and the tab's generation settings."""

from __future__ import annotations

from dataclasses import dataclass

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, TextArea

from chatkv.engine.api import Sampling
from chatkv.tui.keys import NEW_TAB_DIALOG_BINDINGS
from chatkv.tui.widgets.sampling_form import SamplingForm

HINT = "Ctrl+S or Enter in a one-line box creates the tab · Esc cancels"


@dataclass(frozen=True)
class NewTabRequest:
    name: str  # "" lets the app pick one
    system: str
    sampling: Sampling


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
    NewTabScreen TextArea { height: 5; }
    NewTabScreen .hint { color: $text-muted; margin-top: 1; }
    NewTabScreen #problem { color: $text-error; }
    NewTabScreen Horizontal { height: auto; align-horizontal: right; margin-top: 1; }
    NewTabScreen Button { margin-left: 1; }
    """
    BINDINGS = NEW_TAB_DIALOG_BINDINGS

    def __init__(self, default_system: str, sampling: Sampling) -> None:
        super().__init__()
        self.default_system = default_system
        self.default_sampling = sampling

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Name (optional)")
            yield Input(placeholder="e.g. recipes", id="name")
            yield Label("System prompt (optional)")
            yield TextArea(self.default_system, id="system")
            yield SamplingForm(self.default_sampling, id="sampling")
            yield Label("", id="problem")
            yield Label(HINT, classes="hint")
            with Horizontal():
                yield Button("Cancel", id="cancel")
                yield Button("Create", id="create", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#name", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_create()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "create":
            self.action_create()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def action_create(self) -> None:
        try:
            sampling = self.query_one(SamplingForm).sampling()
        except ValueError as exc:
            self.query_one("#problem", Label).update(Content(str(exc)))
            return
        name = self.query_one("#name", Input).value.strip()
        system = self.query_one("#system", TextArea).text.strip()
        self.dismiss(NewTabRequest(name, system, sampling))
