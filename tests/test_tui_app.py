"""The real App driven with Textual's pilot: tabs, streaming side by side, Esc, restart, literal text.

Most tests run the real engine on the tiny random model (fast, nonsense text); one runs SmolLM2.
Tests wait on conditions, never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import html
import re
import time
from pathlib import Path
from typing import Callable

import pytest
from textual.pilot import Pilot

from chatkv.config import Settings
from chatkv.conversation import Message
from chatkv.engine import Engine
from chatkv.engine.api import Sampling, TokenEvent, TurnHandle
from chatkv.paths import Paths
from chatkv.store import ConversationStore
from chatkv.tui.app import AppOptions, ChatApp, make_app
from chatkv.tui.screens.confirm_close import ConfirmCloseScreen
from chatkv.tui.screens.new_tab import NewTabScreen
from chatkv.tui.widgets.chat_tab import BUSY_MESSAGE
from chatkv.tui.widgets.messages import AssistantReply, UserMessage
from chatkv.tui.widgets.prompt_input import PromptInput
from stand_in_engine import StandInEngine

SIZE = (130, 40)


async def wait_until(pilot: Pilot, condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await pilot.pause(0.02)


def screen_text(app: ChatApp) -> str:
    """What the screen shows, as plain text (from Textual's SVG export)."""
    svg = app.export_screenshot()
    return html.unescape(re.sub(r"<[^>]+>", "", svg)).replace("\xa0", " ")


def settings_with(max_new_tokens: int) -> Settings:
    settings = Settings()
    settings.generation.max_new_tokens = max_new_tokens
    return settings


@pytest.fixture
def paths(data_dir: Path) -> Paths:
    return Paths.resolve(data_dir)


@pytest.fixture
def store(paths: Paths) -> ConversationStore:
    return ConversationStore(paths)


@pytest.fixture
def start_engine(tiny_bundle, paths):
    engines: list[Engine] = []

    def start(settings: Settings) -> Engine:
        engine = Engine(tiny_bundle, settings, snapshot_dir=paths.snapshots).start()
        engines.append(engine)
        return engine

    yield start
    for engine in engines:
        engine.close()


def build_app(settings: Settings, engine, store: ConversationStore, paths: Paths, **options) -> ChatApp:
    return make_app(settings, engine, store, paths.user_themes, AppOptions(**options))


async def type_and_send(pilot: Pilot, text: str) -> None:
    await pilot.press(*text)
    await pilot.press("enter")


async def test_two_tabs_stream_side_by_side_and_both_complete(start_engine, store, paths):
    settings = settings_with(60)
    app = build_app(settings, start_engine(settings), store, paths)
    # for each token: which tab it went to, and whether the other tab was writing at that moment
    streamed: list[tuple[str, bool]] = []
    async with app.run_test(size=SIZE) as pilot:
        first = app.chat_tabs.current
        second = await app.open_new_conversation("second")
        first.token_listeners.append(lambda _text: streamed.append(("first", second.generating)))
        second.token_listeners.append(lambda _text: streamed.append(("second", first.generating)))
        # Enter in both tabs within one tick (pilot.press waits for the whole screen to settle, which on a busy
        # machine can outlast a tiny-model reply); Enter itself is covered by the tests below
        for tab, text in ((first, "hello"), (second, "hi")):
            tab.prompt_input.post_message(PromptInput.Submitted(tab.prompt_input, text))
        await pilot.press("ctrl+pageup")
        assert app.chat_tabs.current is first  # switching tabs does not interrupt either reply
        await wait_until(pilot, lambda: not first.generating and not second.generating)
        assert ("first", True) in streamed and ("second", True) in streamed
        for tab in (first, second):
            user, reply = tab.conversation.messages
            assert user.role == "user" and reply.role == "assistant"
            assert reply.stats["new_tokens"] == 60 and len(reply.token_ids) == 60
            assert reply.stats["finish_reason"] == "length"
            [view] = tab.chat_view.replies
            assert "60 tokens" in view.query_one(".reply-footer").render().plain


async def start_a_long_reply(pilot: Pilot, tab) -> list[str]:
    """Ask ``tab`` for a long story and return, once a few tokens are in, the list its tokens keep arriving in."""
    tokens: list[str] = []
    tab.token_listeners.append(tokens.append)
    await type_and_send(pilot, "tell me a long story")
    await wait_until(pilot, lambda: len(tokens) >= 3)
    return tokens


async def test_escape_stops_the_reply_keeping_its_text_and_marks_it_stopped(start_engine, store, paths):
    settings = settings_with(1000)
    app = build_app(settings, start_engine(settings), store, paths)
    async with app.run_test(size=SIZE) as pilot:
        tab = app.chat_tabs.current
        tokens = await start_a_long_reply(pilot, tab)
        await pilot.press("escape")
        await wait_until(pilot, lambda: not tab.generating)
        reply = tab.conversation.messages[-1]
        assert reply.role == "assistant"
        assert reply.stats["finish_reason"] == "cancelled"
        assert 3 <= reply.stats["new_tokens"] < 1000
        assert reply.content == "".join(tokens)[: len(reply.content)] and reply.content
        [view] = tab.chat_view.replies
        assert view.has_class("-stopped")
        assert "stopped" in view.query_one(".reply-footer").render().plain


async def test_escape_stops_a_turn_still_queued_behind_another_tab_with_the_same_notice(start_engine, store, paths):
    # a first reply long enough (seconds on the tiny model) to still run when the second tab's Esc arrives, even on
    # a loaded machine; one turn at a time, so the second tab's turn waits in the queue behind it
    settings = settings_with(3000)
    settings.batching.max_batch_size = 1
    engine = start_engine(settings)
    app = build_app(settings, engine, store, paths)
    async with app.run_test(size=SIZE) as pilot:
        first = app.chat_tabs.current
        await start_a_long_reply(pilot, first)
        second = await app.open_new_conversation("second")
        await pilot.pause()
        second.prompt_input.load_text("and one for me")
        await pilot.press("enter")
        await wait_until(pilot, lambda: any(turn.session_id == second.session_id for turn in engine.scheduler.waiting))
        assert first.generating
        await pilot.press("escape")
        await wait_until(pilot, lambda: not second.generating)
        assert [n.message for n in app._notifications][-1] == "Stopping the reply; what was written is kept."
        assert second.conversation.messages[-1].stats["finish_reason"] == "cancelled"
        assert second.conversation.messages[-1].stats["new_tokens"] == 0
        assert first.generating  # the other tab's reply goes on
        app.chat_tabs.activate(first)
        await pilot.pause()
        await pilot.press("escape")
        await wait_until(pilot, lambda: not first.generating)


async def test_sending_while_the_tab_replies_is_refused_with_a_visible_message(store, paths):
    engine = HeldEngine(["still ", "writing"])
    app = build_app(Settings(), engine, store, paths)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        tab = app.chat_tabs.current
        await type_and_send(pilot, "first")
        await wait_until(pilot, lambda: tab.generating)
        await type_and_send(pilot, "second")
        assert tab.prompt_input.text == "second"  # kept for later, not lost
        await wait_until(pilot, lambda: any(BUSY_MESSAGE in toast.render().plain for toast in app.screen.query("Toast")))
        assert [m.content for m in tab.conversation.messages if m.role == "user"] == ["first"]
        engine.release()
        await wait_until(pilot, lambda: not tab.generating)
        await pilot.press("enter")
        await wait_until(pilot, lambda: [m.content for m in tab.conversation.messages if m.role == "user"] == ["first", "second"])


async def test_empty_input_sends_nothing(start_engine, store, paths):
    settings = settings_with(4)
    app = build_app(settings, start_engine(settings), store, paths)
    async with app.run_test(size=SIZE) as pilot:
        tab = app.chat_tabs.current
        await pilot.press("space", "space", "enter")
        await pilot.pause()
        assert not tab.generating and tab.conversation.messages == []


async def test_ctrl_j_inserts_a_newline_and_enter_sends_both_lines(start_engine, store, paths):
    settings = settings_with(2)
    app = build_app(settings, start_engine(settings), store, paths)
    async with app.run_test(size=SIZE) as pilot:
        tab = app.chat_tabs.current
        await pilot.press("a", "ctrl+j", "b", "enter")
        await wait_until(pilot, lambda: len(tab.conversation.messages) == 2)
        assert tab.conversation.messages[0].content == "a\nb"


async def test_tabs_come_back_after_a_restart_with_their_history(start_engine, store, paths):
    settings = settings_with(6)
    engine = start_engine(settings)
    app = build_app(settings, engine, store, paths)
    async with app.run_test(size=SIZE) as pilot:
        first = app.chat_tabs.current
        await type_and_send(pilot, "remember me")
        await wait_until(pilot, lambda: len(first.conversation.messages) == 2)
        await pilot.press("ctrl+t")
        await wait_until(pilot, lambda: isinstance(app.screen, NewTabScreen))
        await pilot.press(*"notes", "enter")
        await wait_until(pilot, lambda: len(app.chat_tabs.chat_tabs) == 2)
        second = app.chat_tabs.current
        await type_and_send(pilot, "second tab")
        await wait_until(pilot, lambda: len(second.conversation.messages) == 2)
        await pilot.press("ctrl+pageup")
        first_reply_ids = first.conversation.messages[1].token_ids
        await app.action_quit()

    again = build_app(settings, engine, store, paths)
    async with again.run_test(size=SIZE) as pilot:
        tabs = again.chat_tabs.chat_tabs
        assert [tab.conversation.name for tab in tabs] == [first.conversation.name, "notes"]
        assert again.chat_tabs.current.session_id == first.session_id
        restored = tabs[0].conversation.messages
        assert [m.content for m in restored][0] == "remember me"
        assert restored[1].token_ids == first_reply_ids  # the model's own ids, for exact KV reuse
        assert [block.text for block in tabs[0].chat_view.query(UserMessage)] == ["remember me"]
        assert len(tabs[1].chat_view.query(AssistantReply)) == 1


async def test_new_flag_opens_a_fresh_tab_beside_the_restored_ones(start_engine, store, paths):
    settings = settings_with(2)
    engine = start_engine(settings)
    async with build_app(settings, engine, store, paths).run_test(size=SIZE) as pilot:
        saved_id = pilot.app.chat_tabs.current.session_id
    async with build_app(settings, engine, store, paths, new_tab=True).run_test(size=SIZE) as pilot:
        tabs = pilot.app.chat_tabs.chat_tabs
        assert len(tabs) == 2 and tabs[0].session_id == saved_id
        assert pilot.app.chat_tabs.current is tabs[1]


async def test_rename_from_the_command_palette_relabels_the_tab_and_is_saved(start_engine, store, paths):
    settings = settings_with(2)
    app = build_app(settings, start_engine(settings), store, paths)
    async with app.run_test(size=SIZE) as pilot:
        tab = app.chat_tabs.current
        await pilot.press("ctrl+p")
        await pilot.press(*"Rename tab")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "RenameTabScreen")
        await pilot.press("ctrl+u", *"[b]plans[/b]", "enter")
        await wait_until(pilot, lambda: tab.conversation.name == "[b]plans[/b]")
        assert app.chat_tabs.get_tab(tab.id).label.plain == "[b]plans[/b]"  # shown as typed, not as markup
    assert store.get(tab.session_id).name == "[b]plans[/b]"


async def test_closing_keeps_the_conversation_and_deleting_removes_it(start_engine, store, paths):
    settings = settings_with(2)
    app = build_app(settings, start_engine(settings), store, paths)
    async with app.run_test(size=SIZE) as pilot:
        kept = app.chat_tabs.current
        deleted = await app.open_new_conversation("doomed")
        await pilot.press("f4")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmCloseScreen))
        await pilot.click("#delete")
        await wait_until(pilot, lambda: len(app.chat_tabs.chat_tabs) == 1)
        await pilot.press("f4")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmCloseScreen))
        await pilot.click("#close")
        # the last tab closed: a fresh one takes its place
        await wait_until(pilot, lambda: app.chat_tabs.current is not None and app.chat_tabs.current is not kept)
    saved_ids = {conversation.id for conversation in store.load_all()[0]}
    assert kept.session_id in saved_ids and deleted.session_id not in saved_ids


class HeldEngine(StandInEngine):
    """Writes its first token, then holds the turn open until the test calls ``release``."""

    def submit(self, session_id: str, messages: list[Message], sampling: Sampling) -> TurnHandle:
        self.handle = TurnHandle(session_id, asyncio.get_running_loop())
        self.handle._push(TokenEvent(session_id, self.tokens[0], 0))
        return self.handle

    def release(self) -> None:
        for index, text in enumerate(self.tokens[1:], start=1):
            self.handle._push(TokenEvent(self.handle.session_id, text, index))
        self.handle._finish(self.result_for(self.handle.session_id))


async def test_markup_and_escape_sequences_in_a_reply_are_shown_literally(store, paths):
    tokens = ["Look: ", "[bold red]loud[/] ", "[@click=app.quit]quit[/] ", "\x1b[31mred\x1b[0m ", "<b>tag</b>"]
    app = build_app(Settings(), StandInEngine(tokens), store, paths)
    async with app.run_test(size=SIZE) as pilot:
        tab = app.chat_tabs.current
        await type_and_send(pilot, "[i]user markup[/i]")
        await wait_until(pilot, lambda: len(tab.conversation.messages) == 2 and not tab.generating)
        await pilot.pause()
        shown = screen_text(app)
    assert "[bold red]loud[/]" in shown
    assert "[@click=app.quit]quit[/]" in shown
    assert "␛[31mred␛[0m" in shown and "\x1b" not in shown
    assert "<b>tag</b>" in shown
    assert "[i]user markup[/i]" in shown
    assert tab.conversation.messages[1].content == "".join(tokens)  # stored as the model wrote it


@pytest.mark.real_model
async def test_second_turn_on_smollm2_reuses_the_cache_and_says_so_in_the_footer(real_bundle, store, paths):
    settings = settings_with(12)
    engine = Engine(real_bundle, settings, snapshot_dir=paths.snapshots).start()
    try:
        app = build_app(settings, engine, store, paths)
        async with app.run_test(size=SIZE) as pilot:
            tab = app.chat_tabs.current
            await type_and_send(pilot, "What is the capital of France?")
            await wait_until(pilot, lambda: len(tab.conversation.messages) == 2 and not tab.generating, timeout=120)
            await type_and_send(pilot, "And of Italy?")
            await wait_until(pilot, lambda: len(tab.conversation.messages) == 4 and not tab.generating, timeout=120)
            second = tab.conversation.messages[3].stats
            assert second["reused_tokens"] > 0
            footer = tab.chat_view.replies[1].query_one(".reply-footer").render().plain
            assert f"{second['reused_tokens']}/{second['prompt_tokens']} prompt tokens from cache" in footer
            assert tab.conversation.messages[1].content.strip()
    finally:
        engine.close()


async def test_the_theme_choice_is_remembered_and_the_theme_flag_wins(store, paths):
    engine = StandInEngine(["ok"])
    async with build_app(Settings(), engine, store, paths).run_test(size=SIZE) as pilot:
        assert pilot.app.theme == "chatkv-dark"  # the default from settings
        pilot.app.theme = "chatkv-light"  # what the palette's Theme command does
        await pilot.pause()
    async with build_app(Settings(), engine, store, paths).run_test(size=SIZE) as pilot:
        assert pilot.app.theme == "chatkv-light"
    async with build_app(Settings(), engine, store, paths, theme="chatkv-mint").run_test(size=SIZE) as pilot:
        assert pilot.app.theme == "chatkv-mint"


async def test_an_unknown_theme_falls_back_and_says_so(store, paths):
    app = build_app(Settings(), StandInEngine(["ok"]), store, paths, theme="no-such-theme")
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        assert app.theme == "textual-dark"
        await wait_until(pilot, lambda: any("no-such-theme" in toast.render().plain for toast in app.screen.query("Toast")))


async def test_the_stats_panel_shows_on_a_wide_terminal_and_f2_toggles_it(store, paths):
    engine = StandInEngine(["ok"])
    async with build_app(Settings(), engine, store, paths).run_test(size=(100, 30)) as pilot:
        assert not pilot.app.stats_panel.display
    async with build_app(Settings(), engine, store, paths).run_test(size=(130, 30)) as pilot:
        assert pilot.app.stats_panel.display
        await pilot.press("f2")
        assert not pilot.app.stats_panel.display
        await pilot.press("f2")
        assert pilot.app.stats_panel.display


async def test_a_closed_conversation_reopens_from_the_palette_noting_a_reply_that_was_never_saved(store, paths):
    conversation = store.new_conversation("old notes")
    conversation.messages.append(Message("user", "a question chatkv never answered"))
    store.save(conversation)
    app = build_app(Settings(), StandInEngine(["ok"]), store, paths)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+p")
        await pilot.press(*"Reopen: old")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.chat_tabs.find(conversation.id) is not None)
        tab = app.chat_tabs.find(conversation.id)
        await wait_until(pilot, lambda: app.chat_tabs.current is tab and len(tab.chat_view.children) == 2)
        assert "No reply was saved" in screen_text(app)


def test_the_reply_footer_gives_the_figures_where_the_cache_came_from_and_what_was_left_out():
    from chatkv.tui.widgets.messages import describe_reply

    footer = describe_reply({"new_tokens": 5, "ttft_ms": 12.3, "decode_tok_s": 40.04, "reused_tokens": 58,
                             "reused_from": "disk", "prompt_tokens": 76, "finish_reason": "cancelled",
                             "dropped_messages": 2})
    assert footer == ("5 tokens · TTFT 12 ms · 40.0 tok/s · 58/76 prompt tokens from cache (disk snapshot)"
                      " · 2 oldest messages left out to fit the context · stopped")


async def test_the_chat_follows_a_reply_only_while_the_user_is_at_the_bottom(store, paths):
    engine = StandInEngine([f"line {n}\n\n" for n in range(60)])
    app = build_app(Settings(), engine, store, paths)
    async with app.run_test(size=SIZE) as pilot:
        tab = app.chat_tabs.current
        view = tab.chat_view
        await type_and_send(pilot, "first")
        await wait_until(pilot, lambda: not tab.generating and len(tab.conversation.messages) == 2)
        await wait_until(pilot, lambda: view.max_scroll_y > 0 and view.scroll_y == view.max_scroll_y)
        view.scroll_home(animate=False)  # the user scrolls up to read
        view.release_anchor()
        await pilot.pause()
        await type_and_send(pilot, "second")
        await wait_until(pilot, lambda: not tab.generating and len(tab.conversation.messages) == 4)
        await pilot.pause()
        assert view.scroll_y == 0 < view.max_scroll_y  # left where the user was reading
