"""Dialog to change the current tab's generation settings (from the command palette)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label

from chatkv.engine.api import Sampling
from chatkv.tui.keys import NEW_TAB_DIALOG_BINDINGS
from chatkv.tui.widgets.sampling_form import SamplingForm


class GenerationScreen(ModalScreen[Sampling | None]):
    """Dismisses with the new settings, or None when cancelled."""

    DEFAULT_CSS = """
    GenerationScreen { align: center middle; }
    GenerationScreen > Vertical {
        width: 60;
        height: auto;
        padding: 1 2;
        border: thick $primary;
        background: $surface;
    }
    GenerationScreen .hint { color: $text-muted; margin-top: 1; }
    GenerationScreen #problem { color: $text-error; }
    GenerationScreen Horizontal { height: auto; align-horizontal: right; margin-top: 1; }
    GenerationScreen Button { margin-left: 1; }
    """
    BINDINGS = NEW_TAB_DIALOG_BINDINGS

    def __init__(self, tab_name: str, sampling: Sampling) -> None:
        super().__init__()
        self.tab_name = tab_name
        self.sampling = sampling

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(Content(f"Generation settings for {self.tab_name!r}, from its next reply on"))
            yield SamplingForm(self.sampling)
            yield Label("", id="problem")
            yield Label("Enter or Ctrl+S applies · Esc cancels", classes="hint")
            with Horizontal():
                yield Button("Cancel", id="cancel")
                yield Button("Apply", id="create", variant="primary")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

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
        self.dismiss(sampling)
