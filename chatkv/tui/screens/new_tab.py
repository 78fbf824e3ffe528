"""Dialog for a new chat tab: an optional name, an optional system prompt, and the tab's generation settings."""

from __future__ import annotations

from dataclasses import dataclass

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.widgets import Button, Input, Label, TextArea

from chatkv.engine.api import Sampling
from chatkv.tui.screens.sampling_dialog import SamplingDialog
from chatkv.tui.widgets.sampling_form import SamplingForm
from chatkv.tui.widgets.text_fields import SafeInput, SafeTextArea

HINT = "Ctrl+S or Enter in a one-line box creates the tab · Esc cancels"


@dataclass(frozen=True)
class NewTabRequest:
    name: str  # "" lets the app pick one
    system: str
    sampling: Sampling


class NewTabScreen(SamplingDialog[NewTabRequest]):
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
    def __init__(self, default_system: str, sampling: Sampling) -> None:
        super().__init__()
        self.default_system = default_system
        self.default_sampling = sampling

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Name (optional)")
            yield SafeInput(placeholder="e.g. recipes", id="name")
            yield Label("System prompt (optional)")
            yield SafeTextArea(self.default_system, id="system")
            yield SamplingForm(self.default_sampling, id="sampling")
            yield Label("", id="problem")
            yield Label(Content(HINT), classes="hint")
            with Horizontal():
                yield Button("Cancel", id="cancel")
                yield Button("Create", id="create", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#name", Input).focus()

    def result(self, sampling: Sampling) -> NewTabRequest:
        name = self.query_one("#name", Input).value.strip()
        system = self.query_one("#system", TextArea).text.strip()
        return NewTabRequest(name, system, sampling)
