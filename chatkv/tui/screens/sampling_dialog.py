"""The behaviour the new-tab and generation-settings dialogs share: a sampling form that is read on submit.

Enter in a one-line box, Ctrl+S or the primary button (id ``create``) reads the form; a bad value is
shown in the dialog's ``#problem`` label and the dialog stays open; Esc or the other button cancels.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from textual.content import Content
from textual.widgets import Button, Input, Label

from chatkv.engine.api import Sampling
from chatkv.tui.keys import NEW_TAB_DIALOG_BINDINGS
from chatkv.tui.screens.dialog import Dialog
from chatkv.tui.widgets.sampling_form import SamplingForm

ResultType = TypeVar("ResultType")


class SamplingDialog(Dialog[ResultType | None], Generic[ResultType]):
    BINDINGS = NEW_TAB_DIALOG_BINDINGS

    def result(self, sampling: Sampling) -> ResultType:
        """What the dialog dismisses with once the form reads well."""
        raise NotImplementedError

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
        self.dismiss(self.result(sampling))
