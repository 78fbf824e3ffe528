"""Dialog to change the current tab's generation settings (from the command palette)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.widgets import Button, Input, Label

from chatkv.engine.api import Sampling
from chatkv.tui.screens.sampling_dialog import SamplingDialog
from chatkv.tui.widgets.sampling_form import SamplingForm
from chatkv.visible_text import visible


class GenerationScreen(SamplingDialog[Sampling]):
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
    GenerationScreen #title { width: 100%; }  /* wraps: a long tab name must not cut the sentence off */
    GenerationScreen .hint { color: $text-muted; margin-top: 1; }
    GenerationScreen #problem { color: $text-error; }
    GenerationScreen Horizontal { height: auto; align-horizontal: right; margin-top: 1; }
    GenerationScreen Button { margin-left: 1; }
    """

    def __init__(self, tab_name: str, sampling: Sampling) -> None:
        super().__init__()
        self.tab_name = tab_name
        self.sampling = sampling

    def compose(self) -> ComposeResult:
        with Vertical():
            name = visible(self.tab_name, one_line=True)
            yield Label(Content(f"Generation settings for {name!r}, from its next reply on, saved with the conversation"),
                        id="title")
            yield SamplingForm(self.sampling)
            yield Label("", id="problem")
            yield Label("Enter or Ctrl+S applies · Esc cancels", classes="hint")
            with Horizontal():
                yield Button("Cancel", id="cancel")
                yield Button("Apply", id="create", variant="primary")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    def result(self, sampling: Sampling) -> Sampling:
        return sampling
