"""Terminal control sequences in text from outside never reach the terminal: a catalogue of them goes through every
widget and dialog, and the test reads what Textual would write to the terminal (a full repaint of the screen
stack, as the driver gets it), not only what a widget holds.

The text arrives as users meet it: a conversation name set by a headless script or a session file from
elsewhere, a message, a reply the model streams, a paste, an engine note, the model's progress line and a
system prompt from config.toml.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from textual import events

from chatkv.config import Settings
from chatkv.conversation import Message
from chatkv.paths import Paths
from chatkv.store import ConversationStore
from chatkv.tui.app import AppOptions, ChatApp, make_app
from chatkv.tui.screens.dialog import DismissOnce
from chatkv.visible_text import BIDI_CONTROLS, visible
from stand_in_engine import StandInEngine
from test_tui_app import wait_until

# Each one acts on a terminal that receives it raw.
CATALOGUE = {
    "CSI erase screen": "\x1b[2J",
    "CSI colour": "\x1b[31;1m",
    "OSC 0 window title": "\x1b]0;PWNED\x07",
    "OSC 8 hyperlink": "\x1b]8;;https://evil.example/\x1b\\click\x1b]8;;\x1b\\",
    "OSC 52 clipboard": "\x1b]52;c;cHduZWQ=\x07",
    "DCS request": "\x1bP$qm\x1b\\",
    "BEL": "\x07",
    "C1 CSI": "\x9b2J",
    "C1 OSC": "\x9d0;C1PWNED\x9c",
    "bidi override": "\u202eevil\u202c",
    "bidi isolate": "\u2066iso\u2069",
}
HOSTILE = "Notes " + " ".join(CATALOGUE.values())
# what must never be in the terminal's input; Textual's own output uses CSI for styles and cursor moves only
FORBIDDEN = ["\x07", "\x1b]0;", "\x1b]52;", "\x1b]8;;https://evil", "\x1bP", "\x1b[2J", "\x1b[31;1m",
             *map(chr, range(0x80, 0xA0)), *map(chr, BIDI_CONTROLS)]


def terminal_output(app: ChatApp) -> str:
    """What Textual writes to the terminal to paint the whole screen stack now (its driver's input)."""
    update = app.screen._compositor.render_update(full=True, screen_stack=list(app.screen_stack))
    return update.render_segments(app.console)


def assert_nothing_raw(app: ChatApp, where: str) -> None:
    written = terminal_output(app)
    found = [repr(sequence) for sequence in FORBIDDEN if sequence in written]
    assert not found, f"{where}: {found} written to the terminal"


@pytest.fixture
def app_with_hostile_text(tmp_path: Path) -> ChatApp:
    paths = Paths.resolve(tmp_path / "home")
    store = ConversationStore(paths)
    conversation = store.new_conversation(HOSTILE, "")
    conversation.messages += [Message("user", HOSTILE), Message("assistant", HOSTILE, [1])]
    store.save(conversation)
    closed = store.new_conversation("closed " + HOSTILE, "")
    store.save(closed)
    store.save_state({"open_tabs": [conversation.id], "active_tab": conversation.id})
    settings = Settings()
    settings.generation.system_prompt = HOSTILE
    return make_app(settings, StandInEngine(list(CATALOGUE.values())), store, paths.user_themes, AppOptions())


async def open_dialog(app: ChatApp, pilot, opener) -> None:
    await opener()
    await wait_until(pilot, lambda: isinstance(app.screen, DismissOnce), timeout=5)
    await pilot.pause(0.1)


async def close_dialog(app: ChatApp, pilot) -> None:
    await pilot.press("escape")
    await wait_until(pilot, lambda: len(app.screen_stack) == 1, timeout=5)


async def test_the_escape_catalogue_never_reaches_the_terminal_from_any_widget_or_dialog(app_with_hostile_text):
    app = app_with_hostile_text
    async with app.run_test(size=(150, 45)) as pilot:
        tab = app.chat_tabs.current
        assert_nothing_raw(app, "tab label, message and reply in the history")
        assert visible(HOSTILE, one_line=True) in str(app.chat_tabs.get_tab(tab.id).label)

        app.show_model_progress(HOSTILE)
        app.report_from_engine(HOSTILE)
        await pilot.pause(0.2)
        assert_nothing_raw(app, "title bar and a notification")

        paste = events.Paste(HOSTILE + "\r\nsecond line")
        paste.set_sender(app)
        app._driver.send_message(paste)
        await wait_until(pilot, lambda: "second line" in tab.prompt_input.text, timeout=5)
        assert "\x1b]0;PWNED" in tab.prompt_input.text  # kept as pasted (sent as typed), only never drawn
        assert_nothing_raw(app, "a paste in the message box")
        await pilot.press("enter")
        await wait_until(pilot, lambda: not tab.generating and len(tab.conversation.messages) == 4)
        assert_nothing_raw(app, "a streamed reply of escape sequences")

        for where, key in [("rename box", "ctrl+r"), ("close dialog", "f4"), ("new-tab dialog's system prompt", "ctrl+t")]:
            await open_dialog(app, pilot, lambda key=key: pilot.press(key))
            assert_nothing_raw(app, where)
            await close_dialog(app, pilot)

        async def generation_settings() -> None:
            app.action_generation_settings()

        await open_dialog(app, pilot, generation_settings)
        assert_nothing_raw(app, "generation settings dialog")
        await close_dialog(app, pilot)

        async def edit_first_message() -> None:
            tab.chat_view.focus()
            await pilot.pause()
            tab.chat_view.select_message(0)
            await pilot.press("e")

        await open_dialog(app, pilot, edit_first_message)
        assert_nothing_raw(app, "edit-message dialog")
        await close_dialog(app, pilot)

        await open_dialog(app, pilot, lambda: pilot.press("ctrl+p"))
        paste = events.Paste(HOSTILE)
        paste.set_sender(app)
        app._driver.send_message(paste)
        await pilot.pause(0.5)
        assert_nothing_raw(app, "a paste into the palette's search")
        await close_dialog(app, pilot)

        for query in ("Switch", "Reopen"):
            await open_dialog(app, pilot, lambda: pilot.press("ctrl+p"))
            await pilot.press(*query)
            await pilot.pause(0.5)
            assert_nothing_raw(app, f"the palette's {query!r} entries")
            await close_dialog(app, pilot)
    assert app._exception is None
