"""Text from outside shown as text: control characters and bidi overrides made visible, never acted on.

Names, messages, replies, file contents and server errors may hold terminal control sequences: CSI
(``ESC [ 2 J`` clears the screen), OSC (``ESC ] 0 ; … BEL`` retitles the window, OSC 52 writes the
clipboard, OSC 8 makes links), DCS, BEL, C1 controls (``\\x9b`` is a one-byte CSI), and Unicode bidi
overrides and isolates (U+202A–U+202E, U+2066–U+2069), which make text display in another order than
it is stored. Written to a terminal as they are, they act. ``visible`` replaces each of them by a
stand-in that shows what was there: C0 controls by their Unicode control picture (ESC as ␛), DEL as ␡,
C1 controls as ``\\x9b`` and bidi controls as ``\\u202e`` (the text of Python's escapes). Every place that shows such text, in the
terminal UI and the CLI alike, passes it through here.
"""

from __future__ import annotations

BIDI_CONTROLS = [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]


def _stand_in(code: int) -> str:
    if code < 0x20:
        return chr(0x2400 + code)
    if code == 0x7F:
        return "\u2421"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


# every character a terminal may act on: C0 controls but newline and tab, DEL, C1 controls, bidi controls
CONTROL_CODES = [code for code in [*range(0x20), 0x7F, *range(0x80, 0xA0), *BIDI_CONTROLS] if chr(code) not in "\n\t"]
_MULTI_LINE = {code: _stand_in(code) for code in CONTROL_CODES}
_ONE_LINE = {**_MULTI_LINE, ord("\n"): _stand_in(ord("\n")), ord("\t"): " "}


def visible(text: str, one_line: bool = False) -> str:
    """``text`` with every control character but newline and tab, and every bidi control, as a visible stand-in.

    ``one_line``: for a name, a label or a table cell: newlines show as ␊ and tabs as a space too.
    """
    return text.translate(_ONE_LINE if one_line else _MULTI_LINE)
