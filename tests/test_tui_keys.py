"""The keys a terminal user relies on, driven with Textual's pilot on the real App.

The replies come from the stand-in engine (``stand_in_engine.py``): these tests are about what the keys do
to the screen, the input and the clipboard, so the reply's text has to be known in advance.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from textual.widgets import Input, TextArea
from textual.widgets._toast import Toast

from chatkv.config import Settings
from chatkv.paths import Paths
from chatkv.store import ConversationStore
from chatkv.tui.app import WIDE_ENOUGH_FOR_STATS, AppOptions, ChatApp, make_app
from chatkv.tui.keys import APP_BINDINGS, CHAT_VIEW_BINDINGS, HISTORY_BINDINGS
from chatkv.tui.screens.confirm_close import ConfirmCloseScreen
from chatkv.tui.screens.generation import GenerationScreen
from chatkv.tui.screens.new_tab import NewTabScreen
from stand_in_engine import StandInEngine
from test_tui_app import SIZE, screen_text, wait_until

README = Path(__file__).resolve().parent.parent / "README.md"
POEM = "Roses are red,\nviolets are blue,\nthe sea is wide."
CODE_REPLY = "Run this:\n\n```sh\nls -la\necho done\n```\n\nThen that."


@pytest.fixture
def store(data_dir: Path) -> ConversationStore:
    return ConversationStore(Paths.resolve(data_dir))


def app_with(store: ConversationStore, tokens: list[str] | tuple[str, ...] = ("ok",), settings: Settings | None = None) -> ChatApp:
    return make_app(settings or Settings(), StandInEngine(tokens), store, None, AppOptions())


async def send(pilot, app: ChatApp, text: str) -> None:
    tab = app.chat_tabs.current
    count = len(tab.conversation.messages)
    tab.prompt_input.load_text(text)
    await pilot.press("enter")
    await wait_until(pilot, lambda: len(tab.conversation.messages) == count + 2 and not tab.generating)


async def test_ctrl_w_deletes_the_word_before_the_cursor_and_f4_closes_the_tab(store):
    app = app_with(store)
    async with app.run_test(size=SIZE) as pilot:
        tab = app.chat_tabs.current
        await pilot.press(*"delete this word")
        await pilot.press("ctrl+w")
        assert tab.prompt_input.text == "delete this "
        assert not isinstance(app.screen, ConfirmCloseScreen)
        await pilot.press("f4")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmCloseScreen))


@pytest.mark.parametrize(("back", "forward"), [("ctrl+pageup", "ctrl+pagedown"), ("alt+left", "alt+right")])
async def test_tabs_switch_with_keys_that_terminals_pass_through(store, back, forward):
    app = app_with(store)
    async with app.run_test(size=SIZE) as pilot:
        first = app.chat_tabs.current
        second = await app.open_new_conversation("second")
        assert app.chat_tabs.current is second
        await pilot.press(back)
        assert app.chat_tabs.current is first
        await pilot.press(forward)
        assert app.chat_tabs.current is second
        assert second.prompt_input.text == ""  # nothing typed into the message on the way


async def test_the_history_scrolls_from_the_message_box(store):
    long_reply = "\n\n".join(f"Paragraph {n} of a long reply." for n in range(60))
    app = app_with(store, [long_reply])
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "write a lot")
        view = app.chat_tabs.current.chat_view
        await wait_until(pilot, lambda: view.max_scroll_y > 0 and view.scroll_y == view.max_scroll_y)
        bottom = view.scroll_y
        await pilot.press("pageup")
        await wait_until(pilot, lambda: view.scroll_y < bottom)
        await pilot.press("ctrl+home")
        await wait_until(pilot, lambda: view.scroll_y == 0)
        await pilot.press("pagedown")
        await wait_until(pilot, lambda: view.scroll_y > 0)
        await pilot.press("ctrl+end")
        await wait_until(pilot, lambda: view.scroll_y == view.max_scroll_y)
        assert app.focused is app.chat_tabs.current.prompt_input  # the user can keep typing


async def test_f3_copies_the_last_reply_and_f5_its_last_code_block(store):
    app = app_with(store, [CODE_REPLY])
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")
        assert app.clipboard == ""  # nothing to copy yet, and it says so
        await send(pilot, app, "how do I list files?")
        await pilot.press("f3")
        assert app.clipboard == CODE_REPLY
        await pilot.press("f5")
        assert app.clipboard == "ls -la\necho done\n"


async def test_single_line_breaks_in_a_reply_stay_line_breaks(store):
    app = app_with(store, [POEM])
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "a poem")
        await pilot.pause()
        shown = screen_text(app)
        rows = [row.strip(" │▌▐█") for row in shown.splitlines()]
        for verse in POEM.splitlines():
            assert any(row.startswith(verse) for row in rows), f"{verse!r} does not start a row of its own"
        assert "red, violets" not in shown and "blue, the" not in shown


async def test_the_new_tab_dialog_creates_on_ctrl_s_from_the_system_prompt_and_says_how(store):
    app = app_with(store)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+t")
        await wait_until(pilot, lambda: isinstance(app.screen, NewTabScreen))
        assert "Ctrl+S" in screen_text(app)
        await pilot.press(*"poems", "tab")
        assert isinstance(app.focused, TextArea)
        await pilot.press(*"You write poems.", "enter", *"Short ones.")  # Enter: a new line in the system prompt
        app.screen.query_one("#sampling-temperature", Input).value = "0.7"
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: len(app.chat_tabs.chat_tabs) == 2)
        tab = app.chat_tabs.current
        assert tab.conversation.name == "poems"
        assert tab.conversation.system == "You write poems.\nShort ones."
        assert tab.sampling.temperature == 0.7


async def test_a_bad_generation_value_is_explained_and_the_dialog_stays(store):
    app = app_with(store)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+t")
        await wait_until(pilot, lambda: isinstance(app.screen, NewTabScreen))
        app.screen.query_one("#sampling-top_p", Input).value = "1.5"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert isinstance(app.screen, NewTabScreen)
        assert "top_p must be in (0, 1]" in screen_text(app)
        assert len(app.chat_tabs.chat_tabs) == 1


async def test_the_palette_changes_the_current_tabs_generation_settings(store):
    app = app_with(store)
    async with app.run_test(size=SIZE) as pilot:
        tab = app.chat_tabs.current
        await pilot.press("ctrl+p")
        await pilot.press(*"Generation settings")
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, GenerationScreen))
        app.screen.query_one("#sampling-temperature", Input).value = "0"
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: not isinstance(app.screen, GenerationScreen))
        assert tab.sampling.greedy and tab.sampling.max_new_tokens == Settings().generation.max_new_tokens


async def test_a_tabs_generation_settings_are_saved_with_its_conversation_and_come_back_on_relaunch(store):
    app = app_with(store)
    async with app.run_test(size=SIZE) as pilot:
        tab = app.chat_tabs.current
        session_id = tab.session_id
        app.action_generation_settings()
        await wait_until(pilot, lambda: isinstance(app.screen, GenerationScreen))
        await pilot.pause(0.2)
        assert "saved with the conversation" in " ".join(screen_text(app).split())  # the dialog says they last
        app.screen.query_one("#sampling-temperature", Input).value = "0.7"
        app.screen.query_one("#sampling-max_new_tokens", Input).value = "77"
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: not isinstance(app.screen, GenerationScreen))
        other = await app.open_new_conversation("plain")
        default_sampling = other.sampling
        await pilot.press("ctrl+q")
    relaunched = app_with(store)
    async with relaunched.run_test(size=SIZE) as pilot:
        tabs = {tab.session_id: tab for tab in relaunched.chat_tabs.chat_tabs}
        assert tabs[session_id].sampling.temperature == 0.7 and tabs[session_id].sampling.max_new_tokens == 77
        assert tabs[other.session_id].sampling == default_sampling  # a tab left on the defaults follows them


async def test_sampling_defaults_are_not_greedy_and_explicit_greedy_stays_available(store):
    app = app_with(store)
    async with app.run_test(size=SIZE):
        sampling = app.chat_tabs.current.sampling
        assert (sampling.temperature, sampling.top_p, sampling.repetition_penalty) == (0.2, 0.9, 1.1)
    settings = Settings()
    settings.generation.temperature = 0.0
    greedy = app_with(store, settings=settings)
    async with greedy.run_test(size=SIZE):
        assert greedy.chat_tabs.current.sampling.greedy


async def test_the_stats_panel_follows_resizes_both_ways(store):
    app = app_with(store)
    async with app.run_test(size=(WIDE_ENOUGH_FOR_STATS + 20, 40)) as pilot:
        assert app.stats_panel.display
        await pilot.resize_terminal(70, 40)
        await wait_until(pilot, lambda: not app.stats_panel.display)
        assert app.chat_tabs.current.chat_view.size.width > 60  # the chat gets the width back
        await pilot.resize_terminal(WIDE_ENOUGH_FOR_STATS + 20, 40)
        await wait_until(pilot, lambda: app.stats_panel.display)


async def test_notices_never_cover_the_message_box(store):
    app = app_with(store)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        app.notify("A notice with enough words in it to take a few lines of the screen. " * 3, timeout=30)
        await wait_until(pilot, lambda: bool(app.screen.query(Toast)))
        await pilot.pause()
        box = app.chat_tabs.current.prompt_input.region
        for toast in app.screen.query(Toast):
            assert not toast.region.overlaps(box), (toast.region, box)


async def test_the_close_dialog_shows_its_whole_text_and_points_to_the_palette(store):
    app = app_with(store)
    async with app.run_test(size=(80, 30)) as pilot:
        await pilot.press("f4")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmCloseScreen))
        shown = screen_text(app)
        dialog = re.sub(r"[\s█]+", " ", shown[shown.index("Close '"):shown.index("Cancel")])
        assert 'reopen it from the command palette (Ctrl+P, "Reopen"). Deleting removes it and its KV snapshot.' in dialog
        assert "`" not in dialog


def test_the_readme_key_table_lists_every_key_the_app_binds():
    readme = README.read_text()
    table = readme[readme.index("| key | action |"):readme.index("Sending while")]
    rows = table.splitlines()
    for binding in [*APP_BINDINGS, *HISTORY_BINDINGS, *CHAT_VIEW_BINDINGS]:
        first_key = binding.key.split(",")[0]
        parts = [f"<kbd>{part}</kbd>" for part in readme_key_names(first_key)]
        assert any(all(part in row for part in parts) for row in rows), \
            f"README's key table does not list {first_key} ({binding.description})"
    assert "Alt</kbd>+<kbd>1" not in table


def readme_key_names(key: str) -> list[str]:
    names = {"ctrl": "Ctrl", "alt": "Alt", "shift": "Shift", "pageup": "PgUp", "pagedown": "PgDn", "escape": "Esc",
             "home": "Home", "end": "End", "left": "←", "right": "→", "up": "↑", "down": "↓", "enter": "Enter"}
    return [names.get(part, part.upper() if len(part) <= 3 else part) for part in key.split("+")]
