"""Hostile files and hostile input: a clear message every time, the bad file set aside (never deleted), the rest loads.

Already covered elsewhere, and listed in docs/reliability.md: every damaged or hostile conversation
file in the store (test_store.py), damaged snapshots (test_snapshot.py, test_engine_snapshot.py),
broken theme files (test_themes.py), config files with unknown keys and wrong types (test_config.py),
bad script lines and invalid UTF-8 in headless scripts (test_headless.py), markup and escape
sequences in replies (test_tui_app.py). Here: the same damage met by the running app, and the gaps.
"""

from __future__ import annotations

import html
import os
import re
import threading
import time
from pathlib import Path

import orjson
import pytest
from textual import events

from chatkv.config import Settings, load_settings
from chatkv.conversation import Message
from chatkv.engine import Engine
from chatkv.paths import Paths
from chatkv.store import ConversationStore
from chatkv.tui.app import AppOptions, make_app
from chatkv.tui.themes import builtin_themes_dir, load_themes
from stand_in_engine import StandInEngine
from test_reliability_support import run_chatkv, run_script, script_bytes

SIZE = (130, 40)
PASTE_200_KB = "All work and no play makes Jack a dull boy. " * 4700  # about 200 kB, far past the context
HOSTILE_TEXT = "ctl\x00\x07\x08\x7f esc\x1b[2J\x1b]0;pwned\x07 c1\x9b31m markup [bold red]x[/] [@click=app.quit]q[/] <b>"


async def wait_until(pilot, condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await pilot.pause(0.02)


def screen_text(app) -> str:
    svg = app.export_screenshot()
    return html.unescape(re.sub(r"<[^>]+>", "", svg)).replace("\xa0", " ")


def record_notifications(app) -> list[tuple[str, str]]:
    shown: list[tuple[str, str]] = []
    real_notify = app.notify

    def notify(message, *args, severity="information", **kwargs):
        shown.append((str(message), severity))
        return real_notify(message, *args, severity=severity, **kwargs)

    app.notify = notify
    return shown


@pytest.fixture
def paths(data_dir: Path) -> Paths:
    return Paths.resolve(data_dir)


@pytest.fixture
def tiny_engine(tiny_bundle, paths: Paths):
    settings = Settings()
    settings.generation.max_new_tokens = 4
    settings.kv.max_tokens_per_session = 512
    engine = Engine(tiny_bundle, settings, snapshot_dir=paths.snapshots).start()
    yield engine
    engine.close()


def save_conversation(store: ConversationStore, session_id: str, text: str) -> None:
    conversation = store.new_conversation(session_id)
    conversation.id = session_id
    conversation.messages += [Message("user", text), Message("assistant", "ok", token_ids=[1])]
    store.save(conversation)


# ---- damaged files met by the running app ---------------------------------------------------------


async def test_a_broken_conversation_reopened_at_launch_is_set_aside_reported_and_the_other_tabs_load(
        tiny_engine, paths: Paths):
    store = ConversationStore(paths)
    save_conversation(store, "good", "still here")
    store.paths.sessions.joinpath("bad.json").write_bytes(b'{"id": "bad", "messages": [')
    store.save_state({"open_tabs": ["bad", "good"], "active_tab": "bad", "theme": None})
    app = make_app(tiny_engine.settings, tiny_engine, store, paths.user_themes, AppOptions())
    shown = record_notifications(app)

    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert [tab.session_id for tab in app.chat_tabs.chat_tabs] == ["good"]
        await wait_until(pilot, lambda: shown)

    [(message, severity)] = [note for note in shown if "bad.json" in note[0]]
    assert severity == "warning" and "not valid JSON" in message and "moved to" in message
    assert (store.quarantine_folder / "bad.json").read_bytes() == b'{"id": "bad", "messages": ['


async def test_a_broken_conversation_found_by_the_command_palette_is_reported_when_set_aside(tiny_engine, paths: Paths):
    store = ConversationStore(paths)
    save_conversation(store, "good", "closed but fine")
    app = make_app(tiny_engine.settings, tiny_engine, store, paths.user_themes, AppOptions(restore_tabs=False))
    shown = record_notifications(app)

    async with app.run_test(size=SIZE) as pilot:
        store.paths.sessions.joinpath("bad.json").write_bytes(b"\x00 not json")
        await pilot.press("ctrl+p")
        await wait_until(pilot, lambda: (store.quarantine_folder / "bad.json").exists())
        await pilot.press("escape")
        await pilot.pause()

    assert [message for message, _ in shown if "bad.json" in message], shown


async def test_opening_a_broken_saved_session_in_headless_mode_is_an_error_event_and_the_script_goes_on(
        tiny_engine, paths: Paths):
    store = ConversationStore(paths)
    store.paths.sessions.mkdir(parents=True)
    store.paths.sessions.joinpath("a.json").write_bytes(b"[1, 2, 3]")

    run = await run_script(tiny_engine, tiny_engine.settings, paths, script_bytes(
        {"op": "open", "tab": "a"}, {"op": "open", "tab": "b"}, {"op": "send", "tab": "b", "text": "hi"}, {"op": "wait"}))

    [error] = run.of("error", "a")
    assert "a.json could not be used" in error["message"] and "moved to" in error["message"]
    assert [event["turn"] for event in run.of("turn", "b")] == [1]
    assert (store.quarantine_folder / "a.json").read_bytes() == b"[1, 2, 3]"


async def test_a_broken_user_theme_is_reported_at_launch_left_on_disk_and_the_app_runs(tiny_engine, paths: Paths):
    paths.user_themes.mkdir(parents=True)
    broken = paths.user_themes / "neon.toml"
    broken.write_text('name = "neon"\ndark = true\nprimary = "glowing pink"\n')
    app = make_app(tiny_engine.settings, tiny_engine, ConversationStore(paths), paths.user_themes, AppOptions(theme="neon"))
    shown = record_notifications(app)

    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: len(shown) >= 2)
        assert app.theme != "neon" and app.chat_tabs.current is not None

    about_the_file = [message for message, _ in shown if str(broken) in message]
    assert len(about_the_file) == 1 and "skipped" in about_the_file[0]
    assert broken.exists()  # the user's file is theirs to fix, never deleted


def fifo_read_returns(reader, fifo: Path) -> bool:
    """Run ``reader`` in a thread; True if it finished within 2 s (a FIFO read with no writer blocks forever)."""
    done = threading.Event()
    threading.Thread(target=lambda: (reader(), done.set()), daemon=True).start()
    finished = done.wait(2)
    if not finished:
        with open(fifo, "w"):  # a writer that closes at once: the blocked read sees end of file and returns
            pass
        done.wait(5)
    return finished


def test_a_fifo_posing_as_a_theme_file_does_not_hang_the_launch(tmp_path: Path):
    user_themes = tmp_path / "themes"
    user_themes.mkdir()
    os.mkfifo(user_themes / "trap.toml")

    assert fifo_read_returns(lambda: load_themes(builtin_themes_dir(), user_themes), user_themes / "trap.toml")


def test_a_fifo_posing_as_the_config_file_gives_defaults_and_a_message_instead_of_hanging(tmp_path: Path):
    config = tmp_path / "config.toml"
    os.mkfifo(config)
    outcome: dict = {}

    def load() -> None:
        outcome["settings"], outcome["messages"] = load_settings(config)

    assert fifo_read_returns(load, config)
    assert outcome["settings"] == Settings()
    assert "not a regular file" in outcome["messages"][0] and "using defaults" in outcome["messages"][0]


def test_a_data_dir_that_is_a_file_is_explained_without_a_traceback(tmp_path: Path):
    not_a_folder = tmp_path / "occupied"
    not_a_folder.write_text("someone else's file")

    completed = run_chatkv("launch", "--headless", "--script", "-", "--data-dir", str(not_a_folder),
                           stdin=b'{"op":"quit"}\n')

    stderr = completed.stderr.decode()
    assert completed.returncode == 1, stderr
    assert "Traceback" not in stderr
    assert f"Cannot use {not_a_folder / 'data'} for chatkv's data: Not a directory" in stderr and "--data-dir" in stderr
    assert not_a_folder.read_text() == "someone else's file"


# ---- hostile input --------------------------------------------------------------------------------


async def test_an_empty_or_blank_send_in_headless_mode_is_refused_with_an_error_event(tiny_engine, paths: Paths):
    run = await run_script(tiny_engine, tiny_engine.settings, paths, script_bytes(
        {"op": "open", "tab": "a"}, {"op": "send", "tab": "a", "text": ""},
        {"op": "send", "tab": "a", "text": " \n\t "}, {"op": "wait"}))

    assert run.of("turn") == []
    assert len(run.of("error", "a")) == 2


async def test_a_200_kb_paste_in_headless_mode_is_refused_with_a_clear_message_and_the_tab_goes_on(
        tiny_engine, paths: Paths):
    run = await run_script(tiny_engine, tiny_engine.settings, paths, script_bytes(
        {"op": "open", "tab": "a"}, {"op": "send", "tab": "a", "text": PASTE_200_KB},
        {"op": "send", "tab": "a", "text": "a short one"}, {"op": "wait"}))

    [error] = run.of("error", "a")
    assert "This message is too long" in error["message"] and "Shorten it" in error["message"]
    assert [event["turn"] for event in run.of("turn", "a")] == [1]
    saved = ConversationStore(paths).get("a").messages
    assert [m.content for m in saved if m.role == "user"] == ["a short one"]  # the refused paste is not kept as sent


async def test_control_characters_escapes_and_markup_travel_through_headless_mode_literally_on_one_json_line(
        paths: Paths):
    engine = StandInEngine([HOSTILE_TEXT[::-1]])
    from chatkv.headless import EventWriter  # the real writer, on a byte-exact buffer

    run = await run_script(engine, Settings(), paths, script_bytes(
        {"op": "open", "tab": "a"}, {"op": "send", "tab": "a", "text": HOSTILE_TEXT}, {"op": "wait"}), stream=True)

    assert engine.prompts == [HOSTILE_TEXT]
    [turn] = run.of("turn", "a")
    assert turn["reply"] == HOSTILE_TEXT[::-1]
    assert [m.content for m in ConversationStore(paths).get("a").messages] == [HOSTILE_TEXT, HOSTILE_TEXT[::-1]]
    lines = []

    class Sink:
        def write(self, text: str) -> None:
            lines.append(text)

        def flush(self) -> None:
            pass

    EventWriter(Sink()).emit(turn)
    [line] = lines
    assert line.endswith("\n") and line.count("\n") == 1
    assert not [char for char in line[:-1] if ord(char) < 0x20]  # escaped: one event, one line
    assert orjson.loads(line) == turn


async def test_control_characters_and_escape_sequences_typed_by_the_user_are_shown_as_symbols(paths: Paths):
    engine = StandInEngine(["fine"])
    app = make_app(Settings(), engine, ConversationStore(paths), paths.user_themes, AppOptions())

    async with app.run_test(size=(250, 40)) as pilot:  # wide enough to keep the message on one line
        tab = app.chat_tabs.current
        app.post_message(events.Paste(HOSTILE_TEXT))  # as the terminal driver delivers a paste
        await wait_until(pilot, lambda: tab.prompt_input.text == HOSTILE_TEXT)
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(tab.conversation.messages) == 2)
        await pilot.pause()
        shown = screen_text(app)

    assert engine.prompts == [HOSTILE_TEXT]  # sent as typed
    assert "esc␛[2J␛]0;pwned␇" in shown and "ctl␀␇␈␡" in shown and "c1\\x9b31m" in shown
    assert "[bold red]x[/] [@click=app.quit]q[/] <b>" in shown
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", shown)


async def test_a_200_kb_paste_in_the_tui_is_refused_with_a_visible_note_and_given_back(tiny_engine, paths: Paths):
    app = make_app(tiny_engine.settings, tiny_engine, ConversationStore(paths), paths.user_themes, AppOptions())

    async with app.run_test(size=SIZE) as pilot:
        tab = app.chat_tabs.current
        app.post_message(events.Paste(PASTE_200_KB))
        await wait_until(pilot, lambda: len(tab.prompt_input.text) == len(PASTE_200_KB))
        await pilot.press("enter")
        await wait_until(pilot, lambda: not tab.generating and tab.prompt_input.text == PASTE_200_KB, timeout=120)
        await pilot.pause()
        assert "Not sent: This message is too long" in screen_text(app)
        assert tab.conversation.messages == []

        tab.prompt_input.clear()
        await pilot.press(*"hi", "enter")  # the tab still works
        await wait_until(pilot, lambda: len(tab.conversation.messages) == 2 and not tab.generating)
