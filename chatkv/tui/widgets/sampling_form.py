"""The generation settings of one tab as a small form: temperature, top-p, repetition penalty, reply length.

Used by the new-tab dialog and by the palette's "Generation settings" dialog. ``sampling()`` reads the
fields back; a value out of range raises ``ValueError`` with a message that names the field.
"""

from __future__ import annotations

import dataclasses

from textual.app import ComposeResult
from textual.containers import Grid
from textual.content import Content
from textual.widgets import Input, Label

from chatkv.engine.api import EngineError, Sampling
from chatkv.tui.widgets.text_fields import SafeInput

# (field, label, whole number)
FIELDS = (
    ("temperature", "Temperature (0: greedy)", False),
    ("top_p", "Top-p", False),
    ("repetition_penalty", "Repetition penalty (1: off)", False),
    ("max_new_tokens", "Longest reply (tokens)", True),
)


class SamplingForm(Grid):
    DEFAULT_CSS = """
    SamplingForm {
        grid-size: 2;
        grid-columns: 1fr 14;
        grid-rows: 1;
        grid-gutter: 1 1;
        height: auto;
        margin-top: 1;
    }
    """

    def __init__(self, sampling: Sampling, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.initial = sampling

    def compose(self) -> ComposeResult:
        for name, label, whole in FIELDS:
            yield Label(Content(label))
            yield SafeInput(str(getattr(self.initial, name)), type="integer" if whole else "number", id=f"sampling-{name}",
                        compact=True)

    def sampling(self) -> Sampling:
        """The settings as typed; raises ``ValueError`` saying which field is wrong and why."""
        values = {}
        for name, label, whole in FIELDS:
            text = self.query_one(f"#sampling-{name}", Input).value.strip()
            try:
                values[name] = int(text) if whole else float(text)
            except ValueError:
                raise ValueError(f"{label}: expected {'a whole number' if whole else 'a number'}, got {text!r}") from None
        sampling = dataclasses.replace(self.initial, **values)
        try:
            sampling.validate()
        except EngineError as exc:
            raise ValueError(str(exc)) from None
        return sampling
