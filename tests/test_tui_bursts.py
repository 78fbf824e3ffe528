"""Keys in bursts, as a fast typist, a key repeat or a paste sends them: no pause between keys.

Textual's pilot waits for the app to settle after every key, so it never shows what a real keyboard
does: the second Enter of a double press reaching a dialog that the first one already dismissed. These
tests hand keys to the app's driver back to back (``send_burst``), on every modal screen: the new-tab,
rename, close, edit-message and generation-settings dialogs, and the command palette.
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
from stand_in_engine import StandInEngine
from test_tui_app import wait_until

KEY_CHARACTERS = {"enter": "\r", "escape": "\x1b", "tab": "\t", "space": " "}
BURSTS = [("enter", "enter"), ("escape", "escape"), ("enter", "escape", "enter"), ("tab", "enter", "enter"),
          ("escape", "enter", "tab", "escape"), ("enter",) * 6]


def send_burst(app: ChatApp, *keys: str) -> None:
    """Hand ``keys`` to the app as its terminal driver does, none waiting for the one before to be handled."""
    for key in keys:
        event = events.Key(key, KEY_CHARACTERS.get(key, key if len(key) == 1 else None))
        event.set_sender(app)
        app._driver.send_message(event)


async def open_new_tab_dialog(app, pilot) -> None:
    await pilot.press("ctrl+t")


async def open_rename_dialog(app, pilot) -> None:
    await pilot.press("ctrl+r")


async def open_close_dialog(app, pilot) -> None:
    await pilot.press("f4")


async def open_palette(app, pilot) -> None:
    await pilot.press("ctrl+p")


async def open_generation_settings(app, pilot) -> None:
    app.action_generation_settings()


async def open_edit_message(app, pilot) -> None:
    chat_view = app.chat_tabs.current.chat_view
    chat_view.focus()
    await pilot.pause()
    chat_view.select_message(0)  # the user's first message (a burst may have edited it, never removed it)
    await pilot.press("e")


OPENERS = [open_new_tab_dialog, open_rename_dialog, open_close_dialog, open_palette, open_generation_settings,
           open_edit_message]


@pytest.mark.parametrize("opener", OPENERS, ids=lambda opener: opener.__name__)
async def test_a_burst_of_enter_escape_and_tab_on_each_modal_leaves_the_app_running(opener, tmp_path: Path) -> None:
    paths = Paths.resolve(tmp_path / "home")
    store = ConversationStore(paths)
    conversation = store.new_conversation("chat", "")
    conversation.messages += [Message("user", "hello"), Message("assistant", "hi", [1])]
    store.save(conversation)
    store.save_state({"open_tabs": [conversation.id], "active_tab": conversation.id})
    app = make_app(Settings(), StandInEngine(["ok"]), store, paths.user_themes, AppOptions())
    async with app.run_test(size=(110, 32)) as pilot:
        for keys in BURSTS:
            tabs_before = len(app.chat_tabs.chat_tabs)
            await opener(app, pilot)
            await wait_until(pilot, lambda: isinstance(app.screen, DismissOnce), timeout=5)
            send_burst(app, *keys)
            await pilot.pause(0.2)
            while len(app.screen_stack) > 1:  # whatever the burst left open (a second dialog, say) is closed
                await pilot.press("escape")
                await pilot.pause()
            assert app.is_running and app._exception is None, keys
            for tab in app.chat_tabs.chat_tabs:
                await tab.wait_for_turn()
            # one dialog gives at most one result: never two new tabs from a double Enter
            assert len(app.chat_tabs.chat_tabs) <= tabs_before + 1, keys
            if not app.chat_tabs.chat_tabs:  # the burst closed the last tab: open one for the next round
                await pilot.press("ctrl+t")
                await pilot.press("ctrl+s")
                await wait_until(pilot, lambda: bool(app.chat_tabs.chat_tabs))
    assert app._exception is None
