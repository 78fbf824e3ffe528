"""Text fields that hold what was typed, pasted or loaded as it is, and never draw a control character.

Textual's ``Input`` and ``TextArea`` write their text to the terminal as it is: an ESC, BEL, C1 control or
bidi override in a pasted text, a conversation name or a message being edited would reach the terminal
and act (a pasted ``ESC ] 0 ; … BEL`` retitles the window). Those characters take no cell (rich measures
them 0 wide), so leaving them out of the drawn line moves no column: the cursor stays where Textual
puts it, the field's value keeps them (a message is sent as typed, a name stays as it was), and the
history, labels and dialogs show them as symbols (``chatkv.visible_text``).
"""

from __future__ import annotations

from rich.segment import Segment
from textual.strip import Strip
from textual.widgets import Input, TextArea

from chatkv.visible_text import CONTROL_CODES

_NOT_DRAWN = {code: None for code in CONTROL_CODES}


def without_controls(strip: Strip) -> Strip:
    """``strip`` with the control characters left out of its text (the same cells: they are 0 wide)."""
    if not any(segment.text.translate(_NOT_DRAWN) != segment.text for segment in strip if not segment.control):
        return strip
    segments = [segment if segment.control else Segment(segment.text.translate(_NOT_DRAWN), segment.style)
                for segment in strip]
    return Strip(segments, strip.cell_length)


class SafeInput(Input):
    """A one-line ``Input`` that never draws a control character (see the module docstring)."""

    def render_line(self, y: int) -> Strip:
        return without_controls(super().render_line(y))


class SafeTextArea(TextArea):
    """A ``TextArea`` that never draws a control character (see the module docstring)."""

    def render_line(self, y: int) -> Strip:
        return without_controls(super().render_line(y))
