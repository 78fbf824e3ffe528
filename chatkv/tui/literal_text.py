"""Text from outside shown literally in the terminal UI: never acted on by the terminal, never parsed as markup.

Control characters and bidi controls become visible stand-ins (``chatkv.visible_text.visible``,
re-exported here): replies, messages, names, notifications, dialogs and the palette all pass through it.
Text that a user, the model or a file supplies is never parsed as Textual markup: widgets get it as
``Content(text)``, notifications are always literal (``ChatApp.notify``), and the few Textual APIs
that only take a markup string (the command palette's help line) get ``literal_markup(text)``.
"""

from __future__ import annotations

from chatkv.visible_text import visible

__all__ = ["literal_markup", "visible"]


def literal_markup(text: str) -> str:
    """Textual markup that renders exactly as ``visible(text)``: every ``[`` is escaped, so no tag can open or close.

    ``textual.markup.escape`` leaves some text that still parses or changes (an unterminated ``[/``,
    a trailing backslash); escaping every ``[`` leaves none.
    """
    return visible(text).replace("[", "\\[")
