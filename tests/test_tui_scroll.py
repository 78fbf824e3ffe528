"""Each tab's scroll position is the user's: nothing done in one tab moves another tab's view, and a tab that was
following new text (at its bottom) keeps following it."""

from __future__ import annotations

from pathlib import Path

from chatkv.config import Settings
from chatkv.conversation import Message
from chatkv.paths import Paths
from chatkv.store import ConversationStore
from chatkv.tui.app import AppOptions, ChatApp, make_app
from stand_in_engine import StandInEngine
from test_tui_app import wait_until

SIZE = (100, 30)


def long_conversation(store: ConversationStore, name: str):
    conversation = store.new_conversation(name, "")
    for turn in range(12):
        conversation.messages += [Message("user", f"question {turn}"),
                                  Message("assistant", "\n\n".join(f"line {turn}.{n}" for n in range(4)), [1])]
    store.save(conversation)
    return conversation


def app_with_two_long_tabs(tmp_path: Path) -> ChatApp:
    store = ConversationStore(Paths.resolve(tmp_path / "home"))
    first, second = long_conversation(store, "first"), long_conversation(store, "second")
    store.save_state({"open_tabs": [first.id, second.id], "active_tab": first.id})
    return make_app(Settings(), StandInEngine(["a reply"] * 30), store, None, AppOptions())


def at_bottom(view) -> bool:
    return view.max_scroll_y > 0 and view.scroll_y >= view.max_scroll_y - 1


async def test_opening_a_new_tab_leaves_the_other_tabs_where_they_were(tmp_path: Path) -> None:
    app = app_with_two_long_tabs(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        first = app.chat_tabs.current
        await wait_until(pilot, lambda: at_bottom(first.chat_view))
        await pilot.press("ctrl+t")
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: len(app.chat_tabs.chat_tabs) == 3)
        await pilot.press("ctrl+pageup", "ctrl+pageup")
        await wait_until(pilot, lambda: app.chat_tabs.current is first)
        await pilot.pause(0.2)
        assert at_bottom(first.chat_view), (first.chat_view.scroll_y, first.chat_view.max_scroll_y)
        # still following: a reply sent now ends in view
        first.prompt_input.load_text("one more")
        await pilot.press("enter")
        await wait_until(pilot, lambda: not first.generating)
        await pilot.pause(0.2)
        assert at_bottom(first.chat_view)


async def test_a_tab_scrolled_up_stays_where_the_user_left_it_while_other_tabs_open_and_switch(tmp_path: Path) -> None:
    app = app_with_two_long_tabs(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        first = app.chat_tabs.current
        await wait_until(pilot, lambda: at_bottom(first.chat_view))
        await pilot.press("pageup", "pageup")
        await pilot.pause(0.2)
        left_at = first.chat_view.scroll_y
        assert 0 < left_at < first.chat_view.max_scroll_y - 1
        await pilot.press("ctrl+t")
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: len(app.chat_tabs.chat_tabs) == 3)
        await pilot.press("ctrl+pageup", "ctrl+pageup")  # from the new tab through the second to the first
        await wait_until(pilot, lambda: app.chat_tabs.current is first)
        await pilot.pause(0.2)
        assert first.chat_view.scroll_y == left_at
