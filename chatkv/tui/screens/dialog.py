"""What every modal screen of chatkv shares: it is dismissed once, whatever arrives after.

Keys from a fast typist, a key repeat or a paste arrive in a burst: Textual hands them to the dialog's
focused widget before the first of them is handled. If the first one dismisses the dialog (Enter,
Esc), the rest are still handled by widgets of a screen that is no longer on the stack, and a second
``dismiss`` would pop the screen beneath it, or the last screen (``ScreenStackError``), and run the
result callback twice (two new tabs from one dialog). So a dismissal is accepted only from the screen
that is on top; later ones do nothing. Every dialog (``Dialog``) and the command palette
(``ChatCommandPalette``) take it from ``DismissOnce``.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from textual.await_complete import AwaitComplete
from textual.command import CommandPalette
from textual.screen import ModalScreen

ResultType = TypeVar("ResultType")


class DismissOnce:
    """Mixin for a ``Screen``: ``dismiss`` acts only while the screen is the one on top (see the module docstring)."""

    def dismiss(self, result=None) -> AwaitComplete:
        if self.app.screen is not self:  # already dismissed (or covered): keys of a burst still arriving
            return AwaitComplete()
        return super().dismiss(result)  # type: ignore[misc]


class Dialog(DismissOnce, ModalScreen[ResultType], Generic[ResultType]):
    """Base of chatkv's dialogs: a modal screen that is dismissed once."""


class ChatCommandPalette(DismissOnce, CommandPalette):
    """Textual's command palette, dismissed once."""
