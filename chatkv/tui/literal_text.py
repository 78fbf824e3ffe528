"""Model output shown as text: control characters become visible symbols instead of reaching the terminal.

A reply may contain escape sequences (ESC [ 31 m ...) or other control bytes. Written to the
terminal as they are, they would recolour, move the cursor or retitle the window, so every control
character except newline and tab is replaced by a visible stand-in: C0 controls by their Unicode
"control picture" (ESC shows as ␛), DEL as ␡, C1 controls as ``\\x9b``-style text.

Text that a user, the model or a file supplies is never parsed as Textual markup: widgets get it as
``Content(text)``, notifications are always literal (``ChatApp.notify``), and the few Textual APIs
that only take a markup string (the command palette's help line) get ``literal_markup(text)``.
"""

from __future__ import annotations

_KEPT = {"\n", "\t"}


def _stand_in(code: int) -> str:
    if code < 0x20:
        return chr(0x2400 + code)
    if code == 0x7F:
        return "\u2421"
    return f"\\x{code:02x}"


_TRANSLATION = {
    code: _stand_in(code)
    for code in [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)]
    if chr(code) not in _KEPT
}


def visible(text: str) -> str:
    """``text`` with every control character except newline and tab replaced by a visible stand-in."""
    return text.translate(_TRANSLATION)


def literal_markup(text: str) -> str:
    """Textual markup that renders exactly as ``text``: every ``[`` is escaped, so no tag can open or close.

    ``textual.markup.escape`` leaves some text that still parses or changes (an unterminated ``[/``,
    a trailing backslash); escaping every ``[`` leaves none.
    """
    return text.replace("[", "\\[")
